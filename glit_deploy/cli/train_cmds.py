"""`glit` commands that train: train-supernet, eval-subnet and retrain."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from glit_deploy.cli import ArchOpt, RunOpt, app, out, set_threads, user_errors


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
    distill: Annotated[bool, typer.Option(help="With --sandwich: the smaller archs learn from the largest's "
                                          "outputs (--no-distill: from the labels).")] = True,
    seed: int = 0,
    workers: Annotated[int, typer.Option(min=0, help="Data-loader worker processes.")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="torch CPU threads (0: torch's default).")] = 0,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate largest/smallest every N epochs.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from the run's latest checkpoint.")] = False,
    skip_bad_images: Annotated[bool, typer.Option(help="Leave out image files that do not decode (counted and "
                                                  "recorded) instead of refusing the dataset.")] = False,
    allow_data_change: Annotated[bool, typer.Option(help="With --resume: go on although the dataset changed "
                                                    "under the same path (same classes).")] = False,
) -> None:
    """Train the weight-sharing supernet (one sampled arch per step; DDP under torchrun)."""
    from glit_deploy.rundir import RunDir
    from glit_deploy.space import get_space
    from glit_deploy.train import TrainConfig, train_supernet

    set_threads(threads)
    search_space = get_space(space)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, sandwich=sandwich, distill=distill, seed=seed, workers=workers,
                      eval_every=eval_every)
    result = train_supernet(RunDir(run), search_space, data, cfg, resume=resume, device=device,
                            skip_bad_images=skip_bad_images, allow_data_change=allow_data_change)
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
    allow_data_change: Annotated[bool, typer.Option(help="Evaluate although the run's dataset changed under "
                                                    "the same path (same classes).")] = False,
) -> None:
    """Validation top-1 of a subnet with inherited supernet weights, after BN recalibration."""
    from glit_deploy.archs import resolve_arch
    from glit_deploy.rundir import RunDir
    from glit_deploy.train import eval_subnet

    set_threads(threads)
    rundir = RunDir(run)
    space = rundir.space()
    result = eval_subnet(rundir, resolve_arch(arch, space), calib_batches, batch_size,
                         allow_data_change=allow_data_change)
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
    space: Annotated[str | None, typer.Option(help="Search-space preset of the arch, for a run without a supernet "
                                              "(e.g. glit-tiny with --arch glit-tiny-paper); checked otherwise.")]
    = None,
    data: Annotated[str | None, typer.Option(help="digits | cifar10:DIR | image-folder DIR, for a run without a "
                                             "supernet; checked against run.json otherwise.")] = None,
    skip_bad_images: Annotated[bool, typer.Option(help="With --data: leave out image files that do not decode "
                                                  "(counted and recorded) instead of refusing the dataset.")]
    = False,
    allow_data_change: Annotated[bool, typer.Option(help="Go on although the run's dataset changed under the same "
                                                    "path (same classes).")] = False,
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
    """Retrain a found arch as a standalone model with the DeiT recipe (DDP under torchrun).

    On a new run directory (no supernet), --space, --data and --arch train any arch from scratch."""
    from glit_deploy.retrain import RetrainConfig, resolve_retrain_arch, retrain, retrain_space
    from glit_deploy.rundir import RunDir

    set_threads(threads)
    rundir = RunDir(run)
    search_space = retrain_space(rundir, space, data)
    chosen, label = resolve_retrain_arch(rundir, arch, budget, search_space)
    cfg = RetrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        warmup_epochs=warmup_epochs, mixup=mixup, cutmix=cutmix, rand_augment=rand_augment,
                        reprob=reprob, label_smoothing=smoothing, drop_path=drop_path, ema=ema, init=init,
                        seed=seed, workers=workers)
    info = retrain(rundir, chosen, label, cfg, resume=resume, device=device,
                   space=search_space if space else None, data_spec=data, skip_bad_images=skip_bad_images,
                   allow_data_change=allow_data_change)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps({"label": info.label, "val_top1": info.val_top1, "digest": info.arch.digest,
                               "dir": str(Path(run) / "retrain" / info.label), **{
                                   k: info.extra.get(k) for k in ("weights", "val_top1_raw", "val_top1_ema")}}))
