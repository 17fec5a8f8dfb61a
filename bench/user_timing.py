"""Does the budget hold for the file a user gets, timed the way the user would time it?

Takes an exported ONNX file (`glit export`'s `export/model.onnx`, with its `model.json` next to it for the
budget) and alternates, `--loops` times:

1. a plain loop, as a user would write it: a fresh `onnxruntime.InferenceSession` at the same thread count
   and `--runs` inferences, each timed with `time.perf_counter`; its median, p10 and p90;
2. the project's measurement (`glit_deploy.latency.measure.time_runs` on `Target.file_runner`, the code
   behind `glit export` and `glit latency measure --model`), with every run's reading kept, so that the same
   rounds are estimated by today's rule and by the rule before 2026-12-03 (the rounds near the fastest
   counted however few they were: `min_undisturbed_share=0`);
3. with a budget, the export's whole gate (`glit_deploy.export.deployed_latency.time_deployed_file`, as
   `glit export` runs it after a search that measured the arch within the budget: a reading over it is
   timed again after a pause, twice at most, and all the rounds together decide), accepted or refused.

A gate that holds its promise refuses the file in the loops where the plain loop reads it over the budget.

It reports, per loop, those figures, whether each is within the budget, and the load average; then how
many plain loops were over the budget, how far each rule's estimate sat from the plain median, and how
often the plain loop read over the budget right after the gate accepted the file.

    python bench/user_timing.py --model runs/digits/export/model.onnx --loops 9 --runs 3000 \\
        --json-out bench/out/user_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from glit_deploy.atomic_io import atomic_write_json
from glit_deploy.export.deployed_latency import Deployment, time_deployed_file
from glit_deploy.latency import get_target
from glit_deploy.latency.budget import Budget, decision_protocol
from glit_deploy.latency.measure import Timing, estimate, host_timer, time_runs
from glit_deploy.runtimes import cpu_name, import_onnxruntime

console = Console(width=160)


def plain_loop(path: Path, threads: int, runs: int) -> dict[str, float]:
    """What a user's own timing loop reads: a fresh session, `runs` inferences, perf_counter around each."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in spec.shape]
    feed = {spec.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    for _ in range(20):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered), "p10_ms": ordered[len(ordered) // 10],
            "p90_ms": ordered[(9 * len(ordered)) // 10], "runs": runs}


def project_measurement(path: Path, threads: int, budget: Budget | None) -> tuple[Timing, Timing]:
    """The project's measurement of the file, estimated by today's rule and by the earlier one, on the very
    same rounds."""
    target = get_target("ort-cpu", threads)
    run, timer = target.file_runner(path, 1)
    protocol = decision_protocol([budget])
    readings: list[float] = []

    def recording(fn: Callable[[], None]) -> float:
        ms = (timer or host_timer)(fn)
        readings.append(ms)
        return ms

    today = time_runs(run, protocol, recording)
    per_round = today.runs // today.rounds
    timed = readings[len(readings) - today.runs:]  # the warm-up runs come first
    rounds = [timed[i:i + per_round] for i in range(0, len(timed), per_round)]
    earlier = estimate(rounds, protocol.disturbed_tolerance, today.converged, min_undisturbed_share=0.0)
    check = estimate(rounds, protocol.disturbed_tolerance, today.converged, protocol.min_undisturbed_share)
    assert check.median_ms == today.median_ms, "the recorded rounds are not the rounds that were estimated"
    return today, earlier


def _gate_cell(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return ""
    verdict = "accepted" if gate["within_budget"] else "REFUSED"
    return f"{gate['bound_ms']:.4f} {verdict} ({len(gate.get('attempts', [])) or 1})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported ONNX file (export/model.onnx)")
    parser.add_argument("--budget-ms", type=float, help="default: the budget in the model.json next to the file")
    parser.add_argument("--threads", type=int, help="default: the threads model.json recorded, else 1")
    parser.add_argument("--loops", type=int, default=9)
    parser.add_argument("--runs", type=int, default=3000, help="inferences in each plain loop")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    sidecar = args.model.with_name("model.json")
    recorded = json.loads(sidecar.read_text()).get("latency", {}) if sidecar.exists() else {}
    budget_ms = args.budget_ms or recorded.get("budget_ms")
    budget = Budget(budget_ms) if budget_ms else None
    threads = args.threads or recorded.get("threads") or 1
    rows: list[dict[str, Any]] = []
    with console.status("timing") as status:
        for loop in range(args.loops):
            status.update(f"loop {loop + 1} of {args.loops}")
            plain = plain_loop(args.model, threads, args.runs)
            today, earlier = project_measurement(args.model, threads, budget)
            gate = None
            if budget is not None:
                deployment = Deployment("ort-cpu", 1, threads, budget,
                                        searched={"stat": "median", "bound_ms": recorded.get("searched_bound_ms",
                                                                                             budget.ms)})
                gate = time_deployed_file(args.model, deployment)
            # The plain loop again, right after the gate: what the user reads once the file is handed over.
            after = plain_loop(args.model, threads, args.runs) if gate is not None else None
            rows.append({"loop": loop + 1, "load_average": os.getloadavg()[0], "plain": plain,
                         "today": today.to_dict(), "earlier": earlier.to_dict(), "gate": gate, "plain_after": after})

    table = Table(title=f"{args.model}: budget {budget_ms} ms, {threads} thread(s), {cpu_name()}")
    for column in ("loop", "load", "plain median", "plain p10-p90", "today's rule (bound)", "near-floor rounds",
                   "earlier rule (bound)", "export gate (timings)", "plain after it"):
        table.add_column(column, justify="right")

    def mark(ms: float) -> str:
        return "" if budget_ms is None else (" ok" if ms <= budget_ms else " OVER")

    for r in rows:
        p, t, e = r["plain"], r["today"], r["earlier"]
        table.add_row(str(r["loop"]), f"{r['load_average']:.2f}", f"{p['median_ms']:.4f}{mark(p['median_ms'])}",
                      f"{p['p10_ms']:.4f}-{p['p90_ms']:.4f}",
                      f"{t['median_ms']:.4f} ({t['ci_high_ms']:.4f}){mark(t['ci_high_ms'])}",
                      f"{t['near_floor_rounds']} of {t['rounds']}",
                      f"{e['median_ms']:.4f} ({e['ci_high_ms']:.4f}){mark(e['ci_high_ms'])}",
                      _gate_cell(r["gate"]),
                      "" if r["plain_after"] is None else f"{r['plain_after']['median_ms']:.4f}"
                      f"{mark(r['plain_after']['median_ms'])}")
    console.print(table)
    summary: dict[str, Any] = {}
    for rule in ("today", "earlier"):
        ratios = [r[rule]["median_ms"] / r["plain"]["median_ms"] for r in rows]
        summary[rule] = {"estimate_over_plain_median": {"min": min(ratios), "median": statistics.median(ratios),
                                                         "max": max(ratios)}}
        if budget_ms:
            summary[rule]["within_budget"] = sum(r[rule]["ci_high_ms"] <= budget_ms for r in rows)
    if budget_ms:
        summary["plain_over_budget"] = sum(r["plain"]["median_ms"] > budget_ms for r in rows)
        accepted = [r for r in rows if r["gate"]["within_budget"]]
        summary["gate"] = {"accepted": len(accepted), "refused": len(rows) - len(accepted),
                           "plain_after_over_budget_when_accepted":
                               sum(r["plain_after"]["median_ms"] > budget_ms for r in accepted),
                           "plain_after_over_budget_when_refused":
                               sum(r["plain_after"]["median_ms"] > budget_ms for r in rows if r not in accepted)}
    for rule in ("today", "earlier"):
        q = summary[rule]["estimate_over_plain_median"]
        console.print(f"{'today' if rule == 'today' else 'the earlier'} rule: estimate / plain median "
                      f"{q['min']:.3f}-{q['max']:.3f} (median {q['median']:.3f})"
                      + (f"; bound within the budget in {summary[rule]['within_budget']} of {len(rows)} loops"
                         if budget_ms else ""))
    if budget_ms:
        console.print(f"plain loops over the budget: {summary['plain_over_budget']} of {len(rows)}")
        g = summary["gate"]
        console.print(f"the export's gate accepted the file in {g['accepted']} of {len(rows)} loops; the plain "
                      f"loop right after read over the budget in {g['plain_after_over_budget_when_accepted']} of "
                      f"those, and in {g['plain_after_over_budget_when_refused']} of the {g['refused']} refused")
    if args.json_out:
        atomic_write_json(args.json_out, {
            "about": "bench/user_timing.py", "model": str(args.model), "budget_ms": budget_ms, "threads": threads,
            "runs_per_loop": args.runs, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "recorded": recorded, "rows": rows, "summary": summary,
            "protocol": decision_protocol([budget]).to_dict()})


if __name__ == "__main__":
    main()
