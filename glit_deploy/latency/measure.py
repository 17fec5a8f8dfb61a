"""One timing protocol for every target: fixed threads, warm-up, many timed runs, median and spread."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Timing:
    """Latency of one input batch, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

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


def time_runs(run: Callable[[], None], protocol: Protocol,
              timer: Callable[[Callable[[], None]], float] | None = None) -> Timing:
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


def _host_timer(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3
