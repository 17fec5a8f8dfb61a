"""The latency of the file that is handed over, on the target and under the budget it was searched for.

`glit export` times the ONNX file it is about to deploy, as it is, on the run's target (the
search's target, batch size and thread count), with the measurement every stage uses
(`glit_deploy.latency.measure`), and refuses a file whose budgeted statistic's 95 % upper bound
is over the budget of the search that chose its arch.

The search measured that arch's graph within the budget; when the file then measures over it,
two clock readings of one graph disagree, as they do when the host's load changes between them (a
shared host's load comes in stretches of seconds). The file is then timed again after a pause,
twice at most (`glit_deploy.latency.budget.timed_until_settled`); every attempt is recorded, and the
rounds of all of them, estimated together, decide (`glit_deploy.latency.measure.pooled`). A file the
search did not measure within the budget is decided by its first measurement.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glit_deploy.errors import GlitError
from glit_deploy.latency.budget import Budget, decision_protocol, latency_record, timed_until_settled
from glit_deploy.latency.measure import Timing, pooled
from glit_deploy.latency.targets import OrtTarget, default_target_name, get_target
from glit_deploy.rundir import RunDir
from glit_deploy.runtimes import RuntimeUnavailable
from glit_deploy.search.runner import latency_table_path


class LatencyBudgetError(GlitError):
    """The deployed file measured over the budget it was searched for."""


@dataclass(frozen=True)
class Deployment:
    """Where and how a run's model is deployed: the search's target settings and the model's budget."""

    target: str
    batch_size: int
    threads: int | None  # None: the target's default
    budget: Budget | None  # None: the model was not chosen under a budget
    precision: str = "fp32"
    searched: dict[str, Any] | None = None  # the search's measurement of this arch: its stat and bound_ms

    def contradicts_search(self, timing: Timing) -> bool:
        """Whether `timing` of the file fails the budget that the search measured this arch within."""
        if self.budget is None or self.searched is None or self.budget.accepts(timing):
            return False
        return self.searched.get("stat") == self.budget.stat and self.searched["bound_ms"] <= self.budget.ms

    @property
    def target_label(self) -> str:
        return self.target if self.precision == "fp32" else f"{self.target}-{self.precision}"

    @classmethod
    def of_run(cls, run: RunDir, label: str, precision: str = "fp32") -> Deployment:
        """From the run's search (target, batch size, the latency table's threads) and the model's label
        (a search winner is labelled by its budget); without a search, the default target at batch 1.

        The search's budget holds only for the precision it was searched at: a file exported at
        another precision is timed at its own, with no budget unless one is given."""
        summary_path = run.path / "search" / "summary.json"
        if not summary_path.exists():
            return cls(default_target_name(), 1, None, None, precision)
        summary = json.loads(summary_path.read_text())
        target, batch_size = summary["target"], int(summary["batch_size"])
        searched = summary.get("precision", "fp32")
        threads = None
        table = latency_table_path(run, target if searched == "fp32" else f"{target}-{searched}", batch_size)
        if table.exists():
            threads = json.loads(table.read_text()).get("key", {}).get("threads")
        budget, searched_latency = None, None
        winner = summary.get("budgets", {}).get(label, {})
        if winner.get("digest") and precision == searched:
            budget = Budget.from_label(label)
            latency = winner.get("latency", {})
            if latency.get("bound_ms") is not None:
                searched_latency = {"stat": latency.get("stat", budget.stat), "bound_ms": latency["bound_ms"]}
        return cls(target, batch_size, threads, budget, precision, searched_latency)


def searched_precision(run: RunDir) -> str:
    """The precision the run's search deployed at (fp32 without a search): what export writes by default."""
    summary_path = run.path / "search" / "summary.json"
    if not summary_path.exists():
        return "fp32"
    return json.loads(summary_path.read_text()).get("precision", "fp32")


def time_deployed_file(path: Path, deployment: Deployment,
                       report: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Time the ONNX file at `path` on the deployment's target; the record `export/model.json` keeps.

    A target that does not run ONNX files as they are (PyTorch; TensorRT, whose engine is timed when
    it is built) or whose runtime is missing here is recorded as not measured, with the reason.
    """
    base = {"target": deployment.target, "precision": deployment.precision, "batch_size": deployment.batch_size,
            "budget_ms": deployment.budget.ms if deployment.budget else None}
    try:
        target = get_target(deployment.target, deployment.threads, deployment.precision)
    except GlitError as exc:  # e.g. int8 on a target that does not deploy it
        return {**base, "measured": False, "reason": str(exc)}
    base["threads"] = target.threads
    if not isinstance(target, OrtTarget):
        return {**base, "measured": False,
                "reason": f"target {target.name} does not run the ONNX file as it is; time what it deploys"}
    protocol = decision_protocol([deployment.budget])

    def before_retime(timing: Timing, pause_s: float) -> None:
        report(f"the file measured {deployment.budget.bound_ms(timing):.4f} ms (95 % bound, every timing so far), "
               f"over the budget {deployment.budget} that the search measured this arch within "
               f"({deployment.searched['bound_ms']:.4f} ms); timing it again in {pause_s:g} s, in case the "
               f"host's load changed")

    try:
        attempts, decided = timed_until_settled(lambda: target.measure_file(path, deployment.batch_size, protocol),
                                                deployment.contradicts_search, before_retime, combine=pooled)
    except RuntimeUnavailable as exc:
        return {**base, "measured": False, "reason": str(exc)}
    record = {**base, "measured": True, **latency_record(decided, deployment.budget)}
    if deployment.searched is not None:
        record["searched_bound_ms"] = deployment.searched["bound_ms"]
    if len(attempts) > 1:
        record["attempts"] = [latency_record(t, deployment.budget) for t in attempts]
    return record


def over_budget_message(record: dict[str, Any]) -> str:
    on = record["target"] + (f" {record['precision']}" if record.get("precision", "fp32") != "fp32" else "")
    return (f"the exported file measured over its budget on {on} at batch {record['batch_size']} "
            f"({record['threads']} threads): {record['stat']} {record['estimate_ms']:.4f} ms, 95 % upper bound "
            f"{record['bound_ms']:.4f} ms > budget {record['budget_ms']:g} ms "
            f"({record['disturbed_rounds']} of {record['rounds']} rounds disturbed by other load)"
            + _attempts_clause(record))


def _attempts_clause(record: dict[str, Any]) -> str:
    attempts = record.get("attempts", [])
    if len(attempts) < 2:
        return ""
    bounds = ", ".join(f"{a['bound_ms']:.4f}" for a in attempts)
    room = 100 * (1 - record["searched_bound_ms"] / record["budget_ms"])
    return (f"; timed {len(attempts)} times because the search measured this arch within the budget "
            f"({record['searched_bound_ms']:.4f} ms), upper bounds {bounds} ms, all of their rounds together "
            f"{record['bound_ms']:.4f} ms: if the host was busy, export again when it is quieter; if not, its "
            f"timings drift more than the {room:.1f} % the winner kept under the budget: search again with a "
            f"larger --latency-margin")
