"""`glit retrain`: the DeiT recipe through timm on a found arch, checkpoints, exact resume, errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from glit_deploy.data import load_data, make_loader
from glit_deploy.rundir import RunDir
from glit_deploy.train import evaluate
from glit_deploy.trained import load_trained_model
from tests.conftest import REPO, glit


def _retrain_args(run: Path, *extra: str) -> list[str]:
    return ["retrain", "--run", str(run), "--batch-size", "32", "--threads", "1", "--warmup-epochs", "1", *extra]


def test_retrain_from_supernet_weights_keeps_accuracy(run_copy: Path) -> None:
    proc = glit(*_retrain_args(run_copy, "--arch", "largest", "--init", "supernet", "--epochs", "2",
                               "--lr", "2e-4", "--rand-augment", "none", "--mixup", "0", "--cutmix", "0"))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    stage = run_copy / "retrain" / result["label"]
    assert result["val_top1"] >= 90.0, result
    for name in ("model.safetensors", "model.json", "arch.json", "metrics.jsonl", "curves.png", "latest.json"):
        assert (stage / name).exists(), name
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and all("val_top1_ema" in m for m in metrics)
    rundir = RunDir(run_copy)
    assert rundir.load_meta()["deploy_model"] == result["label"]
    # The saved model alone reproduces the reported accuracy.
    model, info = load_trained_model(rundir)
    assert info.arch.digest == result["digest"] and info.class_names == [str(i) for i in range(10)]
    bundle = load_data("digits", 8)
    top1 = evaluate(model, make_loader(bundle.val, 256, shuffle=False), torch.device("cpu"))
    assert abs(top1 - result["val_top1"]) < 1e-9
    # A finished retraining is not redone under --resume; without it the folder is protected.
    again = glit(*_retrain_args(run_copy, "--arch", "largest", "--init", "supernet", "--epochs", "2",
                                "--lr", "2e-4", "--rand-augment", "none", "--mixup", "0", "--cutmix", "0", "--resume"))
    assert "nothing to do" in again.stderr
    refused = glit(*_retrain_args(run_copy, "--arch", "largest", "--epochs", "2"), check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr


def test_killed_retrain_resumes_to_identical_weights(run_copy: Path, tmp_path: Path) -> None:
    """The full recipe (RandAugment, Mixup/CutMix, random erasing, drop path, EMA) resumes exactly."""
    straight = tmp_path / "straight"
    shutil.copytree(run_copy, straight)
    args = ("--arch", "smallest", "--epochs", "3", "--seed", "5")
    glit(*_retrain_args(straight, *args))
    proc = subprocess.Popen([sys.executable, "-m", "glit_deploy", *_retrain_args(run_copy, *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    label = json.loads((straight / "run.json").read_text())["deploy_model"]
    pointer = run_copy / "retrain" / label / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not pointer.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(pointer.read_text())["epoch"] < 2, "the retraining finished before it could be killed"
    glit(*_retrain_args(run_copy, *args, "--resume"))
    a = load_file(str(straight / "retrain" / label / "model.safetensors"))
    b = load_file(str(run_copy / "retrain" / label / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_keys = [k for k in load_file(str(next((run_copy / "retrain" / label / "ckpt").iterdir())
                                           / "model.safetensors")) if k.startswith("ema.")]
    assert ema_keys, "the EMA weights travel in the checkpoint"
    # The same label with another recipe is refused, finished or not, never mixed or silently returned.
    changed = glit(*_retrain_args(straight, *args[:-2], "--seed", "6", "--resume"), check=False)
    assert changed.returncode == 2 and "seed 5 -> 6" in changed.stderr and "Traceback" not in changed.stderr


def test_retrain_errors(run_copy: Path) -> None:
    no_winner = glit(*_retrain_args(run_copy, "--budget", "1ms", "--epochs", "1"), check=False)
    assert no_winner.returncode == 2 and "no search winner" in no_winner.stderr
    both = glit(*_retrain_args(run_copy, "--budget", "1ms", "--arch", "largest"), check=False)
    assert both.returncode == 2 and "either --arch or --budget" in both.stderr
    odd = glit(*_retrain_args(run_copy, "--arch", "largest", "--batch-size", "31"), check=False)
    assert odd.returncode == 2 and "even batch size" in odd.stderr
    assert "Traceback" not in no_winner.stderr + both.stderr + odd.stderr


# A recipe that learns digits in two epochs from scratch (the DeiT augmentations need many more).
SCRATCH_RECIPE = ("--epochs", "2", "--warmup-epochs", "0", "--lr", "2e-3", "--mixup", "0", "--cutmix", "0",
                  "--rand-augment", "none", "--reprob", "0", "--no-ema", "--drop-path", "0")


def _cli(*args: str, code: int = 0) -> Any:
    """`glit ARGS` in this process (typer's CliRunner): no interpreter start-up per command."""
    from typer.testing import CliRunner

    from glit_deploy.cli import app

    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(threads)  # --threads must not leak into the other tests
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    return result


def test_retrain_without_supernet_then_export_and_predict(tmp_path: Path) -> None:
    """A fresh run: --space and --data instead of a supernet; the model exports and predicts like any other."""
    import numpy as np
    from PIL import Image

    run = tmp_path / "fresh"
    assert "give --space and --data" in _cli(*_retrain_args(run, "--arch", "largest"), code=2).stderr
    assert "give --data" in _cli(*_retrain_args(run, "--space", "digits", "--arch", "largest"), code=2).stderr
    assert "--space glit-tiny --arch glit-tiny-paper" in _cli(
        *_retrain_args(run, "--space", "glit-tiny-paper", "--data", "digits"), code=2).stderr
    no_supernet = _cli(*_retrain_args(run, "--space", "digits", "--data", "digits", "--arch", "largest",
                                      "--init", "supernet"), code=2)
    assert "--init supernet needs a trained supernet" in no_supernet.stderr
    assert not run.exists(), "a refused command wrote to the run"

    trained = _cli(*_retrain_args(run, "--space", "digits", "--data", "digits", "--arch", "largest", *SCRATCH_RECIPE))
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert result["val_top1"] >= 60.0, result  # from scratch, far above chance (10 %)
    meta = json.loads((run / "run.json").read_text())
    assert meta["space"]["name"] == "digits" and meta["data"]["spec"] == "digits"
    assert meta["deploy_model"] == result["label"] and not (run / "supernet").exists()
    # Now the run records its space and data: other ones are refused, the same ones accepted.
    other_space = _cli(*_retrain_args(run, "--space", "cifar", "--arch", "largest"), code=2)
    assert "created for space 'digits', not 'cifar'" in other_space.stderr
    other_data = _cli(*_retrain_args(run, "--data", str(tmp_path), "--arch", "largest"), code=2)
    assert "created for data 'digits'" in other_data.stderr
    same = _cli(*_retrain_args(run, "--space", "digits", "--data", "digits", "--arch", "largest", *SCRATCH_RECIPE,
                               "--resume"))
    assert "nothing to do" in same.stderr

    _cli("export", "--run", str(run), "--format", "onnx")
    sidecar = json.loads((run / "export" / "model.json").read_text())
    assert sidecar["parity"]["passed"] and sidecar["source"]["label"] == result["label"]

    model, _ = load_trained_model(RunDir(run))
    bundle = load_data("digits", 8)
    images = bundle.val.images.permute(0, 2, 3, 1).numpy()[:20]
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(np.ascontiguousarray(image)).save(path)
        paths.append(str(path))
    predictions = json.loads(_cli("predict", "--run", str(run), "--json", *paths).stdout)["predictions"]
    with torch.no_grad():
        expected = model(torch.stack([bundle.val[i][0] for i in range(20)])).argmax(-1).tolist()
    assert [p["top_k"][0]["class"] for p in predictions] == [str(c) for c in expected]
    labels = bundle.val.labels.numpy()[:20]
    assert sum(c == label for c, label in zip(expected, labels, strict=True)) >= 12  # it learnt the digits
