"""The latency model: a per-block lookup table measured on the target, calibrated end to end.

Every distinct block configuration of the space is timed at its real token count and width, plus
the stem and the head. A model's raw prediction is the sum of its parts; a linear calibration
(fitted on whole models measured end to end, by relative error) absorbs what the parts miss
(per-session overhead, cache effects). Its error is reported on other, held-out whole models,
next to the measurement's own repeat noise.

Every entry is a measurement in the one sense of `glit_deploy.latency.measure` (the clock's
reading of the deployable graph, estimated from the rounds a shared host left undisturbed; the
table protocol asks for a looser interval than a budget decision). Nothing is rescaled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from glit_deploy.atomic_io import atomic_write_json
from glit_deploy.errors import GlitError
from glit_deploy.latency.budget import timed_until_settled
from glit_deploy.latency.measure import DECISION, TABLE, Protocol, Timing
from glit_deploy.latency.targets import Target
from glit_deploy.nn.counting import extreme_arch
from glit_deploy.nn.layers import LN_EPS, Block
from glit_deploy.nn.model import GLiT, Stem
from glit_deploy.space import Arch, BlockGenes, SearchSpace

console = Console(stderr=True)
# 2: onnxruntime/TensorRT targets time the deployed (rewritten) graph; 3: CPU timings normalised to a reference;
# 4: clock readings of the deployable graph (dynamic batch axis), estimated from undisturbed rounds
FORMAT_VERSION = 4


def block_key(genes: BlockGenes) -> str:
    return json.dumps(genes.to_dict(), sort_keys=True, separators=(",", ":"))


class Head(nn.Module):
    """Final norm, cls token and classifier: the end of every GLiT."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x)[:, 0])


@dataclass
class ErrorReport:
    """Held-out error of the latency model, and the noise of measuring the same model twice."""

    models: int
    mape: float  # mean absolute percentage error
    worst: float  # largest absolute percentage error
    within_5: float  # share of models predicted within +-5 %
    within_10: float
    noise: float  # mean absolute percentage difference between two measurements of one model
    points: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_points(cls, points: list[dict[str, Any]]) -> ErrorReport:
        errors = [abs(p["predicted_ms"] / p["measured_ms"] - 1) * 100 for p in points]
        noise = [abs(p["repeat_ms"] / p["measured_ms"] - 1) * 100 for p in points]
        return cls(models=len(points), mape=statistics.fmean(errors), worst=max(errors),
                   within_5=sum(e <= 5 for e in errors) / len(errors),
                   within_10=sum(e <= 10 for e in errors) / len(errors),
                   noise=statistics.fmean(noise), points=points)


@dataclass
class LatencyModel:
    key: dict[str, Any]
    block_ms: dict[str, float]
    stem_ms: float
    head_ms: float
    scale: float = 1.0
    offset_ms: float = 0.0
    calibration: list[dict[str, Any]] = field(default_factory=list)
    report: ErrorReport | None = None
    build_seconds: float = 0.0
    disturbed_rounds: int = 0  # rounds the host disturbed during the build (left out of the estimates) ...
    rounds: int = 0  # ... out of this many
    cache_hit: bool = False
    host_check: dict[str, Any] | None = None  # a cached table's models timed again here (`check_host`)

    # prediction -----------------------------------------------------------------------------
    def raw_ms(self, arch: Arch) -> float:
        try:
            return self.stem_ms + self.head_ms + sum(self.block_ms[block_key(b)] for b in arch.blocks)
        except KeyError as exc:
            raise GlitError(f"the latency table has no entry for block {exc.args[0]}: profile this space") from None

    def predict_ms(self, arch: Arch) -> float:
        return self.scale * self.raw_ms(arch) + self.offset_ms

    def block_range_ms(self, space: SearchSpace, fastest: bool) -> float:
        """Predicted latency of the fastest (or slowest) arch: blocks are additive, so per block."""
        pick = min if fastest else max
        per_block = pick(self.block_ms[block_key(b)] for b in space.block_choices())
        return self.scale * (self.stem_ms + self.head_ms + space.depth * per_block) + self.offset_ms

    def fastest_arch(self, space: SearchSpace, split: tuple[int, ...] | None = None) -> Arch:
        """The arch with the lowest predicted latency (optionally for a fixed split)."""
        blocks = []
        for i in range(space.depth):
            choices = space.block_choices(None if split is None else split[i])
            blocks.append(min(choices, key=lambda b: self.block_ms[block_key(b)]))
        return Arch(tuple(blocks))

    # persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cache_hit")
        data.pop("host_check")
        data["format"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyModel:
        data = {k: v for k, v in data.items() if k != "format"}
        report = data.pop("report", None)
        return cls(**data, report=ErrorReport(**report) if report else None)

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> LatencyModel:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise GlitError(f"latency table {path} does not exist: run `glit latency profile` first") from None
        except json.JSONDecodeError as exc:
            raise GlitError(f"latency table {path} is corrupt ({exc.msg})") from None
        if data.get("format") != FORMAT_VERSION:
            raise GlitError(f"latency table {path} has format {data.get('format')}, expected {FORMAT_VERSION}")
        return cls.from_dict(data)


def table_key(target: Target, space: SearchSpace, batch_size: int, num_classes: int, protocol: Protocol
              ) -> dict[str, Any]:
    return {**target.fingerprint(), "batch_size": batch_size, "image_size": space.image_size,
            "space": space.name, "space_digest": space.digest, "num_classes": num_classes,
            "protocol": protocol.to_dict(), "format": FORMAT_VERSION}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# A cached table whose models read this many times faster or slower here was measured on another machine:
# two hosts called `AMD EPYC` with AVX-512 timed one graph 1.9x apart (BENCHMARKS section 12), far beyond
# a repeat measurement's noise (a few %, 1.4x at worst on a host with two speeds).
HOST_CHECK_FACTOR = 1.5
# The check times this many of the table's calibration models and takes the median of their ratios: one
# entry taken in a stretch of other load (a table entry is timed for about a second) is outvoted.
HOST_CHECK_MODELS = 3
# Timed side by side over 2 s at least, so that a stretch of other load shorter than that shows as
# disturbed rounds; the check asks 1.5x, not a tight interval.
HOST_CHECK = Protocol(warmup=5, min_rounds=6, min_counted=4, ci_target=0.03, min_seconds=2.0, max_seconds=4.0)


def check_host(model: LatencyModel, space: SearchSpace, num_classes: int, target: Target,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Time a few calibration models of a cached table again on this host and compare.

    The cache key names the CPU, its vector extensions, the runtime and the protocol, but two machines
    with the same name can differ in clock, memory or neighbours. The `HOST_CHECK_MODELS` calibration
    models with the largest sum of parts (chosen by the table's blocks, not by their own readings: the
    largest reading is the one most likely inflated by a disturbance) are timed again here, side by
    side, and the median of their ratios to the table says whether the table still describes this
    host. A median off by more than `HOST_CHECK_FACTOR` is timed again after a pause
    (`timed_until_settled`, the project's one rule for a contradicted reading), so that a stretch of
    other load is not taken for another machine. `agrees` is False when the last reading is still off.
    """
    entries = sorted(model.calibration, key=lambda c: c["raw_ms"], reverse=True)[:HOST_CHECK_MODELS]
    nets = {e["digest"]: GLiT(Arch.from_dict(e["arch"]), space, num_classes) for e in entries}
    image = torch.randn(model.key["batch_size"], space.in_chans, space.image_size, space.image_size)

    def ratio(timings: dict[str, Timing]) -> float:
        return statistics.median(timings[e["digest"]].median_ms / e["measured_ms"] for e in entries)

    def off(timings: dict[str, Timing]) -> bool:
        return not 1 / HOST_CHECK_FACTOR <= ratio(timings) <= HOST_CHECK_FACTOR

    # The last reading decides here, not the pooled rounds: the question is whether this is another machine,
    # and one reading that agrees after a pause says it is not (a budget decision pools, `timed_candidate`).
    attempts, _ = timed_until_settled(lambda: target.measure_side_by_side(nets, image, HOST_CHECK), off, sleep=sleep)
    return {"digests": [e["digest"] for e in entries], "table_ms": [e["measured_ms"] for e in entries],
            "readings_ms": [[a[e["digest"]].median_ms for e in entries] for a in attempts],
            "ratios": [ratio(a) for a in attempts], "ratio": ratio(attempts[-1]), "agrees": not off(attempts[-1])}


def cache_dir() -> Path:
    root = os.environ.get("GLIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "glit-deploy")
    return Path(root) / "latency"


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


def profile_latency(space: SearchSpace, num_classes: int, target: Target, batch_size: int = 1,
                    protocol: Protocol | None = None, calibration_models: int = 10, holdout_models: int = 20,
                    seed: int = 0, use_cache: bool = True,
                    sleep: Callable[[float], None] = time.sleep) -> LatencyModel:
    """Build (or load from the cache) the latency model of `space` on `target`.

    A cached table is used only when a few of its models, timed again here, agree with it (`check_host`,
    which pauses with `sleep` before timing a disagreeing reading again); otherwise it was measured on
    another machine (or in a stretch of other load) and is built again, over the cached file.
    """
    protocol = protocol or TABLE
    target.check()
    key = table_key(target, space, batch_size, num_classes, protocol)
    cache_path = cache_dir() / f"{key_digest(key)}.json"
    stale: dict[str, Any] | None = None
    if use_cache and cache_path.exists():
        cached = LatencyModel.load(cache_path)
        if cached.key == key and (cached.report is None or cached.report.models >= holdout_models) \
                and len(cached.calibration) >= calibration_models:
            check = check_host(cached, space, num_classes, target, sleep)
            if check["agrees"]:
                cached.cache_hit, cached.host_check = True, check
                return cached
            stale = check
            console.print(f"[yellow]the cached latency table {cache_path} does not describe this host: "
                          f"{len(check['digests'])} of its models timed again here read "
                          + " then ".join(f"{r:.2f}x" for r in check["ratios"])
                          + " the table (median ratio); measuring the table again[/yellow]")

    started = time.perf_counter()
    torch.manual_seed(seed)
    choices = space.block_choices()
    rng = random.Random(seed)
    calib_archs = _distinct([extreme_arch(space, False), extreme_arch(space, True)]
                            + [space.sample(rng) for _ in range(calibration_models)])
    holdout_rng = random.Random(seed + 7919)
    seen = {a.digest for a in calib_archs}
    holdout_archs = _distinct([a for a in (space.sample(holdout_rng) for _ in range(holdout_models * 3))
                               if a.digest not in seen])[:holdout_models]
    tokens = torch.randn(batch_size, space.num_tokens, space.embed_dim)
    image = torch.randn(batch_size, space.in_chans, space.image_size, space.image_size)

    total = len(choices) + 2 + len(calib_archs) + 2 * len(holdout_archs)
    timings: list[Timing] = []
    with _progress() as progress:
        task = progress.add_task(f"latency {target.label}", total=total, info="blocks")

        def timed(module: nn.Module, example: Tensor) -> float:
            timing = target.measure(module, example, protocol)
            timings.append(timing)
            progress.advance(task)
            return timing.median_ms

        model = LatencyModel(key=key, block_ms={block_key(g): timed(Block(space, g), tokens) for g in choices},
                             stem_ms=timed(Stem(space), image),
                             head_ms=timed(Head(space.embed_dim, num_classes), tokens))
        progress.update(task, info="calibration models")
        for arch in calib_archs:
            model.calibration.append({"digest": arch.digest, "arch": arch.to_dict(), "raw_ms": model.raw_ms(arch),
                                      "measured_ms": timed(GLiT(arch, space, num_classes), image)})
        model.scale, model.offset_ms = fit_calibration(model.calibration)
        progress.update(task, info="held-out models")
        points = []
        for arch in holdout_archs:
            net = GLiT(arch, space, num_classes)
            points.append({"digest": arch.digest, "arch": arch.to_dict(), "predicted_ms": model.predict_ms(arch),
                           "measured_ms": timed(net, image), "repeat_ms": timed(net, image)})
    model.report = ErrorReport.from_points(points) if points else None
    model.rounds = sum(t.rounds for t in timings)
    model.disturbed_rounds = sum(t.disturbed_rounds for t in timings)
    model.build_seconds = time.perf_counter() - started
    model.host_check = stale  # why the cached table was not used, when one was found
    target.flush()  # e.g. TensorRT's timing cache, shared by the next table's engines
    model.save(cache_path)
    return model


def fit_calibration(points: list[dict[str, Any]]) -> tuple[float, float]:
    """measured ~ scale * raw + offset, least squares on relative error (weights 1/measured)."""
    raw = np.array([p["raw_ms"] for p in points])
    measured = np.array([p["measured_ms"] for p in points])
    if len(points) < 2 or np.ptp(raw) == 0:
        return float(measured.mean() / raw.mean()), 0.0
    design = np.stack([raw, np.ones_like(raw)], axis=1) / measured[:, None]
    (scale, offset), *_ = np.linalg.lstsq(design, np.ones_like(raw), rcond=None)
    if scale <= 0:  # a degenerate fit (noise swamps the spread): fall back to a pure scale
        return float(np.mean(measured / raw)), 0.0
    return float(scale), float(offset)


def _distinct(archs: list[Arch]) -> list[Arch]:
    seen: dict[str, Arch] = {}
    for a in archs:
        seen.setdefault(a.digest, a)
    return list(seen.values())


def measure_arch(arch: Arch, space: SearchSpace, num_classes: int, target: Target, batch_size: int = 1,
                 protocol: Protocol = DECISION, calibration: Any = None) -> Timing:
    """End-to-end latency of a whole model on the target: its deployable graph at the target's
    precision, timed as the file `glit export` would write it (the weights do not change the time;
    an int8 graph is quantized on `calibration`, the images export calibrates on, when given)."""
    image = torch.randn(batch_size, space.in_chans, space.image_size, space.image_size)
    return target.measure(GLiT(arch, space, num_classes), image, protocol, calibration)
