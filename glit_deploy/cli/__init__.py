"""The `glit` command line: thin commands that parse options and call the packages that do the work."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from glit_deploy.errors import GlitError

app = typer.Typer(name="glit", help="GLiT architecture search under measured latency, export and serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
space_app = typer.Typer(help="Inspect the search spaces.", no_args_is_help=True)
app.add_typer(space_app, name="space")
latency_app = typer.Typer(help="Latency measured on a deployment target.", no_args_is_help=True)
app.add_typer(latency_app, name="latency")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

RunOpt = Annotated[Path, typer.Option("--run", help="Run directory (runs/NAME).")]
ArchOpt = Annotated[str, typer.Option(help="ARCH.json, largest, smallest, random:SEED or a named arch.")]
TargetOpt = Annotated[str, typer.Option(help="ort-cpu, ort-cuda, ort-trt, torch-cpu, torch-cuda or trt "
                                        "(default: ort-cuda with a GPU, else ort-cpu).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size the latency is measured at.")]
ThreadsOpt = Annotated[int, typer.Option(min=0, help="Runtime threads (0: every core this process may use).")]
WarmupOpt = Annotated[int, typer.Option(min=0, help="Untimed runs before timing.")]
RunsOpt = Annotated[int, typer.Option("--runs", min=1, help="Timed runs per measurement (at least).")]


def user_errors(fn: F) -> F:
    """Turn errors a user can cause into one line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GlitError as exc:
            err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
    return wrapper  # type: ignore[return-value]


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command("train-supernet")
@user_errors
def train_supernet_cmd(
    run: RunOpt,
    space: Annotated[str, typer.Option(help="Search-space preset: digits, cifar, glit-tiny, glit-small, glit-base.")]
    = "digits",
    data: Annotated[str, typer.Option(help="digits | cifar10:DIR | image-folder DIR.")] = "digits",
    epochs: Annotated[int, typer.Option(min=1)] = 60,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: Annotated[int, typer.Option(min=0)] = 2,
    sandwich: Annotated[bool, typer.Option(help="Sandwich rule with in-place distillation.")] = False,
    seed: int = 0,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader worker processes.")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default).")] = 0,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate largest/smallest every N epochs.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from the run's latest checkpoint.")] = False,
) -> None:
    """Train the weight-sharing supernet (one sampled arch per step; DDP under torchrun)."""
    from glit_deploy.rundir import RunDir
    from glit_deploy.space import get_space
    from glit_deploy.train import TrainConfig, train_supernet

    _set_threads(threads)
    search_space = get_space(space)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, sandwich=sandwich, seed=seed, workers=workers,
                      eval_every=eval_every)
    result = train_supernet(RunDir(run), search_space, data, cfg, resume=resume, device=device)
    if result.get("rank", 0) == 0:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "rank"}))


@app.command("eval-subnet")
@user_errors
def eval_subnet_cmd(
    run: RunOpt,
    arch: ArchOpt,
    calib_batches: Annotated[int, typer.Option(min=1, help="Training batches for BN recalibration.")] = 8,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    threads: Annotated[int, typer.Option(min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Validation top-1 of a subnet with inherited supernet weights, after BN recalibration."""
    from glit_deploy.archs import resolve_arch
    from glit_deploy.rundir import RunDir
    from glit_deploy.train import eval_subnet

    _set_threads(threads)
    rundir = RunDir(run)
    space = rundir.space()
    result = eval_subnet(rundir, resolve_arch(arch, space), calib_batches, batch_size)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table(title=f"subnet {result['digest']}", show_header=False)
    table.add_row("arch", resolve_arch(arch, space).describe(space.num_heads))
    table.add_row("params", f"{result['params'] / 1e6:.3f} M")
    table.add_row("multiply-adds", f"{result['macs'] / 1e6:.2f} M")
    table.add_row("val top-1", f"{result['val_top1']:.2f} % of {result['val_images']} images")
    out.print(table)


@app.command("retrain")
@user_errors
def retrain_cmd(
    run: RunOpt,
    arch: Annotated[str | None, typer.Option(help="ARCH.json, largest, smallest, random:SEED or a named arch "
                                             "(default: the search winner of --budget).")] = None,
    budget: Annotated[str | None, typer.Option(help="Retrain the search winner of this budget, e.g. 5ms.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    init: Annotated[str, typer.Option(help="scratch, or supernet (inherited weights, BN recalibrated).")]
    = "scratch",
    batch_size: Annotated[int, typer.Option(min=2)] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: Annotated[int, typer.Option(min=0)] = 5,
    mixup: Annotated[float, typer.Option(min=0, help="Mixup alpha (0: off).")] = 0.8,
    cutmix: Annotated[float, typer.Option(min=0, help="CutMix alpha (0: off).")] = 1.0,
    rand_augment: Annotated[str, typer.Option(help="timm RandAugment string, or none.")] = "rand-m9-mstd0.5-inc1",
    reprob: Annotated[float, typer.Option(min=0, max=1, help="Random-erasing probability.")] = 0.25,
    smoothing: Annotated[float, typer.Option(min=0, max=1, help="Label smoothing.")] = 0.1,
    drop_path: Annotated[float, typer.Option(min=0, max=1)] = 0.1,
    ema: Annotated[bool, typer.Option(help="Keep an EMA of the weights (timm ModelEmaV3).")] = True,
    seed: int = 0,
    workers: Annotated[int, typer.Option(min=0)] = 0,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of this retraining.")] = False,
) -> None:
    """Retrain a found arch as a standalone model with the DeiT recipe (DDP under torchrun)."""
    from glit_deploy.retrain import RetrainConfig, resolve_retrain_arch, retrain
    from glit_deploy.rundir import RunDir

    _set_threads(threads)
    rundir = RunDir(run)
    chosen, label = resolve_retrain_arch(rundir, arch, budget)
    cfg = RetrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        warmup_epochs=warmup_epochs, mixup=mixup, cutmix=cutmix, rand_augment=rand_augment,
                        reprob=reprob, label_smoothing=smoothing, drop_path=drop_path, ema=ema, init=init,
                        seed=seed, workers=workers)
    info = retrain(rundir, chosen, label, cfg, resume=resume, device=device)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps({"label": info.label, "val_top1": info.val_top1, "digest": info.arch.digest,
                               "dir": str(Path(run) / "retrain" / info.label), **{
                                   k: info.extra.get(k) for k in ("weights", "val_top1_raw", "val_top1_ema")}}))


@space_app.command("show")
@user_errors
def space_show_cmd(
    preset: Annotated[str, typer.Argument(help="digits, cifar, glit-tiny, glit-small or glit-base.")],
    num_classes: Annotated[int, typer.Option(help="Classes for counting the head (default: 1000 for glit-*, "
                                             "10 otherwise).")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The space's dimensions and choices, its size, and the parameters and multiply-adds it spans."""
    from glit_deploy.nn.counting import describe_space
    from glit_deploy.space import get_space

    space = get_space(preset)
    info = describe_space(space, num_classes or (1000 if preset.startswith("glit-") else 10))
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"search space '{space.name}'", show_header=False)
    s = info["space"]
    table.add_row("input", f"{s['image_size']} px, patch {s['patch_size']}, {info['tokens']} tokens")
    table.add_row("width / depth / heads", f"{s['embed_dim']} / {s['depth']} / {s['num_heads']}")
    table.add_row("global heads G", ", ".join(map(str, s["global_heads"])))
    table.add_row("e_v", ", ".join(f"{v:g}" for v in s["e_v"]))
    table.add_row("e_c", ", ".join(map(str, s["e_c"])))
    table.add_row("kernel sizes", ", ".join(map(str, s["kernel_sizes"])))
    table.add_row("mlp ratios", ", ".join(map(str, s["mlp_ratios"])))
    table.add_row("block configurations", str(info["block_configs"]))
    table.add_row("level-1 splits", f"{info['level1_splits']:,}")
    table.add_row("architectures", f"{info['archs']:.3e}")
    p, m = info["params"], info["macs"]
    table.add_row(f"parameters ({info['num_classes']} classes)", f"{p[0] / 1e6:.3f} M .. {p[1] / 1e6:.3f} M")
    table.add_row("multiply-adds", f"{m[0] / 1e6:.1f} M .. {m[1] / 1e6:.1f} M")
    out.print(table)


@space_app.command("sample")
@user_errors
def space_sample_cmd(
    preset: Annotated[str, typer.Argument(help="Search-space preset.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Write the arch JSON here.")],
    seed: int = 0,
) -> None:
    """Write a uniformly sampled arch of a space as JSON (a starting point for --arch files)."""
    import random

    from glit_deploy.space import get_space

    space = get_space(preset)
    arch = space.sample(random.Random(seed))
    arch.save(output, space=space.name)
    out.print(f"wrote {output}: {arch.describe(space.num_heads)}")


def _parse_split(text: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(g) for g in text.split(",")]
    except ValueError:
        raise GlitError(f"--fixed-split '{text}': expected global heads per block, e.g. 3,3,1,0") from None


def _target(name: str, threads: int) -> Any:
    from glit_deploy.latency import default_target_name, get_target

    return get_target(name or default_target_name(), threads or None)


def _protocol(warmup: int, runs: int) -> Any:
    from glit_deploy.latency import Protocol

    return Protocol(warmup=warmup, runs=runs)


@latency_app.command("profile")
@user_errors
def latency_profile_cmd(
    run: RunOpt,
    target: TargetOpt = "",
    batch_size: BatchOpt = 1,
    threads: ThreadsOpt = 0,
    calibration_models: Annotated[int, typer.Option(min=1, help="Whole models measured to calibrate.")] = 10,
    holdout_models: Annotated[int, typer.Option(min=1, help="Other whole models measured to report the "
                                                "error.")] = 20,
    warmup: WarmupOpt = 10,
    runs: RunsOpt = 50,
    cache: Annotated[bool, typer.Option(help="Reuse a table measured before with the same key.")] = True,
) -> None:
    """Measure every block configuration on the target, calibrate on whole models, report the error."""
    from glit_deploy.rundir import RunDir
    from glit_deploy.search.runner import latency_table_path, run_latency_model

    rundir = RunDir(run)
    tgt = _target(target, threads)
    model = run_latency_model(rundir, tgt, batch_size, _protocol(warmup, runs), calibration_models,
                              holdout_models, use_cache=cache)
    space = rundir.space()
    table = Table(title=f"latency model: {tgt.name}, batch {batch_size}", show_header=False)
    table.add_row("device", f"{model.key['device']} ({model.key['threads']} threads)")
    table.add_row("table", "cache hit (nothing measured)" if model.cache_hit else
                  f"measured in {model.build_seconds:.1f} s")
    table.add_row("block configurations", str(len(model.block_ms)))
    if model.reference_ms is not None:
        table.add_row("machine speed", f"drifted {100 * model.reference_drift:.1f} % during the build; every timing "
                      f"rescaled to a reference block at {model.reference_ms:.4f} ms")
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
    table.add_row("written", str(latency_table_path(rundir, tgt.name, batch_size)))
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
    run: RunOpt,
    arch: ArchOpt,
    target: TargetOpt = "",
    batch_size: BatchOpt = 1,
    threads: ThreadsOpt = 0,
    warmup: WarmupOpt = 10,
    runs: RunsOpt = 50,
) -> None:
    """Measure one whole model end to end on the target."""
    import torch

    from glit_deploy.nn.model import GLiT

    resolved, space, num_classes = _arch_and_space(run, arch)
    tgt = _target(target, threads)
    image = torch.randn(batch_size, space.in_chans, space.image_size, space.image_size)
    timing = tgt.measure(GLiT(resolved, space, num_classes), image, _protocol(warmup, runs))
    typer.echo(json.dumps({"target": tgt.name, "batch_size": batch_size, "digest": resolved.digest,
                           **timing.to_dict()}))


@latency_app.command("predict")
@user_errors
def latency_predict_cmd(
    run: RunOpt,
    arch: ArchOpt,
    target: TargetOpt = "",
    batch_size: BatchOpt = 1,
) -> None:
    """Predict one arch's latency from the run's latency table (no measurement)."""
    from glit_deploy.latency import LatencyModel, default_target_name
    from glit_deploy.rundir import RunDir
    from glit_deploy.search.runner import latency_table_path

    resolved, _, _ = _arch_and_space(run, arch)
    name = target or default_target_name()
    model = LatencyModel.load(latency_table_path(RunDir(run), name, batch_size))
    typer.echo(json.dumps({"target": name, "batch_size": batch_size, "digest": resolved.digest,
                           "predicted_ms": model.predict_ms(resolved)}))


@app.command("search")
@user_errors
def search_cmd(
    run: RunOpt,
    latency_budget: Annotated[list[str], typer.Option("--latency-budget", help="Budget such as 5ms or 800us, "
                                                      "or auto (the middle of the space's range on the target); "
                                                      "repeat for several.")],
    target: TargetOpt = "",
    batch_size: BatchOpt = 1,
    threads: ThreadsOpt = 0,
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
    warmup: WarmupOpt = 10,
    runs: RunsOpt = 50,
    fixed_split: Annotated[str, typer.Option(help="Skip level 1: search the details of this split, given as "
                                             "global heads per block, e.g. 3,3,3,3,3,3.")] = "",
    seed: int = 0,
    device: Annotated[str, typer.Option(help="Where candidates are evaluated: auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue the run's interrupted search.")] = False,
) -> None:
    """Two-level evolutionary search under latency budgets measured on the target."""
    from glit_deploy.rundir import RunDir
    from glit_deploy.search import SearchConfig, parse_latency
    from glit_deploy.search.runner import search

    budgets = [b if b == "auto" else parse_latency(b) for b in latency_budget]
    cfg = SearchConfig(population=population, generations=generations, parents=parents, mutations=mutations,
                       crossovers=crossovers, mutation_prob=mutation_prob, seed=seed, max_params=max_params,
                       max_macs=max_macs, calib_batches=calib_batches, batch_size=eval_batch_size,
                       fixed_split=_parse_split(fixed_split))
    summary = search(RunDir(run), budgets, _target(target, threads), batch_size, cfg, resume=resume,
                     level2_epochs=level2_epochs, protocol=_protocol(warmup, runs),
                     calibration_models=calibration_models, holdout_models=holdout_models, device=device)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    table = Table(title=f"search on {summary['target']} (batch {summary['batch_size']}): "
                  f"{summary['evaluated']} evaluations, {summary['cache_hits']} cache hits, "
                  f"{summary['seconds']:.0f} s")
    for column in ("budget", "val top-1", "predicted", "measured", "params", "multiply-adds", "arch file"):
        table.add_column(column)
    failed = []
    for label, result in summary["budgets"].items():
        if not result.get("digest"):
            failed.append(f"{label}: {result['error']}")
            table.add_row(label, "-", "-", "-", "-", "-", result["error"])
            continue
        table.add_row(label, f"{result['top1']:.2f} %", f"{result['predicted_ms']:.3f} ms",
                      f"{result['measured_ms']:.3f} ms", f"{result['params'] / 1e6:.3f} M",
                      f"{result['macs'] / 1e6:.1f} M", str(Path(run) / "search" / f"best-{label}.json"))
    out.print(table)
    out.print(f"Pareto front: {Path(run) / 'search' / 'pareto.png'}")
    if failed:
        err.print(Text.assemble(("error: ", "bold red"), "; ".join(failed)), soft_wrap=True)
        raise typer.Exit(1)


# Commands of the later stages live in their own modules, which register on `app` when imported.
from glit_deploy.cli import export_cmds, pipeline_cmds, serve_cmds  # noqa: E402, F401


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. `glit space show cifar | head`
        sys.exit(0)
