from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .conftest import REPO, glit


def _latest(run: Path) -> Path:
    info = json.loads((run / "supernet" / "latest.json").read_text())
    return run / "supernet" / info["dir"]


def _eval(run: Path, arch: str) -> dict:
    return json.loads(glit("eval-subnet", "--run", str(run), "--arch", arch, "--json").stdout)


def test_digits_supernet_reaches_90_percent_for_largest_and_smallest(trained_digits_run: Path) -> None:
    largest, smallest = _eval(trained_digits_run, "largest"), _eval(trained_digits_run, "smallest")
    assert largest["val_top1"] >= 90.0, largest
    assert smallest["val_top1"] >= 90.0, smallest
    assert largest["macs"] > smallest["macs"]
    meta = json.loads((trained_digits_run / "run.json").read_text())
    assert meta["space"]["name"] == "digits" and meta["data"]["spec"] == "digits"
    assert meta["commands"][0]["command"] == "train-supernet" and "torch" in meta["commands"][0]["versions"]
    lines = (trained_digits_run / "supernet" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in metrics] == list(range(20))


def test_checkpoint_is_safetensors_and_weights_only(trained_digits_run: Path) -> None:
    ckpt = _latest(trained_digits_run)
    weights = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("blocks.0.") for k in weights)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["epoch"] == 19 and "optimizer" in state
    assert len(list((trained_digits_run / "supernet" / "ckpt").iterdir())) <= 2  # old epochs pruned


def _train_args(run: Path, epochs: int) -> list[str]:
    return ["train-supernet", "--run", str(run), "--space", "digits", "--data", "digits", "--epochs", str(epochs),
            "--batch-size", "64", "--threads", "1", "--seed", "3", "--eval-every", "2"]


def test_killed_run_resumes_to_identical_weights(tmp_path: Path) -> None:
    epochs = 5
    glit(*_train_args(tmp_path / "straight", epochs))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "glit_deploy", *_train_args(killed, epochs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    pointer = killed / "supernet" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = json.loads(pointer.read_text())["epoch"]
    assert stopped_at < epochs - 1, "the run finished before it could be killed"
    # Without --resume the existing checkpoint is protected.
    refused = glit(*_train_args(killed, epochs), check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    glit(*_train_args(killed, epochs), "--resume")
    a = load_file(str(_latest(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(_latest(killed) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((killed / "supernet" / "ckpt").glob(".*")), "temporary checkpoint folders left behind"


def test_torchrun_two_processes_share_the_arch(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "glit_deploy", "--", *_train_args(run, 2)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "supernet" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2  # written once, by rank 0
    for m in metrics:
        assert m["world_size"] == 2
        # Every step checked with an all-reduce that both ranks trained the same arch.
        assert m["arch_sync_checks"] == m["steps"] > 0
    assert json.loads((run / "supernet" / "latest.json").read_text())["epoch"] == 1
    assert len(list((run / "supernet" / "ckpt").iterdir())) == 2
    assert "val_top1_largest" in metrics[-1]
