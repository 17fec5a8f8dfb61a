"""`glit pipeline` on the built-in dataset: every stage, a kill in the middle, and the served model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FAST_LATENCY, REPO, glit

# Smaller than the README's defaults (which take a few minutes) but every stage is real.
PIPELINE_ARGS = ["--supernet-epochs", "10", "--population", "8", "--generations", "2", "--retrain-epochs", "3",
                 "--calibration-models", "4", "--holdout-models", "4"]


def _done(run: Path) -> list[str]:
    try:
        return json.loads((run / "run.json").read_text()).get("pipeline", {}).get("done", [])
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_pipeline_killed_then_rerun_completes_without_redoing_stages(tmp_path: Path) -> None:
    assert FAST_LATENCY  # the latency settings above mirror the tests' fast protocol
    run = tmp_path / "pipe"
    args = ["pipeline", "--run", str(run), *PIPELINE_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "glit_deploy", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and "latency" not in _done(run):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _done(run) == ["supernet", "latency"], _done(run)
    supernet_ckpt = (run / "supernet" / "latest.json").stat().st_mtime_ns

    result = json.loads(glit(*args, "--json").stdout.strip().splitlines()[-1])
    assert result["stages_skipped"] == ["supernet", "latency"]
    assert result["stages_run"] == ["search", "retrain", "export", "bench"]
    assert (run / "supernet" / "latest.json").stat().st_mtime_ns == supernet_ckpt, "the supernet was retrained"
    assert result["measured_ms"] <= result["budget_ms"]
    # The file handed over was timed as it is, on the target, and its upper bound is within the budget.
    deployed = result["deployed_latency"]
    assert deployed["measured"] and deployed["within_budget"] and deployed["bound_ms"] <= result["budget_ms"]
    assert deployed["target"] == result["target"] and deployed["batch_size"] == result["batch_size"]
    assert result["retrained_val_top1"] >= 80.0, result
    assert result["parity"]["passed"], result["parity"]
    onnx_path = run / "export" / "model.onnx"
    assert str(onnx_path) in result["files"] and result["serve_command"].endswith(str(onnx_path))

    _predict_real_digits(run, tmp_path)
    _serve_real_digit(onnx_path, tmp_path)

    # A third run has nothing left to do.
    again = json.loads(glit(*args, "--json").stdout.strip().splitlines()[-1])
    assert again["stages_run"] == [] and again["retrained_val_top1"] == result["retrained_val_top1"]
    # Other options on the same run are refused, not mixed in.
    refused = glit("pipeline", "--run", str(run), "--retrain-epochs", "4", check=False)
    assert refused.returncode == 2 and "other options" in refused.stderr


def _predict_real_digits(run: Path, tmp_path: Path) -> None:
    """The exported model classifies real digits from PNG files (validation images: never trained on)."""
    import numpy as np
    from PIL import Image

    from glit_deploy.data import load_digits_bundle

    bundle = load_digits_bundle()
    images = bundle.val.images.permute(0, 2, 3, 1).numpy()
    labels = bundle.val.labels.numpy()[:20]
    paths = []
    for i, label in enumerate(labels):
        path = tmp_path / f"digit{i}_{label}.png"
        Image.fromarray(np.ascontiguousarray(images[i])).save(path)
        paths.append(str(path))
    predictions = json.loads(glit("predict", "--run", str(run), "--json", *paths).stdout)
    top1 = [p["top_k"][0]["class"] for p in predictions["predictions"]]
    correct = sum(t == str(label) for t, label in zip(top1, labels, strict=True))
    assert correct >= 14, (top1, labels.tolist())


def _serve_real_digit(model: Path, tmp_path: Path) -> None:
    """`glit serve` on the pipeline's model answers a real image over HTTP on 127.0.0.1."""
    import numpy as np

    from glit_deploy.data import load_digits_bundle
    from tests.test_serve import Server, png_bytes

    bundle = load_digits_bundle()
    images = bundle.val.images.permute(0, 2, 3, 1).numpy()
    labels = bundle.val.labels.numpy()
    server = Server(model, tmp_path / "serve.log")
    try:
        files = [(f"digit{i}.png", png_bytes(np.ascontiguousarray(images[i]))) for i in range(8)]
        status, _, body = server.predict(files)
        assert status == 200, body
        classes = [p["top_k"][0]["class"] for p in body["predictions"]]
        assert sum(c == str(label) for c, label in zip(classes, labels[:8], strict=True)) >= 5, classes
    finally:
        assert server.stop() == 0
