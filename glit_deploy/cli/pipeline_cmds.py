"""`glit pipeline`: the whole chain on one run directory, resumable stage by stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from glit_deploy.cli import app, err, out, user_errors
from glit_deploy.cli.export_cmds import latency_text, note_slow_state


@app.command("pipeline")
@user_errors
def pipeline_cmd(
    run: Annotated[Path, typer.Option("--run", help="Run directory (runs/NAME).")] = Path("runs/pipeline"),
    data: Annotated[str, typer.Option(help="digits | cifar10:DIR | image-folder DIR.")] = "digits",
    space: Annotated[str, typer.Option(help="Search-space preset (default: digits for digits, cifar for "
                                       "cifar10:DIR, glit-tiny for image folders).")] = "",
    target: Annotated[str, typer.Option(help="Latency target (default: ort-cuda with a GPU, else ort-cpu).")] = "",
    latency_budget: Annotated[str, typer.Option(help="auto (middle of the range the space spans on the "
                                                "target) or a latency such as 5ms.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or int8 (ort-cpu: searched under int8 latency, exported "
                                           "int8 behind the accuracy gate).")] = "fp32",
    quant_eval: Annotated[int, typer.Option(min=0, help="int8: also score the K most accurate candidates "
                                            "quantized.")] = 0,
    latency_margin: Annotated[float, typer.Option(min=0.0, max=0.5, help="The winner's measured upper bound must be "
                                                  "this share under the budget, so the exported file, measured "
                                                  "again, still fits on a host whose timings drift.")] = 0.03,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size latency is measured at.")] = 1,
    threads: Annotated[int, typer.Option(min=0, help="Runtime threads for latency (0: target default).")] = 0,
    supernet_epochs: Annotated[int, typer.Option(min=1)] = 20,
    population: Annotated[int, typer.Option(min=2)] = 12,
    generations: Annotated[int, typer.Option(min=1)] = 3,
    retrain_epochs: Annotated[int, typer.Option(min=1)] = 10,
    retrain_init: Annotated[str, typer.Option(help="scratch or supernet.")] = "supernet",
    calibration_models: Annotated[int, typer.Option(min=1, help="Whole models the latency table is "
                                                    "calibrated on.")] = 10,
    holdout_models: Annotated[int, typer.Option(min=1, help="Held-out whole models its error is reported on.")]
    = 20,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (training and search).")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Train the supernet, profile latency, search, retrain, export to ONNX with parity, bench.

    Rerunning the same command after an interruption continues where it stopped."""
    from glit_deploy.pipeline import PipelineConfig, run_pipeline
    from glit_deploy.rundir import RunDir

    cfg = PipelineConfig(data=data, space=space, target=target, precision=precision, quant_eval=quant_eval,
                         latency_budget=latency_budget, latency_margin=latency_margin,
                         batch_size=batch_size, threads=threads, supernet_epochs=supernet_epochs,
                         population=population, generations=generations, retrain_epochs=retrain_epochs,
                         retrain_init=retrain_init, calibration_models=calibration_models,
                         holdout_models=holdout_models, seed=seed, device=device)

    def report(stage: str, status: str) -> None:
        err.print(f"[bold cyan]pipeline[/] {stage}: {status}")

    result = run_pipeline(RunDir(run), cfg, on_stage=report)
    s = result.summary
    if as_json:
        typer.echo(json.dumps({**s, "stages_run": result.stages_run, "stages_skipped": result.stages_skipped}))
        return
    table = Table(title=f"glit pipeline: {run}", show_header=False)
    precision = f" {s['precision']}" if s.get("precision", "fp32") != "fp32" else ""
    table.add_row("target", f"{s['target']}{precision} at batch {s['batch_size']}")
    if s.get("deployed_latency"):
        table.add_row("latency (deployed file)", latency_text(s["deployed_latency"]))
    table.add_row("latency (search)", f"{s['measured_ms']:.4f} ms measured for the winner "
                  f"({s['predicted_ms']:.4f} predicted)")
    if s.get("inherited_val_top1") is None:  # a run whose retrain stage finished before the choice existed
        table.add_row("validation top-1", f"{s['retrained_val_top1']:.2f} % retrained "
                      f"({s['search_val_top1']:.2f} % with supernet weights in the search)")
    else:
        table.add_row("validation top-1", f"{s['retrained_val_top1']:.2f} % retrained, {s['inherited_val_top1']:.2f} "
                      f"% with inherited supernet weights (same {s['val_images']} images)")
    table.add_row("exported model", f"{s['deployed_model']}: the {s['kept']} model, "
                  f"{s['deployed_val_top1']:.2f} % validation top-1")
    if s.get("parity"):
        p = s["parity"]
        table.add_row("ONNX parity", f"max |diff| {p.get('max_abs_diff', float('nan')):.2e}, top-1 agreement "
                      f"{100 * p.get('top1_agreement', float('nan')):.1f} %")
    if s.get("int8_gate"):
        g = s["int8_gate"]
        table.add_row("int8 gate", f"top-1 {g['fp32_top1']:.2f} % float32 -> {g['int8_top1']:.2f} % int8, agreement "
                      f"{100 * g['agreement']:.2f} % on {g['images']} validation images")
    table.add_row("stages", f"ran {', '.join(result.stages_run) or 'none'}; "
                  f"done earlier {', '.join(result.stages_skipped) or 'none'}")
    table.add_row("files", "\n".join(s["files"]))
    table.add_row("serve it", s["serve_command"])
    out.print(table)
    note_slow_state(s.get("deployed_latency"))
