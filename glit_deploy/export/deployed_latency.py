"""The latency of the file that is handed over, on the target and under the budget it was searched for.

`glit export` times the ONNX file it is about to deploy, as it is, on the run's target (the
search's target, batch size and thread count), with the measurement every stage uses
(`glit_deploy.latency.measure`), and refuses a file whose budgeted statistic's 95 % upper bound
is over the budget of the search that chose its arch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glit_deploy.errors import GlitError
from glit_deploy.latency.budget import Budget, decision_protocol, latency_record
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
        budget = None
        if summary.get("budgets", {}).get(label, {}).get("digest") and precision == searched:
            budget = Budget.from_label(label)
        return cls(target, batch_size, threads, budget, precision)


def searched_precision(run: RunDir) -> str:
    """The precision the run's search deployed at (fp32 without a search): what export writes by default."""
    summary_path = run.path / "search" / "summary.json"
    if not summary_path.exists():
        return "fp32"
    return json.loads(summary_path.read_text()).get("precision", "fp32")


def time_deployed_file(path: Path, deployment: Deployment) -> dict[str, Any]:
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
    try:
        timing = target.measure_file(path, deployment.batch_size, decision_protocol([deployment.budget]))
    except RuntimeUnavailable as exc:
        return {**base, "measured": False, "reason": str(exc)}
    return {**base, "measured": True, **latency_record(timing, deployment.budget)}


def over_budget_message(record: dict[str, Any]) -> str:
    on = record["target"] + (f" {record['precision']}" if record.get("precision", "fp32") != "fp32" else "")
    return (f"the exported file measured over its budget on {on} at batch {record['batch_size']} "
            f"({record['threads']} threads): {record['stat']} {record['estimate_ms']:.4f} ms, 95 % upper bound "
            f"{record['bound_ms']:.4f} ms > budget {record['budget_ms']:g} ms "
            f"({record['disturbed_rounds']} of {record['rounds']} rounds disturbed by other load)")
