"""`glit latency`: profile a space on a target, measure a model or an ONNX file, predict from the table."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from glit_deploy.cli import (
    BatchOpt,
    PrecisionOpt,
    RoundsOpt,
    RunOpt,
    TargetOpt,
    ThreadsOpt,
    WarmupOpt,
    app,
    out,
    table_protocol,
    target_from_options,
    user_errors,
)
from glit_deploy.errors import GlitError

latency_app = typer.Typer(help="Latency measured on a deployment target.", no_args_is_help=True)
app.add_typer(latency_app, name="latency")


@latency_app.command("profile")
@user_errors
def latency_profile_cmd(
    run: RunOpt,
    target: TargetOpt = "",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchOpt = 1,
    threads: ThreadsOpt = 0,
    calibration_models: Annotated[int, typer.Option(min=1, help="Whole models measured to calibrate.")] = 10,
    holdout_models: Annotated[int, typer.Option(min=1, help="Other whole models measured to report the "
                                                "error.")] = 20,
    warmup: WarmupOpt = 5,
    rounds: RoundsOpt = 6,
    cache: Annotated[bool, typer.Option(help="Reuse a table measured before with the same key.")] = True,
) -> None:
    """Measure every block configuration on the target, calibrate on whole models, report the error."""
    from glit_deploy.rundir import RunDir
    from glit_deploy.search.runner import latency_table_path, run_latency_model

    rundir = RunDir(run)
    tgt = target_from_options(target, threads, precision)
    model = run_latency_model(rundir, tgt, batch_size, table_protocol(warmup, rounds), calibration_models,
                              holdout_models, use_cache=cache)
    space = rundir.space()
    table = Table(title=f"latency model: {tgt.label}, batch {batch_size}", show_header=False)
    table.add_row("device", f"{model.key['device']} ({model.key['threads']} threads)")
    check = model.host_check
    if model.cache_hit:
        table.add_row("table", f"cache hit ({len(check['digests'])} of its models timed again here: "
                      f"{check['ratio']:.2f}x the table)" if check else "cache hit (nothing measured)")
    else:
        table.add_row("table", f"measured in {model.build_seconds:.1f} s" + (
            f" (the cached table read {check['ratio']:.2f}x here: another machine)" if check else ""))
    table.add_row("block configurations", str(len(model.block_ms)))
    if model.rounds:
        table.add_row("disturbed rounds", f"{model.disturbed_rounds} of {model.rounds} (left out of the estimates)")
    table.add_row("calibration", f"{model.scale:.4f} x sum of parts {model.offset_ms:+.4f} ms "
                  f"({len(model.calibration)} models)")
    lo, hi = model.block_range_ms(space, True), model.block_range_ms(space, False)
    table.add_row("space spans", f"{lo:.3f} .. {hi:.3f} ms (predicted)")
    if model.report:
        r = model.report
        table.add_row("held-out models", str(r.models))
        table.add_row("mean abs. error", f"{r.mape:.2f} %")
        table.add_row("worst error", f"{r.worst:.2f} %")
        table.add_row("within 5 % / 10 %", f"{100 * r.within_5:.0f} % / {100 * r.within_10:.0f} %")
        table.add_row("repeat noise", f"{r.noise:.2f} % (two measurements of one model)")
    table.add_row("written", str(latency_table_path(rundir, tgt.label, batch_size)))
    out.print(table)


def _arch_and_space(run: Path, arch: str) -> tuple[Any, Any, int]:
    from glit_deploy.archs import resolve_arch
    from glit_deploy.rundir import RunDir

    rundir = RunDir(run)
    space = rundir.space()
    return resolve_arch(arch, space), space, rundir.load_meta()["data"]["num_classes"]


@latency_app.command("measure")
@user_errors
def latency_measure_cmd(
    run: Annotated[Path | None, typer.Option("--run", help="Run directory: measure --arch of its space.")] = None,
    arch: Annotated[str, typer.Option(help="ARCH.json, largest, smallest, random:SEED or a named arch.")] = "",
    model: Annotated[Path | None, typer.Option(help="An ONNX file, timed as it is (instead of --run/--arch).")]
    = None,
    target: TargetOpt = "",
    precision: Annotated[str, typer.Option(help="fp32 or int8 (an arch is quantized as export does it); a --model "
                                           "file is timed at its own precision.")] = "",
    batch_size: BatchOpt = 1,
    threads: ThreadsOpt = 0,
    budget: Annotated[str, typer.Option("--latency-budget", help="Also decide a budget, e.g. 5ms or p99:8ms.")]
    = "",
    max_seconds: Annotated[float, typer.Option(min=0, help="Time cap of the measurement (0: 10 s, 60 s for a "
                                               "percentile budget).")] = 0,
) -> None:
    """Measure one whole model (the deployable graph of an arch, or an ONNX file) end to end.

    The estimate is the median of the rounds the host left undisturbed, with its 95 % interval;
    p90/p99 are of single runs in those rounds. With --latency-budget the exit code is 1 when the
    budgeted statistic's upper bound is over the budget.
    """
    from glit_deploy.latency.budget import Budget, decision_protocol, latency_record
    from glit_deploy.latency.table import measure_arch

    decision = Budget.parse(budget) if budget else None
    protocol = decision_protocol([decision])
    protocol = replace(protocol, max_seconds=max_seconds) if max_seconds else protocol
    if model is not None:
        if run is not None or arch:
            raise GlitError("give either --model FILE.onnx, or --run with --arch, not both")
        if not model.is_file():
            raise GlitError(f"{model} does not exist")
        from glit_deploy.latency.targets import onnx_precision

        tgt = target_from_options(target, threads, precision or onnx_precision(model))
        timing = tgt.measure_file(model, batch_size, protocol)
        subject: dict[str, Any] = {"model": str(model)}
    else:
        if run is None or not arch:
            raise GlitError("give --model FILE.onnx, or --run RUN with --arch ARCH")
        resolved, space, num_classes = _arch_and_space(run, arch)
        tgt = target_from_options(target, threads, precision)
        timing = measure_arch(resolved, space, num_classes, tgt, batch_size, protocol)
        subject = {"digest": resolved.digest}
    record = {"target": tgt.name, "precision": tgt.precision, "batch_size": batch_size, "threads": tgt.threads,
              **subject, **latency_record(timing, decision)}
    typer.echo(json.dumps(record))
    if decision is not None and not record["within_budget"]:
        raise typer.Exit(1)


@latency_app.command("predict")
@user_errors
def latency_predict_cmd(
    run: RunOpt,
    arch: Annotated[str, typer.Option(help="ARCH.json, largest, smallest, random:SEED or a named arch.")],
    target: TargetOpt = "",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchOpt = 1,
) -> None:
    """Predict one arch's latency from the run's latency table (no measurement)."""
    from glit_deploy.latency import LatencyModel, default_target_name
    from glit_deploy.rundir import RunDir
    from glit_deploy.search.runner import latency_table_path

    resolved, _, _ = _arch_and_space(run, arch)
    name = target or default_target_name()
    label = name if precision in ("", "fp32") else f"{name}-{precision}"
    path = latency_table_path(RunDir(run), label, batch_size)
    if not path.exists():
        raise GlitError(f"{path} does not exist: measure the table first with `glit latency profile --run {run} "
                        f"--target {name} --precision {precision or 'fp32'} --batch-size {batch_size}`")
    model = LatencyModel.load(path)
    typer.echo(json.dumps({"target": name, "precision": precision or "fp32", "batch_size": batch_size,
                           "digest": resolved.digest, "predicted_ms": model.predict_ms(resolved)}))
