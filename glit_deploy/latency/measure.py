"""One timing protocol for every target: fixed threads, warm-up, many timed runs, median and spread."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Protocol:
    warmup: int = 10
    runs: int = 50
    min_seconds: float = 0.05  # keep timing past `runs` until this much was timed (tiny models)
    max_runs: int = 2000

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


Timer = Callable[[Callable[[], None]], float]  # times one run, in ms
Runner = tuple[Callable[[], None], Timer | None]  # one inference, and its timer (None: the host clock)


@dataclass(frozen=True)
class Timing:
    """Latency of one input batch, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    reference_ms: float | None = None  # median of a reference module timed interleaved with this one

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the run-to-run spread of this measurement."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def summarise(samples_ms: list[float]) -> Timing:
    ordered = sorted(samples_ms)
    deciles = statistics.quantiles(ordered, n=10) if len(ordered) > 1 else [ordered[0]] * 9
    return Timing(statistics.median(ordered), deciles[0], deciles[-1], len(ordered))


def time_runs(run: Callable[[], None], protocol: Protocol, timer: Timer | None = None) -> Timing:
    """Warm up, then time `run` at least `protocol.runs` times and `protocol.min_seconds` in all.

    `timer(run)` returns one run's milliseconds; the default is the host's monotonic clock, which
    is right for synchronous runtimes. GPU targets pass a timer that records CUDA events.
    """
    timer = timer or _host_timer
    for _ in range(protocol.warmup):
        run()
    samples: list[float] = []
    total = 0.0
    while len(samples) < protocol.max_runs and (len(samples) < protocol.runs or total < protocol.min_seconds * 1e3):
        ms = timer(run)
        samples.append(ms)
        total += ms
    return summarise(samples)


def time_interleaved(runners: dict[str, Runner], protocol: Protocol) -> dict[str, Timing]:
    """Time several runners side by side: `protocol.runs` rounds, each runner timed in every round.

    A shared machine drifts over seconds; timing the runners one after another puts that drift into
    their ratios, interleaving spreads it over all of them. The order rotates every round. A runner
    much faster than `min_seconds / runs` is timed several times per round so its total still
    reaches `min_seconds`. `runners` maps a name to (run, timer or None for the host clock).
    """
    names = list(runners)
    estimate: dict[str, float] = {}
    for name in names:
        run, timer = runners[name]
        for _ in range(max(protocol.warmup, 1)):
            estimate[name] = (timer or _host_timer)(run)
    rounds = max(protocol.runs, 1)
    per_round = {name: min(max(1, math.ceil(protocol.min_seconds * 1e3 / (rounds * max(estimate[name], 1e-6)))),
                           max(protocol.max_runs // rounds, 1)) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run, timer = runners[name]
            samples[name].extend((timer or _host_timer)(run) for _ in range(per_round[name]))
    return {name: summarise(values) for name, values in samples.items()}


def _host_timer(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3
