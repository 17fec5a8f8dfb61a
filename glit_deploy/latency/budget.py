"""Latency budgets and the decision whether a measured model meets one.

`5ms` constrains the median latency; `p99:8ms` (or p90, p95) constrains that percentile of
single-request latency. A model meets a budget only when the 95 % upper confidence bound of the
constrained statistic, as `glit_deploy.latency.measure` estimates it, is within the budget: a
measurement too noisy to tell is a "no".

A reading over the budget that another reading of the same model contradicts (the search measured
the exported arch within it; the latency table put a search candidate within it) is taken again
after a pause, twice at most (`timed_until_settled`): this host's load comes in stretches of seconds
that can outlast one measurement. Every attempt is a full measurement and is recorded, and the rounds
of all of them are estimated together (`glit_deploy.latency.measure.pooled`), which decides: a model
that stays over the budget is refused, and one that met the budget only in the last attempt's stretch
of a fast state is not accepted on that stretch alone (until 2026-12-03 the last attempt decided, and
three attempts fished for a fast stretch).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from glit_deploy.errors import GlitError
from glit_deploy.latency.measure import DECISION, PERCENTILES, Protocol, Timing, pooled

STATS = ("median", *PERCENTILES)
Reading = TypeVar("Reading")  # a Timing, or the Timings of models timed side by side


def parse_latency(text: str) -> float:
    """'5ms', '500us', '0.005s' or a bare number of milliseconds -> milliseconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|us|µs|s)?\s*", text)
    if not match:
        raise GlitError(f"latency budget '{text}' is not a duration like 5ms, 800us or 0.005s")
    value = float(match.group(1))
    ms = value * {"ms": 1.0, None: 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[match.group(2)]
    if ms <= 0:
        raise GlitError(f"latency budget '{text}' must be positive")
    return ms


def budget_label(ms: float, stat: str = "median") -> str:
    """File-name-safe label: '5ms' for a median budget, 'p99-8ms' for a percentile budget."""
    return f"{ms:g}ms" if stat == "median" else f"{stat}-{ms:g}ms"


@dataclass(frozen=True, order=True)
class Budget:
    ms: float
    stat: str = "median"

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'5ms' (median), 'p99:8ms', 'p95:800us', 'median:5ms'."""
        stat, sep, rest = text.partition(":")
        if not sep:
            return cls(parse_latency(text))
        stat = stat.strip().lower()
        if stat not in STATS:
            raise GlitError(f"latency budget '{text}': '{stat}' is not one of {', '.join(STATS)}")
        return cls(parse_latency(rest), stat)

    @classmethod
    def from_label(cls, label: str) -> Budget:
        """The budget a `label` names ('5ms', 'p99-8ms'; a median label may hold '-' as in '1e-05ms')."""
        stat, sep, rest = label.partition("-")
        return cls.parse(f"{stat}:{rest}" if sep and stat in STATS else label)

    @property
    def label(self) -> str:
        return budget_label(self.ms, self.stat)

    def __str__(self) -> str:
        return f"{self.ms:g} ms" if self.stat == "median" else f"{self.stat} {self.ms:g} ms"

    def limit_ms(self, margin: float) -> float:
        """What a candidate's bound must stay within: the budget less `margin` (a fraction), the room the
        search keeps for the host's drift. The search explores archs predicted within it, too."""
        return self.ms * (1 - margin)

    def bound_ms(self, timing: Timing) -> float:
        """The number compared with the budget: the upper 95 % bound of the budgeted statistic."""
        return timing.upper_bound_ms(self.stat)

    def accepts(self, timing: Timing) -> bool:
        return self.bound_ms(timing) <= self.ms

    def verdict(self, timing: Timing) -> dict[str, Any]:
        """What a report records: the budget, the statistic, its estimate and bound, and the decision."""
        return {"budget": self.label, "budget_ms": self.ms, "stat": self.stat,
                "estimate_ms": timing.stat_ms(self.stat), "bound_ms": self.bound_ms(timing),
                "within_budget": self.accepts(timing)}


def decision_protocol(budgets: Iterable[Budget | None] = ()) -> Protocol:
    """The protocol that decides these budgets: a percentile budget needs enough single runs that its
    upper bound is not simply the slowest run (20 runs beyond the percentile: 2,000 for p99)."""
    percentiles = [PERCENTILES[b.stat] for b in budgets if b is not None and b.stat != "median"]
    if not percentiles:
        return DECISION
    return replace(DECISION, min_runs=math.ceil(20 / (1 - max(percentiles))), max_seconds=60.0)


def latency_record(timing: Timing, budget: Budget | None) -> dict[str, Any]:
    """How a measured latency is reported wherever it is recorded (search winner, export/model.json)."""
    record = {"median_ms": timing.median_ms, "ci_ms": [timing.ci_low_ms, timing.ci_high_ms],
              "p90_ms": timing.p90_ms, "p95_ms": timing.p95_ms, "p99_ms": timing.p99_ms, "runs": timing.runs,
              "counted_runs": timing.counted_runs,
              "rounds": timing.rounds, "disturbed_rounds": timing.disturbed_rounds,
              "all_runs_median_ms": timing.all_runs_median_ms, "converged": timing.converged,
              "near_floor_rounds": timing.near_floor_rounds, "near_floor_median_ms": timing.near_floor_median_ms}
    if budget is not None:
        record.update(budget.verdict(timing))
    return record


RETIME_PAUSES_S = (5.0, 10.0)  # the pauses before the second and third timing of a contradicted reading


def slow_state_note(record: dict[str, Any]) -> str | None:
    """A note when every round of a timing (a `latency_record`) counted because the rounds near the fastest were
    a minority (`glit_deploy.latency.measure`'s rule): the latency is then the host's usual, slower state, and
    what it read in its fast minority is given beside it, since a quieter host may give that."""
    rounds, near = record.get("rounds") or 0, record.get("near_floor_rounds")
    if not rounds or near is None or near >= rounds or record.get("disturbed_rounds"):
        return None
    return (f"the host ran near its fastest in only {near} of {rounds} rounds (their median "
            f"{record['near_floor_median_ms']:.4f} ms), so its slower state is its usual one and the "
            f"{record['median_ms']:.4f} ms median counts every round. If other work was running, measuring again on "
            "a quiet host may admit a larger model")


def candidate_verdict(timing: Timing, budget: Budget, margin: float) -> dict[str, Any]:
    """The search's decision on a candidate's timing: the budgeted statistic's 95 % upper bound within the
    budget less `margin` (a fraction), so that the winner keeps room for the host's drift. Any process that
    picks archs under a budget and compares itself with the search (random search) decides with this."""
    verdict = budget.verdict(timing)
    verdict["within_budget"] = verdict["bound_ms"] <= budget.limit_ms(margin)
    return verdict


def table_corrected_candidates(rejected: Sequence[dict[str, Any]], remaining: Sequence[dict[str, Any]],
                               limit_ms: float, count: int) -> tuple[float, list[dict[str, Any]]]:
    """The second pass of a winner pick, once every one of the most accurate candidates measured over the
    limit: the clock's ratio to the latency table over them (the median of each rejected candidate's 95 %
    bound over its `predicted_ms`), and at most `count` of the `remaining` candidates, kept in their order
    (most accurate first), that the table multiplied by that ratio puts within `limit_ms`.

    A search pushes its candidates to the budget's edge, so a table that reads a few percent low on the
    host today rejects all of the most accurate ones, while slightly smaller candidates would fit. The
    ratio only chooses which candidates are measured next; each is still accepted on its own measurement.
    """
    ratio = clock_to_table_ratio(rejected)
    return ratio, [e for e in remaining if e["predicted_ms"] * ratio <= limit_ms][:count]


def clock_to_table_ratio(rejected: Sequence[dict[str, Any]]) -> float:
    """What the clock read against the latency table over rejected candidates (records with `bound_ms` and
    `predicted_ms`): the median of each one's 95 % bound over its prediction."""
    return statistics.median(r["bound_ms"] / r["predicted_ms"] for r in rejected)


def pick_by_measurement(first: Sequence[dict[str, Any]], remaining: Sequence[dict[str, Any]],
                        attempt: Callable[[dict[str, Any]], dict[str, Any] | None], rejected: list[dict[str, Any]],
                        limit_ms: float, count: int,
                        announce: Callable[[float, int], None] = lambda ratio, candidates: None,
                        ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The winner rule that the search and every process compared with it (random search) share: the
    `first` candidates in order, then, when all were rejected, the second pass over `remaining`
    (`table_corrected_candidates`). `attempt` measures one candidate and returns its winner record, or
    None after adding it to `rejected` (with `bound_ms` and `predicted_ms`). Returns the winner (None
    when none met the limit) and the second pass's record (empty when there was none); `announce` is
    told the ratio and the number of candidates before the second pass measures them."""
    accepted, second_pass = accepted_by_measurement(first, remaining, attempt, rejected, limit_ms, count, announce)
    return (accepted[0] if accepted else None), second_pass


def accepted_by_measurement(first: Sequence[dict[str, Any]], remaining: Sequence[dict[str, Any]],
                            attempt: Callable[[dict[str, Any]], dict[str, Any] | None],
                            rejected: list[dict[str, Any]], limit_ms: float, count: int,
                            announce: Callable[[float, int], None] = lambda ratio, candidates: None,
                            wanted: int = 1,
                            admits: Callable[[dict[str, Any], list[dict[str, Any]]], bool] | None = None,
                            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Up to `wanted` winner records by `pick_by_measurement`'s rule, most accurate first: the `first`
    candidates are measured in order until `wanted` met the limit; only when none did, the second pass.
    `admits(entry, accepted)` False postpones a candidate (not measured yet) to the end of its pass, where
    it tops up the accepted when too few others met the limit."""
    accepted: list[dict[str, Any]] = []

    def enough_after(entry: dict[str, Any]) -> bool:
        if (record := attempt(entry)) is not None:
            accepted.append(record)
        return len(accepted) == wanted

    def walk(entries: Sequence[dict[str, Any]]) -> None:
        postponed: list[dict[str, Any]] = []
        for entry in entries:
            if admits is not None and not admits(entry, accepted):
                postponed.append(entry)
            elif enough_after(entry):
                return
        for entry in postponed:
            if enough_after(entry):
                return

    walk(first)
    if accepted or not rejected or not remaining:
        return accepted, {}
    ratio, more = table_corrected_candidates(rejected, remaining, limit_ms, count)
    second_pass = {"table_ratio": ratio, "candidates": len(more)}
    announce(ratio, len(more))
    walk(more)
    return [{**record, "second_pass": second_pass} for record in accepted], second_pass


def timed_candidate(measure: Callable[[], Timing], predicted_ms: float, budget: Budget, margin: float,
                    before_retime: Callable[[Timing, float], None] = lambda timing, pause_s: None,
                    sleep: Callable[[float], None] = time.sleep) -> tuple[list[Timing], Timing]:
    """Every timing of one search candidate and the one that decides (`timed_until_settled`, the timings
    pooled): a median bound over the limit while the latency table predicts the candidate within it is a
    contradiction, timed again."""
    limit_ms = budget.limit_ms(margin)

    def contradicted(timing: Timing) -> bool:
        return budget.stat == "median" and predicted_ms <= limit_ms < budget.bound_ms(timing)

    return timed_until_settled(measure, contradicted, before_retime, sleep, combine=pooled)


def timed_until_settled(measure: Callable[[], Reading], contradicted: Callable[[Reading], bool],
                        before_retime: Callable[[Reading, float], None] = lambda timing, pause_s: None,
                        sleep: Callable[[float], None] = time.sleep,
                        combine: Callable[[list[Reading]], Reading] = lambda attempts: attempts[-1],
                        ) -> tuple[list[Reading], Reading]:
    """Every timing of one model (or of several side by side), in order, and the reading that decides:
    `combine` of them (`pooled` for a model's Timings; by default the last). One timing, or more while
    the deciding reading is `contradicted` (see the module docstring). `before_retime` is told each
    contradicted reading and the pause that follows it."""
    attempts = [measure()]
    decided = combine(attempts)
    for pause_s in RETIME_PAUSES_S:
        if not contradicted(decided):
            break
        before_retime(decided, pause_s)
        sleep(pause_s)
        attempts.append(measure())
        decided = combine(attempts)
    return attempts, decided
