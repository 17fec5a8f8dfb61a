from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_DIR = REPO.parent / "shared" / "data" / "cifar10"


def glit(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    """Run the real `glit` CLI in a fresh interpreter."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "glit_deploy", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"glit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session", autouse=True)
def latency_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One latency-table cache for the whole session (and the CLI subprocesses it starts)."""
    path = tmp_path_factory.mktemp("glit-cache")
    os.environ["GLIT_CACHE_DIR"] = str(path)
    return path


# Small but real latency settings for tests: every block configuration is still measured.
FAST_LATENCY = ["--calibration-models", "4", "--holdout-models", "4", "--warmup", "3", "--runs", "10"]


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits supernet trained with the sandwich rule: shared by the evaluation tests."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    glit("train-supernet", "--run", str(run), "--space", "digits", "--data", "digits", "--epochs", "20",
         "--batch-size", "32", "--lr", "2e-3", "--sandwich", "--eval-every", "20", "--threads", "2")
    return run


@pytest.fixture
def run_copy(trained_digits_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(trained_digits_run, dst)
    return dst
