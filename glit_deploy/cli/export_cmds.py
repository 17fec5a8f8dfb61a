"""`glit` commands: export (ONNX, TensorRT, Triton) and bench."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from glit_deploy.cli import RunOpt, app, err, out, user_errors
from glit_deploy.errors import GlitError
from glit_deploy.latency.budget import slow_state_note

FORMATS = ("onnx", "trt", "triton")


@contextmanager
def _steps(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr whose text follows the current step."""
    with err.status(title) as status:
        yield lambda step: status.update(f"{title}: {step}")


def _short(sha: str) -> str:
    return sha[:16]


@app.command("export")
@user_errors
def export_cmd(
    run: RunOpt,
    format: Annotated[str, typer.Option("--format", help="onnx, trt (TensorRT engine) or triton (model "
                                        "repository); trt and triton export the ONNX model first if needed.")]
    = "onnx",
    model: Annotated[str | None, typer.Option("--model", help="Retrained model label (default: the run's deploy "
                                              "model).")] = None,
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset (>= 17 for LayerNormalization).")] = 17,
    exporter: Annotated[str, typer.Option(help="torchscript (torch.onnx.export dynamo=False) or dynamo.")]
    = "torchscript",
    optimize: Annotated[bool, typer.Option(help="Also write model.optimized.onnx with onnxruntime's transformer "
                                           "optimizer (parity re-checked; measured slower on CPU).")] = False,
    max_abs_diff: Annotated[float | None, typer.Option(help="Parity limit on max |logit difference| (default "
                                                       "1e-4 for ONNX, 1e-3 TensorRT fp32, 5e-2 fp16).")] = None,
    min_agreement: Annotated[float | None, typer.Option(min=0, max=100, help="Parity: minimum top-1 agreement "
                                                        "in % (default 100; 99 for fp16 engines).")] = None,
    parity_images: Annotated[int, typer.Option(min=0, help="Validation images for parity (0: all).")] = 1024,
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT: float16 engine (LayerNorm, softmax stay "
                                       "float32).")] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="TensorRT profile and Triton max_batch_size.")] = 32,
    precision: Annotated[str, typer.Option(help="ONNX: fp32, or int8 (static QDQ quantization, calibrated on "
                                           "training images, behind an accuracy gate); default: the precision "
                                           "the run's search measured at, else fp32. TensorRT: fp32, fp16 or "
                                           "int8 (explicit quantization, behind the same gate).")] = "",
    calibration_images: Annotated[int, typer.Option(min=1, help="int8: training images to calibrate on.")] = 64,
    max_top1_drop: Annotated[float, typer.Option(min=0, help="int8 gate: largest top-1 drop from float32, in "
                                                 "points, on the validation split.")] = 0.5,
    min_int8_agreement: Annotated[float, typer.Option(min=0, max=100, help="int8 gate: smallest top-1 agreement "
                                                      "with float32, in %.")] = 97.0,
    force: Annotated[bool, typer.Option(help="Export again even when an up-to-date export exists.")] = False,
    latency: Annotated[bool, typer.Option(help="Time the written ONNX file on the run's target and fail when it "
                                          "is over the budget its arch was searched for.")] = True,
    latency_budget: Annotated[str | None, typer.Option("--latency-budget", help="Hold the ONNX file to this budget "
                                                       "(5ms, p99:8ms) instead of its search budget.")] = None,
    inject_error: Annotated[float, typer.Option(hidden=True, help="Self-test: shift one exported logit by this "
                                                "much, to see the parity check fail.")] = 0.0,
) -> None:
    """Export the retrained model: ONNX (checked against PyTorch), a TensorRT engine, or a Triton repository."""
    from glit_deploy.rundir import RunDir

    if format not in FORMATS:
        raise GlitError(f"unknown --format '{format}' (formats: {', '.join(FORMATS)})")
    rundir = RunDir(run)
    if format == "onnx":
        from glit_deploy.quant import AccuracyGate

        gate = AccuracyGate(max_drop=max_top1_drop, min_agreement=min_int8_agreement / 100)
        _export_onnx(rundir, model, opset, exporter, optimize, max_abs_diff, min_agreement, parity_images, force,
                     inject_error, latency, latency_budget, precision, calibration_images, gate)
    elif format == "trt":
        _export_trt(rundir, model, precision or ("fp16" if fp16 else "fp32"), fp16, max_batch, max_abs_diff,
                    min_agreement, calibration_images, max_top1_drop)
    else:
        _export_triton(rundir, model, max_batch)


def _export_onnx(rundir: Any, model: str | None, opset: int, exporter: str, optimize: bool,
                 max_abs_diff: float | None, min_agreement: float | None, parity_images: int, force: bool,
                 inject_error: float, check_latency: bool, latency_budget: str | None, precision: str,
                 calibration_images: int, gate: Any) -> None:
    from glit_deploy.export.onnx_export import OnnxOptions, export_run_onnx
    from glit_deploy.export.parity import Thresholds

    thresholds = Thresholds(1e-4 if max_abs_diff is None else max_abs_diff,
                            1.0 if min_agreement is None else min_agreement / 100)
    options = OnnxOptions(opset=opset, exporter=exporter, optimize=optimize, thresholds=thresholds,
                          parity_images=parity_images, inject_error=inject_error, check_latency=check_latency,
                          latency_budget=latency_budget, precision=precision, calibration_images=calibration_images,
                          gate=gate)
    with _steps("ONNX export") as report:
        result = export_run_onnx(rundir, model, options, force=force, report=report)
    s = result.sidecar
    table = Table(title=f"ONNX export of '{s['source']['label']}'" + (" (up to date, reused)" if result.reused
                                                                       else ""), show_header=False)
    table.add_row("file", f"{result.path} ({s['bytes'] / 1e6:.2f} MB, sha256 {_short(s['sha256'])}…)")
    table.add_row("exporter", f"{s['exporter']['call']}, opset {s['opset']}, dynamic batch")
    table.add_row("optimisations", "; ".join(s["optimisations"]))
    table.add_row("checks", f"onnx.checker full check; rewrite max |diff| {s['checks']['rewrite']['max_abs_diff']:.3g}")
    float32 = " (of the float32 graph)" if s.get("precision") == "int8" else ""
    table.add_row("parity" + float32, f"{s['parity']['images']} validation images: " + _parity_text(s["parity"]))
    if s.get("gate"):
        g = s["gate"]
        q = s["quantization"]
        table.add_row("precision", f"int8 (QDQ, {', '.join(q['recipe']['op_types'])}, per-channel weights), "
                      f"calibrated on {q['calibration']['images']} training images")
        table.add_row("int8 gate", f"{g['images']} validation images: top-1 {g['fp32_top1']:.2f} % -> "
                      f"{g['int8_top1']:.2f} % (drop {g['drop_points']:.2f} ≤ {g['max_drop']:g}), agreement "
                      f"{100 * g['agreement']:.2f} % (≥ {100 * g['min_agreement']:g} %)")
    if s.get("optimized"):
        o = s["optimized"]
        fused = ", ".join(f"{k} {v}" for k, v in o["fused_operators"].items()) or "nothing fused"
        table.add_row("optimized", f"{result.optimized_path} ({fused}); parity " + _parity_text(o["parity"]))
    if s.get("latency"):
        table.add_row("latency", latency_text(s["latency"]))
    table.add_row("sidecar", str(result.path.with_name("model.json")))
    out.print(table)
    note_slow_state(s.get("latency"))


def note_slow_state(record: dict[str, Any] | None) -> None:
    """Say so when a deployed file's latency is the host's usual slow state, its fast state being a minority
    of the rounds (`slow_state_note`)."""
    note = slow_state_note(record) if record and record.get("measured") else None
    if note:
        err.print(f"[yellow]note:[/] the file's timing: {note}", markup=True, highlight=False)


def latency_text(record: dict[str, Any]) -> str:
    """One line for a deployed file's latency record (export/model.json's `latency`)."""
    precision = f" {record['precision']}" if record.get("precision", "fp32") != "fp32" else ""
    where = f"{record['target']}{precision}, batch {record['batch_size']}, {record['threads']} threads"
    if not record.get("measured"):
        return f"not measured on {where}: {record.get('reason')}"
    lo, hi = record["ci_ms"]
    text = (f"{record['median_ms']:.4f} ms median (95 % interval {lo:.4f}-{hi:.4f}), p90 {record['p90_ms']:.4f}, "
            f"p99 {record['p99_ms']:.4f} ms on {where}; {record['disturbed_rounds']} of {record['rounds']} rounds "
            "disturbed")
    if record.get("budget"):
        text += f"; {record['stat']} bound {record['bound_ms']:.4f} ms within the {record['budget']} budget"
    return text


def _parity_text(parity: dict[str, Any]) -> str:
    t = parity["thresholds"]
    return (f"max |diff| {parity['max_abs_diff']:.3g} (≤ {t['max_abs_diff']:.3g}), top-1 agreement "
            f"{100 * parity['top1_agreement']:.2f} % (≥ {100 * t['min_agreement']:.2f} %)")


def _export_trt(rundir: Any, model: str | None, precision: str, fp16: bool, max_batch: int,
                max_abs_diff: float | None, min_agreement: float | None, calibration_images: int,
                max_top1_drop: float) -> None:
    from glit_deploy.export.onnx_export import export_dir
    from glit_deploy.export.tensorrt import ENGINE_FILE, EngineOptions, build_run_engine

    options = EngineOptions(precision=precision, fp16=fp16, max_batch=max_batch, max_abs_diff=max_abs_diff,
                            min_agreement=None if min_agreement is None else min_agreement / 100,
                            calibration_images=calibration_images, max_top1_drop=max_top1_drop)
    with _steps("TensorRT engine") as report:
        s = build_run_engine(rundir, options, report, label=model)
    table = Table(title="TensorRT engine", show_header=False)
    table.add_row("file", f"{export_dir(rundir) / ENGINE_FILE} ({s['bytes'] / 1e6:.2f} MB)")
    table.add_row("TensorRT / GPU", f"{s['tensorrt']} on {s['gpu']} (compute {s['compute_capability']})")
    table.add_row("precision", f"{s['precision']}: {s['precision_mode']}")
    table.add_row("profile", "; ".join(f"{k}: {v['min']} .. {v['opt']} .. {v['max']}" for k, v in s["profile"].items()))
    table.add_row("build", f"{s['build_seconds']:.1f} s (timing cache {s['timing_cache']})")
    table.add_row("parity", _parity_text(s["parity"]))
    out.print(table)


def _export_triton(rundir: Any, model: str | None, max_batch: int) -> None:
    from glit_deploy.export.triton import write_triton_repository

    with _steps("Triton repository") as report:
        result = write_triton_repository(rundir, max_batch, label=model, report=report)
    table = Table(title=f"Triton model repository {result['path']}")
    for column in ("model", "runs on", "max batch"):
        table.add_column(column)
    for name, info in result["models"].items():
        table.add_row(name, info.get("backend") or info.get("platform"), str(info["max_batch_size"]))
    out.print(table)
    if len(result["models"]) == 1:
        out.print("no TensorRT engine was built for this ONNX model, so only glit_onnx was written "
                  "(`glit export --format trt` on a GPU machine adds glit_trt)")


@app.command("bench")
@user_errors
def bench_cmd(
    run: RunOpt,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for PyTorch and onnxruntime (0: half the "
                                         "cores, as the latency targets use).")] = 0,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs before timing.")] = 5,
    rounds: Annotated[int, typer.Option(min=3, help="Timed rounds per row (at least).")] = 10,
    max_seconds: Annotated[float, typer.Option(min=0.1, help="Time cap per batch size.")] = 5.0,
) -> None:
    """Latency and throughput of the exported model on PyTorch, onnxruntime and TensorRT (table + bench.csv)."""
    from dataclasses import replace

    from glit_deploy.export.bench import BENCH, BENCH_FILE, bench_run, parse_batch_sizes
    from glit_deploy.export.onnx_export import export_dir
    from glit_deploy.rundir import RunDir

    rundir = RunDir(run)
    sizes = parse_batch_sizes(batch_sizes)
    with _steps("benchmark") as report:
        rows, notes = bench_run(rundir, sizes, threads or None,
                                replace(BENCH, warmup=warmup, min_rounds=rounds, max_seconds=max_seconds), report)
    table = Table(title=f"{rundir.path}: exported model, {rows[0].threads} CPU thread(s)" if rows else "benchmark")
    for column in ("runtime", "device", "batch", "median (95 % interval)", "p90", "p99", "images/s", "vs eager CPU"):
        table.add_column(column, justify="right" if column not in ("runtime", "device") else "left")
    eager = {r.batch_size: r.median_ms for r in rows if r.runtime == "torch-eager-cpu"}
    for r in rows:
        speedup = f"{eager[r.batch_size] / r.median_ms:.2f}x" if r.batch_size in eager else "-"
        table.add_row(r.runtime, r.device, str(r.batch_size),
                      f"{r.median_ms:.3f} ms ({r.ci_low_ms:.3f}-{r.ci_high_ms:.3f})", f"{r.p90_ms:.3f} ms",
                      f"{r.p99_ms:.3f} ms", f"{r.images_per_s:,.0f}", speedup)
    out.print(table)
    for note in notes:
        err.print(f"[yellow]note:[/] {note}")
    out.print(f"written: {Path(export_dir(rundir)) / BENCH_FILE}")
