from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glit_deploy.latency.budget import clock_to_table_ratio

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


# A host this much slower during a search than when its latency table was measured (`clock_to_table_ratio`, the
# search's second pass's ratio) may leave no candidate within a budget: what the rule should then say, not a failure.
SLOWER_HOST = 1.1


def skip_when_the_host_outran_its_table(proc: subprocess.CompletedProcess, run: Path) -> None:
    """A `glit search` (run with check=False) that failed because every candidate measured over its budget
    while the host ran slower than its latency table (other load: the clock, not the table, decides) is
    checked for that and skipped, since the winner's checks need a winner; any other failure fails."""
    if proc.returncode == 0:
        return
    summary_path = run / "search" / "summary.json"
    assert proc.returncode == 1 and summary_path.exists() and "Traceback" not in proc.stderr, proc.stderr
    (label, result), = json.loads(summary_path.read_text())["budgets"].items()
    assert result["digest"] is None and "none of the" in " ".join(proc.stderr.split()), proc.stderr
    rejected = result["rejected_over_budget"]
    assert rejected and all(not r["within_budget"] for r in rejected), result
    ratio = clock_to_table_ratio(rejected)
    assert ratio >= SLOWER_HOST, result
    pytest.skip(f"the host read {ratio:.2f}x its latency table during the search (other load), and every "
                f"candidate measured over {label}: refused as the rule says, so there is no winner to check")


# Small but real latency settings for tests: every block configuration is still measured.
FAST_LATENCY = ["--calibration-models", "4", "--holdout-models", "4", "--warmup", "3", "--rounds", "4"]


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits supernet trained with the sandwich rule: shared by the evaluation tests."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    reuse = os.environ.get("GLIT_TEST_TRAINED_RUN")  # local development only: a run this fixture trained before
    if reuse and not os.environ.get("CI"):
        shutil.copytree(reuse, run)
        return run
    glit("train-supernet", "--run", str(run), "--space", "digits", "--data", "digits", "--epochs", "20",
         "--batch-size", "32", "--lr", "2e-3", "--sandwich", "--eval-every", "20", "--threads", "2",
         timeout=1800)  # about 4 min on an idle 2-core machine; far longer when it is busy
    return run


@pytest.fixture
def run_copy(trained_digits_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(trained_digits_run, dst)
    return dst


@pytest.fixture(scope="session")
def deployable_digits_run(trained_digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run holding a deployable (retrained-layout) digits model: the supernet's largest subnet,
    BN recalibrated, saved where `glit retrain` saves. Export and serve tests start from it."""
    import torch

    from glit_deploy.nn import extreme_arch
    from glit_deploy.nn.supernet import recalibrate_bn
    from glit_deploy.rundir import RunDir
    from glit_deploy.train import calibration_batches, evaluate, load_supernet
    from glit_deploy.trained import TrainedModelInfo, save_trained_model

    run = tmp_path_factory.mktemp("runs") / "deployable"
    shutil.copytree(trained_digits_run, run)
    rundir = RunDir(run)
    supernet, bundle = load_supernet(rundir)
    arch = extreme_arch(supernet.space, True)
    device = torch.device("cpu")
    model = supernet.extract(arch)
    recalibrate_bn(model, calibration_batches(bundle, 64, 8, device))
    model.eval()
    from glit_deploy.data import make_loader

    top1 = evaluate(model, make_loader(bundle.val, 128, shuffle=False), device)
    info = TrainedModelInfo(label="largest", arch=arch, space=supernet.space, class_names=bundle.class_names,
                            mean=bundle.mean, std=bundle.std, image_size=bundle.image_size, data="digits",
                            val_top1=top1, extra={"source": "supernet extract (test fixture)"})
    save_trained_model(rundir, model, info)
    return run


@pytest.fixture
def deployable_copy(deployable_digits_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "deployable"
    shutil.copytree(deployable_digits_run, dst)
    return dst
