from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from glit_deploy.errors import GlitError
from glit_deploy.latency import LatencyModel
from glit_deploy.search import parse_latency
from glit_deploy.search.pareto import pareto_front
from glit_deploy.space import Arch, get_space

from .conftest import FAST_LATENCY, REPO, glit, skip_when_the_host_outran_its_table

SMALL_SEARCH = ["--population", "8", "--generations", "3", "--parents", "4", "--mutations", "4", "--crossovers", "4",
                "--calib-batches", "2", "--threads", "1", *FAST_LATENCY]


def test_parse_latency() -> None:
    assert parse_latency("5ms") == 5.0 and parse_latency("800us") == pytest.approx(0.8)
    assert parse_latency("0.005s") == pytest.approx(5.0) and parse_latency("2.5") == 2.5
    for bad in ("fast", "-1ms", "0ms", "5 parsecs"):
        with pytest.raises(GlitError):
            parse_latency(bad)


def test_pareto_front() -> None:
    points = [{"predicted_ms": 1, "top1": 50}, {"predicted_ms": 2, "top1": 40}, {"predicted_ms": 2, "top1": 70},
              {"predicted_ms": 3, "top1": 60}, {"predicted_ms": 4, "top1": 80}]
    assert [(p["predicted_ms"], p["top1"]) for p in pareto_front(points)] == [(1, 50), (2, 70), (4, 80)]


def _table(run: Path, target: str) -> LatencyModel:
    glit("latency", "profile", "--run", str(run), "--target", target, "--threads", "1", *FAST_LATENCY)
    return LatencyModel.load(run / "latency" / f"{target}-b1.json")


@pytest.mark.parametrize("target", ["ort-cpu", "torch-cpu"])
def test_two_level_search_returns_a_measured_winner_within_budget(run_copy: Path, target: str) -> None:
    space = get_space("digits")
    table = _table(run_copy, target)
    lo, hi = table.block_range_ms(space, True), table.block_range_ms(space, False)
    budget = round(lo + 0.4 * (hi - lo), 4)  # the budget as the command line gives it, to compare with exactly
    # On torch-cpu, level 1's split is chosen by fine-tuning its two most accurate (a few steps: the path).
    splits = ["--finetune-splits", "2", "--finetune-steps", "3"] if target == "torch-cpu" else []
    proc = glit("search", "--run", str(run_copy), "--latency-budget", f"{budget:.4f}ms", "--target", target,
                *SMALL_SEARCH, *splits, check=False)
    skip_when_the_host_outran_its_table(proc, run_copy)
    assert "Pareto front" in proc.stdout
    search_dir = run_copy / "search"
    summary = json.loads((search_dir / "summary.json").read_text())
    (label, winner), = summary["budgets"].items()
    assert winner["predicted_ms"] <= winner["budget_ms"]
    # Accepted on the upper bound of the measured interval, which the record carries.
    lat = winner["latency"]
    assert lat["within_budget"] and lat["stat"] == "median" and lat["ci_ms"][1] == lat["bound_ms"] <= budget + 1e-4
    assert lat["ci_ms"][0] <= winner["measured_ms"] == lat["median_ms"] <= lat["ci_ms"][1]
    assert winner["budget_ms"] == pytest.approx(budget, abs=1e-4)
    best = Arch.load(search_dir / f"best-{label}.json")
    space.validate(best)
    assert best.digest == winner["digest"]
    history = json.loads((search_dir / "history.json").read_text())
    # Level 2 kept level 1's split and only changed the details.
    assert all(h["split"] == summary["level1"][label]["split"] for h in history if h["level"] == 2)
    assert {h["level"] for h in history} == {1, 2}
    if splits:
        assert proc.stderr.count("fine-tuning candidate") == 2 and "finetuned_top1" in summary["level1"][label]
    assert all(h["predicted_ms"] <= budget for h in history)  # nothing over budget was evaluated
    scored = {(h["weights"], h["digest"]) for h in history}
    assert len(scored) == summary["evaluated"]  # never evaluated twice: a second appearance reuses the score
    # Level 2 starts from level 1's best, and the winner is the best of the budget's candidates not rejected.
    level1_best = Arch.from_dict(summary["level1"][label]["arch"]).digest
    assert any(h["digest"] == level1_best for h in history if h["level"] == 2)
    rejected = {r["digest"] for r in winner["rejected_over_budget"]}
    assert winner["top1"] == max(h["top1"] for h in history if h["digest"] not in rejected)
    assert (search_dir / "pareto.png").stat().st_size > 0
    front = json.loads((search_dir / "pareto.json").read_text())["front"]
    assert front and all(a["predicted_ms"] <= b["predicted_ms"] and a["top1"] < b["top1"]
                         for a, b in itertools.pairwise(front))
    # A finished search is not silently redone or overwritten.
    again = glit("search", "--run", str(run_copy), "--latency-budget", f"{budget:.4f}ms", "--target", target,
                 *SMALL_SEARCH, *splits, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_infeasible_budget_fails_at_once_with_the_range(run_copy: Path) -> None:
    started = time.time()
    proc = glit("search", "--run", str(run_copy), "--latency-budget", "1us", "--target", "ort-cpu",
                *SMALL_SEARCH, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "below the fastest arch of space 'digits'" in proc.stderr and "spans" in proc.stderr
    assert time.time() - started < 120
    assert not (run_copy / "search" / "state.json").exists()
    bad = glit("search", "--run", str(run_copy), "--latency-budget", "soon", check=False)
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def _search_cmd(run: Path, budget: str) -> list[str]:
    return [sys.executable, "-m", "glit_deploy", "search", "--run", str(run), "--latency-budget", budget,
            "--target", "ort-cpu", "--population", "8", "--generations", "4", "--parents", "4",
            "--mutations", "4", "--crossovers", "4", "--calib-batches", "2", "--threads", "1", "--seed", "5",
            *FAST_LATENCY]


def _reference_table(run: Path) -> list[str]:
    """Search on the table the reference search used: two searches compared step by step must share one
    table, and the cache may measure it again in between (its host check on a shared host)."""
    return ["--latency-table", str(run / "latency" / "ort-cpu-b1.json")]


def _reference_search(run: Path, copy: Path) -> str:
    """Copy the run aside, then search the original uninterrupted; returns the budget used."""
    shutil.copytree(run, copy)
    table = _table(run, "ort-cpu")
    # A generous budget: the winner's end-to-end check cannot flip on measurement noise.
    budget = f"{2 * table.block_range_ms(get_space('digits'), False):.4f}ms"
    subprocess.run(_search_cmd(run, budget), check=True, capture_output=True, cwd=REPO, timeout=600)
    return budget


def _kill_when(cmd: list[str], state_path: Path, reached: Callable[[dict], bool]) -> None:
    """Start `cmd`, SIGKILL it as soon as its saved search cursor satisfies `reached`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = None
        if state and reached(state["cursor"]):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_search_resumes_to_the_same_result(run_copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    budget = _reference_search(run_copy, other)

    state_path = other / "search" / "state.json"
    _kill_when([*_search_cmd(other, budget), *_reference_table(run_copy)], state_path,
               lambda c: c["level"] == 1 and c["generation"] >= 2)
    assert not json.loads(state_path.read_text())["done"], "the search finished before it was killed"
    # The resume reads the table the search started with (the run's copy), not a cache that is gone now.
    empty_cache = {**os.environ, "GLIT_CACHE_DIR": str(tmp_path / "no-cache")}
    changed = subprocess.run([*_search_cmd(other, budget), "--resume", "--population", "9"], capture_output=True,
                             text=True, cwd=REPO, timeout=600, env=empty_cache)
    assert changed.returncode == 2 and "population 8 -> 9" in changed.stderr and "Traceback" not in changed.stderr
    started = time.time()
    subprocess.run([*_search_cmd(other, budget), "--resume"], check=True, capture_output=True, cwd=REPO, timeout=600,
                   env=empty_cache)
    assert not (tmp_path / "no-cache").exists() or not any((tmp_path / "no-cache").rglob("*.json"))
    assert time.time() - started < 300

    a = json.loads((run_copy / "search" / "state.json").read_text())
    b = json.loads(state_path.read_text())
    assert a["history"] == b["history"]
    assert a["level1"] == b["level1"] and a["evaluations"].keys() == b["evaluations"].keys()
    wa, wb = a["results"][next(iter(a["results"]))], b["results"][next(iter(b["results"]))]
    assert wa["digest"] == wb["digest"] and wa["top1"] == wb["top1"]


def test_level2_epochs_search_killed_in_level2_resumes_on_the_fine_tuned_weights(run_copy: Path,
                                                                                   tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    table = _table(run_copy, "ort-cpu")
    budget = f"{2 * table.block_range_ms(get_space('digits'), False):.4f}ms"
    cmd = [*_search_cmd(run_copy, budget), "--level2-epochs", "1"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=600)
    state_path = other / "search" / "state.json"
    resumed_cmd = [*_search_cmd(other, budget), "--level2-epochs", "1"]
    _kill_when([*resumed_cmd, *_reference_table(run_copy)], state_path,
               lambda c: c["level"] == 2 and c["generation"] >= 1)
    assert not json.loads(state_path.read_text())["done"], "the search finished before it was killed"
    subprocess.run([*resumed_cmd, "--resume"], check=True, capture_output=True, cwd=REPO, timeout=600)
    a = json.loads((run_copy / "search" / "state.json").read_text())
    b = json.loads(state_path.read_text())
    assert a["history"] == b["history"]
    (label, wa), = a["results"].items()
    wb = b["results"][label]
    split = "".join(map(str, a["level1"][label]["split"]))
    assert wa["digest"] == wb["digest"] and wa["top1"] == wb["top1"] and wa["weights"] == f"split{split}-e1"
    assert {h["weights"] for h in a["history"] if h["level"] == 2} == {f"split{split}-e1"}


def test_torchrun_shards_the_population_and_matches_one_process(run_copy: Path, tmp_path: Path) -> None:
    ddp = tmp_path / "ddp"
    budget = _reference_search(run_copy, ddp)
    args = [*_search_cmd(ddp, budget)[3:], *_reference_table(run_copy)]  # drop `python -m glit_deploy`
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "glit_deploy", "--", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((run_copy / "search" / "state.json").read_text())
    b = json.loads((ddp / "search" / "state.json").read_text())
    # Each rank scored half of every population; the gathered scores equal one process's.
    assert a["history"] == b["history"] and a["level1"] == b["level1"]
    # The table as given: the run keeps an identical copy.
    assert LatencyModel.load(ddp / "latency" / "ort-cpu-b1.json").to_dict() == \
        LatencyModel.load(run_copy / "latency" / "ort-cpu-b1.json").to_dict()


def test_a_given_latency_table_measured_with_other_settings_is_refused(run_copy: Path, tmp_path: Path) -> None:
    table = _table(run_copy, "ort-cpu")
    budget = f"{2 * table.block_range_ms(get_space('digits'), False):.4f}ms"
    given = tmp_path / "table.json"
    shutil.copy(run_copy / "latency" / "ort-cpu-b1.json", given)
    cmd = [*_search_cmd(run_copy, budget), "--latency-table", str(given)]
    other_threads = subprocess.run([*cmd, "--threads", "2"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert other_threads.returncode == 2 and "Traceback" not in other_threads.stderr
    assert "measured with other settings (threads: 1 -> 2)" in other_threads.stderr
    missing = subprocess.run([*_search_cmd(run_copy, budget), "--latency-table", str(tmp_path / "nope.json")],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (run_copy / "search" / "state.json").exists()


def test_fixed_split_and_auto_budget(run_copy: Path) -> None:
    space = get_space("digits")
    table = _table(run_copy, "ort-cpu")
    # With the fine-tuned fitness on its two most accurate candidates (a few steps: the path, not its value).
    proc = glit("search", "--run", str(run_copy), "--latency-budget", "auto", "--target", "ort-cpu",
                "--fixed-split", "3,3,3,3", "--finetune-top", "2", "--finetune-steps", "3", *SMALL_SEARCH,
                check=False)
    skip_when_the_host_outran_its_table(proc, run_copy)
    summary = json.loads((run_copy / "search" / "summary.json").read_text())
    (winner,) = summary["budgets"].values()
    state = json.loads((run_copy / "search" / "state.json").read_text())
    # Only candidates measured within the budget are fine-tuned: two, unless fewer than two of them were.
    tuned = len(state["finetuned"])
    assert 1 <= tuned <= 2 and winner["finetuned_top1"] == max(state["finetuned"].values())
    assert len(winner["finetuned_candidates"]) == tuned and winner["latency"]["within_budget"]
    assert proc.stderr.count("fine-tuning candidate") == tuned  # each said before it runs
    lo, hi = table.block_range_ms(space, True), table.block_range_ms(space, False)
    assert winner["budget_ms"] == pytest.approx(lo + 0.5 * (hi - lo), abs=1e-3)
    assert summary["level1"] == {}  # level 1 skipped
    history = json.loads((run_copy / "search" / "history.json").read_text())
    assert all(h["split"] == [3, 3, 3, 3] for h in history)
    bad = glit("search", "--run", str(run_copy), "--latency-budget", "auto", "--fixed-split", "3,9,3,3",
               "--resume", check=False)
    assert bad.returncode == 2 and "global_heads=9" in bad.stderr
