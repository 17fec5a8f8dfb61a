"""What "measured" means, for every target, table entry, search winner and exported file.

The latency of a model is what a clock reads around one inference of the deployable graph at a
given batch size and thread count. A shared host is noisy in whole stretches, not run by run
(round medians of one file alternate between two levels for seconds at a time), so runs are
timed in many short rounds and the estimate is taken from the rounds the host left alone:

1. a round is `round_runs` consecutive runs lasting at least `Protocol.round_ms`; its median is
   the round's value;
2. the floor is the 10th percentile of the round values; a round more than `disturbed_tolerance`
   (5 %) above the floor is *disturbed*, and every other round *counts*, provided the rounds near the
   floor are more than `min_undisturbed_share` (half) of all rounds. When they are not, the slower
   state is the host's usual one rather than a disturbance (a shared host can spend most of its time
   in a slow state with nothing else running: BENCHMARKS.md sections 8 and 12), and every round
   counts: a deployed model meets the host's usual state, not its fast minority. Either way the
   median of all the round values is at most `1 + disturbed_tolerance` times the estimate;
3. the estimate (`median_ms`) is the median of the counted rounds' values, with a distribution-free
   95 % confidence interval from order statistics over those rounds; single-run percentiles (p90,
   p95, p99, with their own order-statistic upper bounds) are taken over the counted rounds' runs;
4. timing stops once at least `min_rounds` rounds ran over at least `min_seconds`, at least
   `min_counted` counted (holding at least `min_runs` single runs), and the interval lies within
   +-`ci_target` of the estimate, or when `max_seconds` is spent. The host's disturbances last
   seconds: a decision's measurement spans 2 s, so that a disturbed stretch shorter than that
   shows as disturbed rounds instead of as the whole measurement;
5. a model timed again later (a reading another reading contradicts, `glit_deploy.latency.budget`) is
   estimated from the rounds of all its timings together (`pooled`), by the same rule: a host that
   changed state between them counts in the state it spent most rounds in, not the one it was in last.

Nothing is rescaled: every number is a clock reading or an order statistic of clock readings.
How many rounds were disturbed, and the plain median of all runs, are reported next to it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Z95 = 1.959964  # two-sided 95 %
PERCENTILES = {"p90": 0.90, "p95": 0.95, "p99": 0.99}


@dataclass(frozen=True)
class Protocol:
    warmup: int = 10  # untimed runs (also size the rounds)
    min_rounds: int = 10
    min_counted: int = 6  # undisturbed rounds needed before the interval is trusted
    round_ms: float = 5.0  # a round lasts at least this long ...
    min_round_runs: int = 5  # ... and has at least this many runs
    max_round_runs: int = 200
    ci_target: float = 0.02  # stop when the 95 % interval is within +-2 % of the estimate
    max_seconds: float = 10.0  # time cap (the interval is then reported as it is)
    disturbed_tolerance: float = 0.05
    min_undisturbed_share: float = 0.5  # no more rounds near the floor than this: the slow state is usual
    min_runs: int = 0  # single runs needed in counted rounds (a tail percentile needs many)
    min_seconds: float = 0.0  # keep timing at least this long, so a disturbed stretch shorter than it is seen

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# A search winner or an exported file: measured over 2 s at least, until the interval is within +-2 %.
DECISION = Protocol(min_seconds=2.0)
# One entry of a latency table (about 200 per space): fewer rounds, a looser interval.
TABLE = Protocol(warmup=5, min_rounds=6, min_counted=4, ci_target=0.03, max_seconds=1.0)

Timer = Callable[[Callable[[], None]], float]  # times one run, in ms
Runner = tuple[Callable[[], None], Timer | None]  # one inference, and its timer (None: the host clock)


@dataclass(frozen=True)
class Timing:
    """Latency of one input batch, in milliseconds, by the rule in this module's docstring."""

    median_ms: float  # the estimate: median of the counted rounds' medians
    ci_low_ms: float  # its 95 % interval
    ci_high_ms: float
    p10_ms: float  # single runs of the counted rounds
    p90_ms: float
    p95_ms: float
    p99_ms: float
    runs: int  # single runs timed, all rounds
    counted_runs: int  # single runs in the counted rounds (what the percentiles are of)
    rounds: int
    disturbed_rounds: int
    all_runs_median_ms: float  # the plain median of every run, disturbed rounds included
    converged: bool = True  # False: the time cap ended timing before the interval reached the target
    upper_ms: dict[str, float] = field(default_factory=dict)  # 95 % upper bounds: median, p90, p95, p99
    near_floor_rounds: int | None = None  # rounds within the tolerance of the floor (None: recorded before)
    near_floor_median_ms: float | None = None  # their median: the host's fast state, counted or not
    # Every round's single runs, so that several timings of one model can be estimated as one (`pooled`);
    # kept in memory only (not in `to_dict`): records keep the summary.
    round_runs_ms: tuple[tuple[float, ...], ...] = field(default=(), repr=False, compare=False)

    @property
    def ci_half_width(self) -> float:
        """Largest distance from the estimate to an end of its interval, relative to the estimate."""
        if not self.median_ms:
            return 0.0
        return max(self.median_ms - self.ci_low_ms, self.ci_high_ms - self.median_ms) / self.median_ms

    def stat_ms(self, stat: str) -> float:
        """The estimate of `stat` (median, p90, p95 or p99)."""
        return self.median_ms if stat == "median" else getattr(self, f"{stat}_ms")

    def upper_bound_ms(self, stat: str) -> float:
        """The 95 % upper confidence bound of `stat`: what a budget is checked against."""
        return self.upper_ms.get(stat, self.stat_ms(stat) if stat != "median" else self.ci_high_ms)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        del record["round_runs_ms"]
        return record

    @classmethod
    def from_dict(cls, data: dict) -> Timing:
        return cls(**data)


def _percentile(ordered: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of sorted values: never outside their range."""
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _order_stat_bounds(n: int, q: float) -> tuple[int, int]:
    """0-based ranks (lo, hi) of a distribution-free ~95 % interval for the q-quantile of n values."""
    centre, sd = n * q, math.sqrt(n * q * (1 - q))
    lo = math.floor(centre - Z95 * sd) - 1
    hi = math.ceil(centre + Z95 * sd)
    return max(lo, 0), min(hi, n - 1)


def estimate(rounds: list[list[float]], tolerance: float = 0.05, converged: bool = True,
             min_undisturbed_share: float = 0.5) -> Timing:
    """The latency estimate of timed rounds (each a list of single-run ms), by the module's rule."""
    rounds = [r for r in rounds if r]
    if not rounds:
        raise ValueError("no timed runs to estimate a latency from")
    values = [statistics.median(r) for r in rounds]
    floor = _percentile(sorted(values), 0.10)
    near_floor = [r for r, v in zip(rounds, values, strict=True) if v <= floor * (1 + tolerance)]
    counted = near_floor if len(near_floor) > min_undisturbed_share * len(rounds) else rounds
    counted_values = sorted(statistics.median(r) for r in counted)
    lo, hi = _order_stat_bounds(len(counted_values), 0.5)
    singles = sorted(ms for r in counted for ms in r)
    everything = sorted(ms for r in rounds for ms in r)
    upper = {"median": counted_values[hi]}
    for name, q in PERCENTILES.items():
        upper[name] = singles[_order_stat_bounds(len(singles), q)[1]]
    return Timing(
        median_ms=statistics.median(counted_values), ci_low_ms=counted_values[lo], ci_high_ms=counted_values[hi],
        p10_ms=_percentile(singles, 0.10), p90_ms=_percentile(singles, 0.90), p95_ms=_percentile(singles, 0.95),
        p99_ms=_percentile(singles, 0.99), runs=len(everything), counted_runs=len(singles), rounds=len(rounds),
        disturbed_rounds=len(rounds) - len(counted), all_runs_median_ms=statistics.median(everything),
        converged=converged, upper_ms=upper, near_floor_rounds=len(near_floor),
        near_floor_median_ms=statistics.median(statistics.median(r) for r in near_floor),
        round_runs_ms=tuple(tuple(r) for r in rounds))


def pooled(timings: Sequence[Timing], tolerance: float = 0.05, min_undisturbed_share: float = 0.5) -> Timing:
    """One estimate, by the module's rule, of the rounds of several timings of one model taken at different
    times (a re-timing after a pause): a host that changes state between them is then timed in both states,
    and the state it was in for most rounds is the one that counts, rather than the one the last timing met."""
    if len(timings) == 1:
        return timings[0]
    if any(not t.round_runs_ms for t in timings):
        raise ValueError("a timing read back from a record has no rounds to pool")
    return estimate([list(r) for t in timings for r in t.round_runs_ms], tolerance,
                    all(t.converged for t in timings), min_undisturbed_share)


def summarise(samples_ms: list[float]) -> Timing:
    """A Timing of single runs with no round structure (each run its own round)."""
    return estimate([[s] for s in samples_ms])


def _round_runs(protocol: Protocol, per_run_ms: float) -> int:
    wanted = math.ceil(protocol.round_ms / max(per_run_ms, 1e-6))
    return min(max(wanted, protocol.min_round_runs), protocol.max_round_runs)


def _done(rounds: list[list[float]], protocol: Protocol, elapsed: float) -> bool:
    if len(rounds) < protocol.min_rounds or elapsed < protocol.min_seconds:
        return False
    timing = estimate(rounds, protocol.disturbed_tolerance, min_undisturbed_share=protocol.min_undisturbed_share)
    return timing.rounds - timing.disturbed_rounds >= protocol.min_counted and timing.ci_half_width <= \
        protocol.ci_target and timing.counted_runs >= protocol.min_runs


def time_runs(run: Callable[[], None], protocol: Protocol = DECISION, timer: Timer | None = None,
              clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Warm up, then time `run` in rounds until the estimate is precise enough or the time cap is spent.

    `timer(run)` returns one run's milliseconds; the default is the host's monotonic clock, right for
    synchronous runtimes. GPU targets pass a timer that records CUDA events. `clock` measures the
    time cap only (tests pass a fake one together with a fake timer).
    """
    timer = timer or host_timer
    warm = [timer(run) for _ in range(max(protocol.warmup, 1))]
    per_round = _round_runs(protocol, statistics.median(warm))
    started = clock()
    rounds: list[list[float]] = []
    while True:
        rounds.append([timer(run) for _ in range(per_round)])
        if _done(rounds, protocol, clock() - started):
            return estimate(rounds, protocol.disturbed_tolerance,
                            min_undisturbed_share=protocol.min_undisturbed_share)
        if clock() - started >= protocol.max_seconds and len(rounds) >= 3:
            return estimate(rounds, protocol.disturbed_tolerance, converged=False,
                            min_undisturbed_share=protocol.min_undisturbed_share)


def time_interleaved(runners: dict[str, Runner], protocol: Protocol) -> dict[str, Timing]:
    """Time several runners side by side, round by round, each with its own estimate.

    A shared machine drifts over seconds; timing runners one after another puts that drift into
    their ratios, interleaving spreads it over all of them. The order rotates every round. Each
    runner's rounds last `round_ms` (a fast runner runs several times a round). Timing stops when
    every runner meets the protocol's precision, or at the time cap.
    """
    names = list(runners)
    per_round: dict[str, int] = {}
    for name in names:
        run, timer = runners[name]
        warm = [(timer or host_timer)(run) for _ in range(max(protocol.warmup, 1))]
        per_round[name] = _round_runs(protocol, statistics.median(warm))
    rounds: dict[str, list[list[float]]] = {name: [] for name in names}
    started = time.perf_counter()
    r = 0
    while True:
        for name in names[r % len(names):] + names[:r % len(names)]:
            run, timer = runners[name]
            rounds[name].append([(timer or host_timer)(run) for _ in range(per_round[name])])
        r += 1
        if all(_done(rounds[name], protocol, time.perf_counter() - started) for name in names):
            converged = True
            break
        if time.perf_counter() - started >= protocol.max_seconds and r >= 3:
            converged = False
            break
    return {name: estimate(rounds[name], protocol.disturbed_tolerance, converged, protocol.min_undisturbed_share)
            for name in names}


def host_timer(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3
