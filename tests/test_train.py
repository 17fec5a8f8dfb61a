from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.loss import SoftTargetCrossEntropy

from glit_deploy.nn import Supernet, extreme_arch
from glit_deploy.space import get_space
from glit_deploy.train import _train_step

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


@pytest.mark.parametrize("distill", [True, False])
def test_sandwich_step_distills_from_the_first_arch_or_learns_from_labels(distill: bool) -> None:
    torch.manual_seed(0)
    space = get_space("digits")
    net = Supernet(space, num_classes=10).train()
    archs = [extreme_arch(space, True), extreme_arch(space, False)]
    x, y = torch.randn(16, space.in_chans, space.image_size, space.image_size), torch.randint(0, 10, (16,))
    criterion, soft = torch.nn.CrossEntropyLoss(label_smoothing=0.1), SoftTargetCrossEntropy()

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        net.zero_grad(set_to_none=True)
        return out

    first_loss = _train_step(net, x, y, archs, criterion, soft if distill else None, torch.device("cpu"), None)
    stepped = grads()
    logits = net(x, archs[0])
    teacher = F.softmax(logits.detach(), dim=-1)
    other = net(x, archs[1])
    expected_first = criterion(logits, y)
    (expected_first + (soft(other, teacher) if distill else criterion(other, y))).backward()
    by_hand = grads()
    assert abs(first_loss - expected_first.item()) < 1e-6
    assert len(stepped) == len(by_hand)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stepped, by_hand, strict=True))
    # The other rule's gradient differs: the flag decides what the smaller arch learns from.
    other = net(x, archs[1])
    (criterion(net(x, archs[0]), y) + (criterion(other, y) if distill else soft(other, teacher))).backward()
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stepped, grads(), strict=True))


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
