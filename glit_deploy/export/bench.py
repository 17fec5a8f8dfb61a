"""`glit bench`: the same exported model on every runtime this machine has, at several batch sizes.

Rows: PyTorch eager (CPU, and CUDA with a GPU), onnxruntime on each available execution provider
(plus the transformer-optimized ONNX when one was exported; an int8 export is timed on onnxruntime-CPU
next to the float32 graph it was quantized from), and the TensorRT engine when one was
built and TensorRT can load it. Each row is measured as `glit_deploy.latency.measure` defines it
(the median of the rounds the host left undisturbed, its 95 % interval, single-run p90 and p99). The
rows of one batch size are timed interleaved, round by round, so their ratios hold on a shared
machine.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from glit_deploy.atomic_io import atomic_write_text
from glit_deploy.errors import GlitError
from glit_deploy.latency.measure import Protocol, time_interleaved
from glit_deploy.latency.targets import cuda_event_timer, default_threads
from glit_deploy.rundir import RunDir
from glit_deploy.runtimes import RuntimeUnavailable, cpu_name, gpu_name, import_onnxruntime, ort_session

BENCH_FILE = "bench.csv"
BENCH = Protocol(warmup=5, min_rounds=10, ci_target=0.03, max_seconds=5.0)  # per batch size, all rows together
ORT_NAMES = {"CPUExecutionProvider": "ort-cpu", "CUDAExecutionProvider": "ort-cuda",
             "TensorrtExecutionProvider": "ort-trt"}


@dataclass(frozen=True)
class BenchRow:
    runtime: str
    device: str
    batch_size: int
    threads: int
    median_ms: float
    ci_low_ms: float
    ci_high_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    runs: int
    disturbed_rounds: int
    rounds: int
    model: str  # which file (or "pytorch")


@dataclass
class Runtime:
    name: str
    device: str
    model: str
    make: Callable[[np.ndarray], Callable[[], None]]  # batch -> one inference
    timer: Callable[[Callable[[], None]], float] | None = None
    max_batch: int | None = None


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GlitError(f"--batch-sizes '{text}': expected comma-separated integers, e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise GlitError(f"--batch-sizes '{text}': batch sizes must be positive")
    return sizes


def _torch_runtime(model: torch.nn.Module, device: str, threads: int) -> Runtime:
    module = model.to(device).eval()

    def make(batch: np.ndarray) -> Callable[[], None]:
        x = torch.from_numpy(batch).to(device)

        def run() -> None:
            with torch.inference_mode():
                module(x)

        return run

    torch.set_num_threads(threads)
    return Runtime(f"torch-eager-{device}", cpu_name() if device == "cpu" else gpu_name(), "pytorch", make,
                   cuda_event_timer if device == "cuda" else None)


def _ort_runtime(path: Any, provider: str, threads: int, suffix: str = "") -> Runtime:
    ort = import_onnxruntime()
    session = ort_session(path, provider, threads)
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    on_gpu = provider != "CPUExecutionProvider"

    def make(batch: np.ndarray) -> Callable[[], None]:
        if not on_gpu:
            feed = {input_name: batch}
            return lambda: session.run(None, feed)
        # inputs and outputs stay on the GPU: no host copies are timed
        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
        binding.bind_output(output_name, "cuda", 0)
        return lambda: session.run_with_iobinding(binding)

    return Runtime(ORT_NAMES.get(provider, provider) + suffix, gpu_name() if on_gpu else cpu_name(),
                   str(path.name), make)


def _trt_runtime(export_path: Any, info: dict[str, Any]) -> Runtime:
    from glit_deploy.export.tensorrt import ENGINE_FILE, TensorRTRunner

    runner = TensorRTRunner((export_path / ENGINE_FILE).read_bytes())
    input_name = runner.inputs[0]
    stream = torch.cuda.Stream()

    def make(batch: np.ndarray) -> Callable[[], None]:
        x = torch.from_numpy(batch).cuda()
        return lambda: runner.infer({input_name: x}, stream)

    def timer(fn: Callable[[], None]) -> float:
        with torch.cuda.stream(stream):
            return cuda_event_timer(fn)

    return Runtime(f"trt-{info['precision']}", info["gpu"], ENGINE_FILE, make, timer,
                   max_batch=info["profile"][input_name]["max"][0])


def available_runtimes(run: RunDir, threads: int, notes: list[str]) -> list[Runtime]:
    """Every runtime that can run this run's exported model here; what could not is added to `notes`."""
    from glit_deploy.export.onnx_export import export_dir, load_export_info
    from glit_deploy.export.tensorrt import load_engine_info
    from glit_deploy.trained import load_trained_model

    sidecar = load_export_info(run)
    out = export_dir(run)
    model, _ = load_trained_model(run, sidecar["source"]["label"])
    runtimes = [_torch_runtime(model, "cpu", threads)]
    if torch.cuda.is_available():
        import copy

        runtimes.append(_torch_runtime(copy.deepcopy(model), "cuda", threads))
    ort = import_onnxruntime()
    for provider in ort.get_available_providers():
        if provider not in ORT_NAMES:
            continue
        try:
            if sidecar.get("precision") == "int8":
                if provider != "CPUExecutionProvider":
                    continue  # the QDQ graph is written for onnxruntime's CPU kernels
                runtimes.append(_ort_runtime(out / sidecar["file"], provider, threads, "-int8"))
                runtimes.append(_ort_runtime(out / sidecar["fp32"]["file"], provider, threads))
                continue
            runtimes.append(_ort_runtime(out / sidecar["file"], provider, threads))
            if sidecar.get("optimized"):
                runtimes.append(_ort_runtime(out / sidecar["optimized"]["file"], provider, threads, "-optimized"))
        except RuntimeUnavailable as exc:
            notes.append(f"{ORT_NAMES[provider]} skipped: {exc}")
    engine = load_engine_info(out)
    if engine is not None:
        try:
            runtimes.append(_trt_runtime(out, engine))
        except GlitError as exc:  # TensorRT missing here, or an engine for another GPU
            notes.append(f"trt skipped: {exc}")
    return runtimes


def bench_run(run: RunDir, batch_sizes: list[int], threads: int | None = None, protocol: Protocol | None = None,
              report: Callable[[str], None] | None = None) -> tuple[list[BenchRow], list[str]]:
    """Time every available runtime at every batch size; write export/bench.csv."""
    from glit_deploy.export.onnx_export import export_dir, load_export_info

    threads = threads or default_threads()
    protocol = protocol or BENCH
    report = report or (lambda _msg: None)
    notes: list[str] = []
    image_size = load_export_info(run)["metadata"]["image_size"]
    runtimes = available_runtimes(run, threads, notes)
    rng = np.random.default_rng(0)
    rows = []
    for batch_size in batch_sizes:
        batch = rng.standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32)
        active = []
        for rt in runtimes:
            if rt.max_batch is not None and batch_size > rt.max_batch:
                notes.append(f"{rt.name} skipped at batch {batch_size}: the engine's profile ends at {rt.max_batch}")
            else:
                active.append(rt)
        report(f"batch {batch_size}: {', '.join(rt.name for rt in active)}, interleaved")
        timings = time_interleaved({rt.name: (rt.make(batch), rt.timer) for rt in active}, protocol)
        for rt in active:
            timing = timings[rt.name]
            rows.append(BenchRow(rt.name, rt.device, batch_size, threads, timing.median_ms, timing.ci_low_ms,
                                 timing.ci_high_ms, timing.p90_ms, timing.p99_ms, 1e3 * batch_size / timing.median_ms,
                                 timing.runs, timing.disturbed_rounds, timing.rounds, rt.model))
    atomic_write_text(export_dir(run) / BENCH_FILE, rows_to_csv(rows))
    return rows, notes


def rows_to_csv(rows: list[BenchRow]) -> str:
    buffer = io.StringIO()
    fields = list(BenchRow.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = asdict(row)
        for key in ("median_ms", "ci_low_ms", "ci_high_ms", "p90_ms", "p99_ms", "images_per_s"):
            values[key] = f"{values[key]:.4f}"
        writer.writerow(values)
    return buffer.getvalue()
