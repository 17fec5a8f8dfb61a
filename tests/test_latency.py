from __future__ import annotations

import importlib.util
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from glit_deploy.export.onnx import onnx_bytes
from glit_deploy.latency import LatencyModel, Protocol, get_target, profile_latency
from glit_deploy.latency.measure import Runner, Timing, summarise, time_interleaved, time_runs
from glit_deploy.latency.table import Normaliser, measure_arch, reference_block
from glit_deploy.latency.targets import Target
from glit_deploy.nn import extreme_arch
from glit_deploy.nn.layers import Block
from glit_deploy.runtimes import RuntimeUnavailable, ort_session
from glit_deploy.space import get_space

from .conftest import FAST_LATENCY, glit

FAST = Protocol(warmup=3, runs=10)


def test_timing_protocol() -> None:
    t = summarise([3.0, 1.0, 2.0, 10.0, 2.0])
    assert t.median_ms == 2.0 and t.runs == 5 and t.p10_ms <= t.median_ms <= t.p90_ms
    calls = []
    timing = time_runs(lambda: calls.append(time.sleep(0.002)), Protocol(warmup=2, runs=5, min_seconds=0.0))
    assert len(calls) == 7 and timing.runs == 5
    assert timing.median_ms >= 2.0  # a 2 ms sleep never times faster than 2 ms
    calls.clear()
    time_runs(lambda: calls.append(None), Protocol(warmup=0, runs=3, min_seconds=0.01, max_runs=50))
    assert len(calls) == 50  # kept timing up to max_runs to reach min_seconds


def test_interleaved_timing_alternates_runners_and_tops_up_fast_ones() -> None:
    calls: list[str] = []

    def runner(name: str, seconds: float):
        def run() -> None:
            calls.append(name)
            time.sleep(seconds)
        return run

    timings = time_interleaved({"slow": (runner("slow", 0.004), None), "fast": (runner("fast", 0.0), None)},
                               Protocol(warmup=1, runs=6, min_seconds=0.02))
    assert timings["slow"].median_ms >= 4.0 > timings["fast"].median_ms
    assert timings["slow"].runs == 6  # 6 rounds of 4 ms already pass min_seconds
    assert timings["fast"].runs > 6  # topped up within each round to reach min_seconds
    timed = calls[2:]  # after one warm-up call each
    switches = sum(a != b for a, b in itertools.pairwise(timed))
    assert switches >= 6  # the two alternate round by round, not one block after the other


def test_onnx_target_times_the_real_block() -> None:
    """The graph an onnxruntime target times computes what the PyTorch block computes."""
    space = get_space("digits")
    block = Block(space, space.block_choices()[50]).eval()
    x = torch.randn(2, space.num_tokens, space.embed_dim)
    session = ort_session(onnx_bytes(block, x), "CPUExecutionProvider", threads=1)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - block(x).numpy()).max() < 1e-4


@pytest.mark.parametrize("name", ["ort-cpu", "torch-cpu"])
def test_targets_measure(name: str) -> None:
    target = get_target(name, threads=1)
    space = get_space("digits")
    timing = target.measure(Block(space, space.block_choices()[0]), torch.randn(1, 17, 48), FAST)
    assert 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms and target.measurements == 1
    fp = target.fingerprint()
    assert fp["target"] == name and fp["threads"] == 1 and fp["versions"]


@pytest.mark.parametrize("name, needs", [
    ("trt", "tensorrt"), ("ort-cuda", "cuda"), ("ort-trt", "cuda"), ("torch-cuda", "cuda")])
def test_missing_runtime_is_one_clear_error(name: str, needs: str) -> None:
    if needs == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    if needs == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeUnavailable, match=r"pip install|NVIDIA GPU"):
        get_target(name).check()


def test_latency_table_and_its_cache() -> None:
    space = get_space("digits")
    target = get_target("ort-cpu", threads=1)
    model = profile_latency(space, 10, target, protocol=FAST, calibration_models=4, holdout_models=4,
                            use_cache=False)  # measured afresh, whichever test filled the cache before
    assert not model.cache_hit and len(model.block_ms) == len(space.block_choices()) == 198
    assert target.measurements == 198 + 2 + 6 + 2 * 4  # blocks, stem+head, calibration, held-out twice
    report = model.report
    assert report.models == 4 and 0 <= report.within_5 <= report.within_10 <= 1 and report.noise >= 0
    for point in report.points:
        assert point["predicted_ms"] > 0 and point["measured_ms"] > 0
        # a CPU table rescales every timing to the reference block's quiet speed, and keeps the clock's
        assert point["measured_ms"] == pytest.approx(
            point["clock_ms"] * model.reference_ms / point["reference_clock_ms"])
    assert model.reference_ms > 0 and model.reference_drift >= 0
    assert model.clock["block_ms"].keys() == model.block_ms.keys()
    largest, smallest = extreme_arch(space, True), extreme_arch(space, False)
    assert model.predict_ms(largest) == pytest.approx(model.scale * model.raw_ms(largest) + model.offset_ms)
    assert model.block_range_ms(space, True) == pytest.approx(model.predict_ms(model.fastest_arch(space)))
    assert model.block_range_ms(space, True) < model.predict_ms(smallest) or \
        model.fastest_arch(space) == smallest
    # Same key: the cache answers and nothing is measured.
    again_target = get_target("ort-cpu", threads=1)
    again = profile_latency(space, 10, again_target, protocol=FAST, calibration_models=4, holdout_models=4)
    assert again.cache_hit and again_target.measurements == 0
    assert again.block_ms == model.block_ms and again.scale == model.scale
    # Another batch size is another key.
    other = profile_latency(space, 10, get_target("ort-cpu", threads=1), batch_size=2,
                            protocol=Protocol(warmup=1, runs=3, min_seconds=0.0),
                            calibration_models=2, holdout_models=2)
    assert not other.cache_hit and other.key["batch_size"] == 2


class DriftingTarget(Target):
    """A CPU target whose machine runs `slowdown` times slower when told: each module sleeps in
    proportion to its parameters, so the reference block and a model slow down together."""

    name = "drifting-cpu"
    slowdown = 1.0

    def check(self) -> None:
        pass

    def _runner(self, module: torch.nn.Module, example: torch.Tensor) -> Runner:
        seconds = 2e-8 * sum(p.numel() for p in module.parameters())

        def run() -> None:
            time.sleep(seconds * self.slowdown)

        return run, None


def test_normalisation_cancels_a_machine_slowing_down() -> None:
    space = get_space("digits")
    arch = extreme_arch(space, True)
    target = DriftingTarget(threads=1)
    protocol = Protocol(warmup=1, runs=8, min_seconds=0.0)
    reference = target.measure(reference_block(space), torch.randn(1, space.num_tokens, space.embed_dim), protocol)
    latency = LatencyModel(key={}, block_ms={}, stem_ms=0.0, head_ms=0.0, reference_ms=reference.median_ms)
    quiet = measure_arch(arch, space, 10, target, protocol=protocol, latency=latency)
    target.slowdown = 2.0
    busy_clock = measure_arch(arch, space, 10, target, protocol=protocol)
    busy = measure_arch(arch, space, 10, target, protocol=protocol, latency=latency)
    assert busy_clock > 1.6 * quiet  # the clock sees the slowdown
    assert busy == pytest.approx(quiet, rel=0.1)  # the rescaled latency does not


def test_normaliser_follows_drift_and_ignores_one_reference_outlier() -> None:
    # The machine runs at full speed, then half speed; one reference timing in the quiet part is an outlier.
    refs = [1.0] * 20 + [2.0] * 20
    refs[10] = 5.0
    timings = [Timing(3.0 * r if i != 10 else 3.0, 0, 0, 5, reference_ms=r) for i, r in enumerate(refs)]
    speed = Normaliser.from_timings(timings)
    assert speed.reference_ms == pytest.approx(1.0) and speed.drift == pytest.approx(1.0)
    assert speed.rescale(timings) == pytest.approx([3.0] * 40)  # the outlier did not bend its module's entry
    assert Normaliser.from_timings([Timing(1.0, 1.0, 1.0, 5)]).reference_ms is None  # GPU: no reference


def test_latency_cli(trained_digits_run: Path, tmp_path: Path) -> None:
    proc = glit("latency", "profile", "--run", str(trained_digits_run), "--target", "ort-cpu", "--threads", "1",
                *FAST_LATENCY)
    assert "mean abs. error" in proc.stdout
    table = LatencyModel.load(trained_digits_run / "latency" / "ort-cpu-b1.json")
    assert table.key["target"] == "ort-cpu" and table.key["space"] == "digits"
    assert "cache hit" in glit("latency", "profile", "--run", str(trained_digits_run), "--target", "ort-cpu",
                               "--threads", "1", *FAST_LATENCY).stdout
    predicted = json.loads(glit("latency", "predict", "--run", str(trained_digits_run), "--arch", "smallest",
                                "--target", "ort-cpu").stdout)
    assert predicted["predicted_ms"] == pytest.approx(table.predict_ms(extreme_arch(get_space("digits"), False)))
    measured = json.loads(glit("latency", "measure", "--run", str(trained_digits_run), "--arch", "smallest",
                               "--target", "torch-cpu", "--threads", "1", "--runs", "10").stdout)
    assert measured["median_ms"] > 0 and measured["target"] == "torch-cpu"
    proc = glit("latency", "profile", "--run", str(trained_digits_run), "--target", "nope", check=False)
    assert proc.returncode == 2 and "unknown target 'nope'" in proc.stderr
