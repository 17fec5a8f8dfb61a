"""`glit search`: the two-level evolutionary search under latency budgets measured on the target."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from glit_deploy.cli import (
    BatchOpt,
    PrecisionOpt,
    RoundsOpt,
    RunOpt,
    TargetOpt,
    ThreadsOpt,
    WarmupOpt,
    app,
    err,
    out,
    table_protocol,
    target_from_options,
    user_errors,
)
from glit_deploy.errors import GlitError
from glit_deploy.latency.budget import slow_state_note


def _parse_split(text: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(g) for g in text.split(",")]
    except ValueError:
        raise GlitError(f"--fixed-split '{text}': expected global heads per block, e.g. 3,3,1,0") from None


@app.command("search")
@user_errors
def search_cmd(
    run: RunOpt,
    latency_budget: Annotated[list[str], typer.Option("--latency-budget", help="Budget on the median such as 5ms or "
                                                      "800us, on a percentile of single requests such as p99:8ms "
                                                      "(p90, p95, p99), or auto (the middle of the space's range on "
                                                      "the target); repeat for several.")],
    target: TargetOpt = "",
    precision: PrecisionOpt = "fp32",
    batch_size: BatchOpt = 1,
    threads: ThreadsOpt = 0,
    quant_eval: Annotated[int, typer.Option(min=0, help="With --precision int8: also score the K most accurate "
                                            "candidates quantized and take them by int8 accuracy (the winner is "
                                            "always quantized, scored and measured).")] = 0,
    finetune_top: Annotated[int, typer.Option(min=0, help="Fine-tune the K most accurate candidates of each budget "
                                              "that measure within it, from their inherited weights "
                                              "(--finetune-steps steps each); the best fine-tuned wins: "
                                              "inherited accuracy orders near-tied archs by chance. 0: "
                                              "inherited accuracy alone.")] = 0,
    finetune_steps: Annotated[int, typer.Option(min=1, help="Steps (batch 128) of each --finetune-top "
                                                "fine-tune.")] = 400,
    finetune_spread: Annotated[int, typer.Option(min=0, help="With --finetune-top: fine-tune the most accurate "
                                                 "candidates that differ from each other in at least D genes, "
                                                 "not one arch and its mutants. 0: the K most accurate.")] = 0,
    finetune_splits: Annotated[int, typer.Option(min=0, help="Fine-tune the K most accurate level-1 candidates "
                                                 "(one split each, --finetune-steps steps) and give level 2 the "
                                                 "split of the best: level 2 searches that split only. 0: the "
                                                 "most accurate's split.")] = 0,
    level2_splits: Annotated[int, typer.Option(min=1, help="Level 2 searches the details of level 1's K best "
                                               "splits (distinct; with --finetune-splits the best fine-tuned "
                                               "first), not of one split only.")] = 1,
    population: Annotated[int, typer.Option(min=2)] = 50,
    generations: Annotated[int, typer.Option(min=1, help="Generations per level.")] = 20,
    parents: Annotated[int, typer.Option(min=1)] = 10,
    mutations: Annotated[int, typer.Option(min=0)] = 25,
    crossovers: Annotated[int, typer.Option(min=0)] = 25,
    mutation_prob: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.15,
    max_params: Annotated[int | None, typer.Option(help="Optional parameter limit.")] = None,
    max_macs: Annotated[int | None, typer.Option(help="Optional multiply-add limit.")] = None,
    level2_epochs: Annotated[int, typer.Option(min=0, help="Fine-tune the supernet on the chosen split for N "
                                               "epochs before level 2.")] = 0,
    calib_batches: Annotated[int, typer.Option(min=1, help="Batches for BN recalibration per candidate.")] = 8,
    eval_batch_size: Annotated[int, typer.Option(min=1)] = 256,
    calibration_models: Annotated[int, typer.Option(min=1)] = 10,
    holdout_models: Annotated[int, typer.Option(min=1)] = 20,
    warmup: WarmupOpt = 5,
    rounds: RoundsOpt = 6,
    fixed_split: Annotated[str, typer.Option(help="Skip level 1: search the details of this split, given as "
                                             "global heads per block, e.g. 3,3,3,3,3,3.")] = "",
    latency_margin: Annotated[float, typer.Option(min=0.0, max=0.5, help="A winner's measured upper bound must be "
                                                  "this share under the budget, so the deployed file, measured "
                                                  "again at export, still fits; candidates are the archs "
                                                  "predicted within that limit.")] = 0.03,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="Where candidates are evaluated: auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue the run's interrupted search.")] = False,
    latency_table: Annotated[Path | None, typer.Option(help="Use this latency table (a file `glit latency profile` "
                                                       "or a search wrote, e.g. runs/NAME/latency/ort-cpu-b1.json) "
                                                       "as it is, instead of the cache: two searches on one table "
                                                       "differ only in what you changed. Its settings must be this "
                                                       "search's.")] = None,
) -> None:
    """Two-level evolutionary search under latency budgets measured on the target."""
    from glit_deploy.rundir import RunDir
    from glit_deploy.search import Budget, SearchConfig
    from glit_deploy.search.runner import search

    budgets = [b if b == "auto" else Budget.parse(b) for b in latency_budget]
    cfg = SearchConfig(population=population, generations=generations, parents=parents, mutations=mutations,
                       crossovers=crossovers, mutation_prob=mutation_prob, seed=seed, max_params=max_params,
                       max_macs=max_macs, calib_batches=calib_batches, batch_size=eval_batch_size,
                       fixed_split=_parse_split(fixed_split), latency_margin=latency_margin,
                       quant_eval=quant_eval, finetune_top=finetune_top, finetune_steps=finetune_steps,
                       finetune_spread=finetune_spread, finetune_splits=finetune_splits,
                       level2_splits=level2_splits)
    if quant_eval and precision != "int8":
        raise GlitError("--quant-eval scores candidates quantized: it needs --precision int8")
    summary = search(RunDir(run), budgets, target_from_options(target, threads, precision), batch_size, cfg,
                     resume=resume, level2_epochs=level2_epochs, protocol=table_protocol(warmup, rounds),
                     calibration_models=calibration_models, holdout_models=holdout_models, device=device,
                     latency_table=latency_table)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    on = summary["target"] + (f" {summary['precision']}" if summary.get("precision", "fp32") != "fp32" else "")
    table = Table(title=f"search on {on} (batch {summary['batch_size']}): "
                  f"{summary['evaluated']} evaluations, {summary['cache_hits']} cache hits, "
                  f"{summary['seconds']:.0f} s")
    for column in ("budget", "val top-1", "predicted", "measured (95 % interval)", "budgeted statistic",
                   "params", "multiply-adds", "arch file"):
        table.add_column(column)
    failed = []
    for label, result in summary["budgets"].items():
        if not result.get("digest"):
            failed.append(f"{label}: {result['error']}")
            table.add_row(label, "-", "-", "-", "-", "-", "-", result["error"])
            continue
        lat = result["latency"]
        top1 = f"{result['top1']:.2f} %" + (f" (int8 {result['int8_top1']:.2f} %)" if "int8_top1" in result else "") \
            + (f" (fine-tuned {result['finetuned_top1']:.2f} %)" if "finetuned_top1" in result else "")
        table.add_row(label, top1, f"{result['predicted_ms']:.3f} ms",
                      f"{lat['median_ms']:.3f} ms ({lat['ci_ms'][0]:.3f}-{lat['ci_ms'][1]:.3f})",
                      f"{lat['stat']} <= {lat['bound_ms']:.3f} ms (95 % bound)",
                      f"{result['params'] / 1e6:.3f} M", f"{result['macs'] / 1e6:.1f} M",
                      str(Path(run) / "search" / f"best-{label}.json"))
        note = slow_state_note(lat)
        if note:
            err.print(Text.assemble(("note: ", "yellow"), f"{label}: the winner's timing: {note}"), soft_wrap=True)
        if result.get("rejected_over_budget"):
            err.print(f"{label}: {len(result['rejected_over_budget'])} more accurate candidate(s) measured over the "
                      "budget and were rejected (search/summary.json lists them)")
        if result.get("second_pass"):
            ratio = result["second_pass"]["table_ratio"]
            same_table = "".join(f" --{name} {value}" for name, value, default in
                                 (("precision", precision, "fp32"), ("batch-size", batch_size, 1),
                                  ("threads", threads, 0)) if value != default)
            err.print(Text.assemble(("warning: ", "yellow"), f"{label}: the clock read the most accurate candidates "
                                    f"{ratio:.3f}x the latency table's predictions, and the winner came from the "
                                    "candidates measured next. If the host's load is as usual, the table is stale: "
                                    f"`glit latency profile --run {run} --target {summary['target']}{same_table} "
                                    "--no-cache` measures it again"), soft_wrap=True)
    out.print(table)
    out.print(f"Pareto front: {Path(run) / 'search' / 'pareto.png'}")
    if failed:
        err.print(Text.assemble(("error: ", "bold red"), "; ".join(failed)), soft_wrap=True)
        raise typer.Exit(1)
