"""Supernet training (one sampled arch per step, or the sandwich rule), evaluation of subnets.

Determinism: the arch of a step is a function of (seed, epoch, step), and every epoch reseeds the
data order and torch's RNG from (seed, epoch, rank). A run killed after epoch k and resumed
therefore ends with the same weights as an uninterrupted run (on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import dispatch_clip_grad
from torch import Tensor, nn
from torch.utils.data import DataLoader

from glit_deploy import distributed
from glit_deploy.checkpoint import load_checkpoint, load_model_weights, restore_training_state, save_checkpoint
from glit_deploy.data import (
    DataBundle,
    canonical_spec,
    check_same_dataset,
    load_data,
    load_run_data,
    make_loader,
    print_summary,
)
from glit_deploy.errors import CheckpointError, RunError
from glit_deploy.nn import Supernet, extreme_arch, recalibrate_bn
from glit_deploy.plots import plot_training_curves
from glit_deploy.rundir import RunDir
from glit_deploy.space import Arch, SearchSpace

console = Console(stderr=True)


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    warmup_lr: float = 1e-6
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    drop_path: float = 0.0
    sandwich: bool = False
    sandwich_random: int = 2
    # Sandwich: the archs after the first learn from its outputs (in-place distillation) or, when False,
    # from the labels, as the first does.
    distill: bool = True
    seed: int = 0
    workers: int = 0
    calib_batches: int = 8
    eval_every: int = 1
    split: list[int] | None = None  # train only archs with this global/local split (level-2 fine-tuning)

    def __post_init__(self) -> None:
        if not self.distill and not self.sandwich:
            raise RunError("--no-distill chooses what the sandwich rule's smaller archs learn from: "
                           "it needs --sandwich")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def step_archs(space: SearchSpace, cfg: TrainConfig, epoch: int, step: int) -> list[Arch]:
    """The archs trained at one step: the same on every rank, from (seed, epoch, step) alone."""
    rng = random.Random(f"{cfg.seed}/{epoch}/{step}")
    if cfg.split is not None:
        return [space.sample(rng, split=cfg.split) for _ in range(1 + cfg.sandwich * cfg.sandwich_random)]
    if not cfg.sandwich:
        return [space.sample(rng)]
    return [extreme_arch(space, True), extreme_arch(space, False)] + [
        space.sample(rng) for _ in range(cfg.sandwich_random)]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(forward: Callable[[Tensor], Tensor], loader: DataLoader, device: torch.device,
             ctx: distributed.DistContext | None = None) -> float:
    """Top-1 accuracy (percent) over a loader (summed across ranks when distributed)."""
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            correct += int((forward(x).argmax(-1) == y).sum())
        total += len(y)
    if ctx is not None:
        correct, total = distributed.all_reduce_sum(ctx, [correct, total])
    return 100.0 * correct / max(total, 1)


def calibration_batches(bundle: DataBundle, batch_size: int, count: int, device: torch.device
                        ) -> Iterator[Tensor]:
    """The same `count` training batches (no augmentation) every time, for BN recalibration."""
    loader = make_loader(bundle.calib, batch_size, shuffle=True, seed=12345)
    for i, (x, _) in enumerate(loader):
        if i >= count:
            break
        yield x.to(device)


def evaluate_subnet(supernet: Supernet, arch: Arch, bundle: DataBundle, batch_size: int, calib_batches: int,
                    device: torch.device, ctx: distributed.DistContext | None = None,
                    val_loader: DataLoader | None = None) -> float:
    """Validation top-1 of the inherited-weight subnet after BatchNorm recalibration."""
    recalibrate_bn(supernet, calibration_batches(bundle, batch_size, calib_batches, device),
                   lambda x: supernet(x, arch))
    loader = val_loader or make_loader(bundle.val, batch_size * 2, shuffle=False)
    return evaluate(lambda x: supernet(x, arch), loader, device, ctx)


def training_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def prepare_run(run: RunDir, space: SearchSpace, data_spec: str, bundle: DataBundle, resume: bool,
                allow_data_change: bool = False) -> None:
    """Record the space and dataset in run.json, refusing to mix two experiments in one run, or to go
    on with a dataset that changed under the same path (unless `allow_data_change`).

    The dataset is recorded absolutely (path, classes, counts per class, fingerprint: DataBundle.describe)
    so that later stages load it from any working directory and notice a change."""
    if run.exists():
        meta = run.load_meta()
        if "space" in meta and SearchSpace.from_dict(meta["space"]) != space:
            raise RunError(f"{run.path} was created for space '{meta['space']['name']}'; use another --run")
        recorded = meta.get("data")
        if recorded is not None:
            if canonical_spec(recorded.get("spec", "")) != canonical_spec(data_spec):
                raise RunError(f"{run.path} was created for data '{recorded.get('spec')}'; use another --run")
            check_same_dataset(recorded, bundle.describe(), allow_data_change)
    if not resume and (run.supernet / "latest.json").exists():
        raise RunError(f"{run.path} already holds a supernet checkpoint; pass --resume to continue it "
                       "or choose a new --run")
    run.update_meta(space=space.to_dict(), data={**bundle.describe(), "given": data_spec})


def train_supernet(run: RunDir, space: SearchSpace, data_spec: str, cfg: TrainConfig, resume: bool = False,
                   device: str = "auto", stop_after_epoch: int | None = None, skip_bad_images: bool = False,
                   allow_data_change: bool = False) -> dict[str, Any]:
    """Train the weight-sharing supernet; returns the last epoch's metrics."""
    ctx = distributed.setup(device)
    try:
        bundle = load_data(data_spec, space.image_size, skip_bad_images=skip_bad_images, report=False)
        if ctx.is_main:
            prepare_run(run, space, data_spec, bundle, resume, allow_data_change)
            print_summary(bundle)  # after the run accepted it: a refused dataset ends in its one error line
            run.record_command("train-supernet", {"space": space.name, "data": data_spec, "resume": resume,
                                                  "world_size": ctx.world_size, **asdict(cfg)})
        distributed.barrier(ctx)
        return train_stage(run.supernet, space, bundle, cfg, resume, ctx, stop_after_epoch)
    finally:
        distributed.teardown(ctx)


def train_stage(stage_dir: Path, space: SearchSpace, bundle: DataBundle, cfg: TrainConfig, resume: bool,
                ctx: distributed.DistContext, stop_after_epoch: int | None = None,
                init_weights: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """The training loop, writing checkpoints to `stage_dir` (the supernet, or a fine-tuning stage)."""
    checkpoint = load_checkpoint(stage_dir) if resume else None
    if checkpoint is not None:
        saved = TrainConfig.from_dict(checkpoint.state.get("config", {}))
        if saved != cfg and ctx.is_main:
            changed = [f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(saved, f.name)]
            console.print(f"[yellow]resuming with the checkpoint's settings; ignoring changed {', '.join(changed)}")
        cfg = saved

    torch.manual_seed(cfg.seed)
    model = Supernet(space, bundle.num_classes, drop_path_rate=cfg.drop_path)
    if init_weights is not None:
        load_model_weights(model, init_weights, "the initial weights")
    model = model.to(ctx.device)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = make_loader(bundle.train, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.workers,
                         drop_last=True, rank=ctx.rank, world_size=ctx.world_size)
    val_loader = make_loader(bundle.val, cfg.batch_size * 2, shuffle=False, rank=ctx.rank,
                             world_size=ctx.world_size)
    updates_per_epoch = len(loader)
    if updates_per_epoch == 0:
        raise RunError(f"batch size {cfg.batch_size} is larger than the training split ({len(bundle.train)})")
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs,
                                       warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported() \
        else None

    start_epoch = 0
    if checkpoint is not None:
        load_model_weights(model, checkpoint.weights, stage_dir)
        start_epoch = restore_training_state(checkpoint, optimizer, scheduler, stage_dir)
        if ctx.is_main:
            console.print(f"resuming {stage_dir} after epoch {checkpoint.epoch}")

    train_model: nn.Module = model
    if ctx.enabled:
        # Each step trains a subset of the weights: unused ones must be expected.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True)

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    distill = SoftTargetCrossEntropy()
    metrics_path = stage_dir / "metrics.jsonl"
    probes = {"largest": extreme_arch(space, True), "smallest": extreme_arch(space, False)}
    if cfg.split is not None:
        probes = {"split_middle": space.with_split(cfg.split)}
    last: dict[str, Any] = {"epoch": start_epoch - 1}
    with training_progress() if ctx.is_main else contextlib.nullcontext() as progress:
        total_steps = (cfg.epochs - start_epoch) * updates_per_epoch
        task = progress.add_task("supernet", total=total_steps, info="") if progress else None
        for epoch in range(start_epoch, cfg.epochs):
            # Everything random in an epoch derives from (seed, epoch, rank): resumable exactly.
            torch.manual_seed(cfg.seed * 100003 + epoch * 101 + ctx.rank)
            loader.generator.manual_seed(cfg.seed * 100003 + epoch)
            if ctx.enabled:
                loader.sampler.set_epoch(epoch)
            model.train()
            started = time.perf_counter()
            loss_sum, seen, sync_checks = 0.0, 0, 0
            for step, (x, y) in enumerate(loader):
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                archs = step_archs(space, cfg, epoch, step)
                if not distributed.all_same(ctx, int(archs[-1].digest[:15], 16)):
                    raise RuntimeError(f"ranks disagree on the arch at epoch {epoch} step {step}")
                sync_checks += ctx.enabled
                optimizer.zero_grad(set_to_none=True)
                loss = _train_step(train_model, x, y, archs, criterion, distill if cfg.distill else None,
                                   ctx.device, scaler)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.clip_grad > 0:
                    dispatch_clip_grad(model.parameters(), cfg.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step_update(epoch * updates_per_epoch + step + 1)
                if not math.isfinite(loss):
                    raise RuntimeError(f"training diverged (loss {loss}) at epoch {epoch} step {step}")
                loss_sum += loss * len(y)
                seen += len(y)
                if progress:
                    progress.update(task, advance=1, info=f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.3f}")
            loss_sum, seen = distributed.all_reduce_sum(ctx, [loss_sum, seen])
            last = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                    "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - started,
                    "steps": updates_per_epoch, "world_size": ctx.world_size, "arch_sync_checks": sync_checks}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                for label, arch in probes.items():
                    last[f"val_top1_{label}"] = evaluate_subnet(
                        model, arch, bundle, cfg.batch_size, cfg.calib_batches, ctx.device, ctx, val_loader)
            if ctx.is_main:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "config": asdict(cfg), "metrics": last}
                save_checkpoint(stage_dir, epoch, model.state_dict(), state, {"space": space.name})
                append_jsonl(metrics_path, last)
                if any(k.startswith("val_top1") for k in last):
                    plot_training_curves(metrics_path, stage_dir / "curves.png")
                summary = ", ".join(f"{k} {v:.2f}" for k, v in last.items() if k.startswith("val_top1"))
                console.print(f"epoch {epoch + 1}/{cfg.epochs}: loss {last['train_loss']:.4f} {summary}")
            distributed.barrier(ctx)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    return {**last, "rank": ctx.rank}


def _train_step(model: nn.Module, x: Tensor, y: Tensor, archs: list[Arch], criterion: nn.Module,
                distill: nn.Module | None, device: torch.device, scaler: torch.amp.GradScaler | None) -> float:
    """One arch: cross-entropy. Sandwich: the first (largest) learns from the labels, the others from its
    outputs through `distill`, or from the labels too when `distill` is None. Returns the first arch's loss."""
    def backward(loss: Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    with autocast(device):
        logits = model(x, archs[0])
        loss = criterion(logits, y)
    backward(loss)
    total = loss.item()
    if len(archs) > 1:
        teacher = F.softmax(logits.detach().float(), dim=-1) if distill is not None else None
        for arch in archs[1:]:
            with autocast(device):
                student_logits = model(x, arch)
                student_loss = criterion(student_logits, y) if teacher is None \
                    else distill(student_logits.float(), teacher)
            backward(student_loss)
    return total


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def load_supernet(run: RunDir, device: str | torch.device = "cpu", allow_data_change: bool = False,
                  update_record: bool = True) -> tuple[Supernet, DataBundle]:
    """The run's latest supernet weights and its dataset (`load_run_data`: as recorded in run.json, which
    must not have changed since unless `allow_data_change`)."""
    space = run.space()
    if not (run.load_meta().get("data") or {}).get("spec"):
        raise RunError(f"{run.meta_path} records no dataset")
    checkpoint = load_checkpoint(run.supernet, with_state=False)
    if checkpoint is None:
        raise CheckpointError(f"{run.path} has no supernet checkpoint; run `glit train-supernet` first")
    bundle = load_run_data(run, space.image_size, allow_data_change, update_record=update_record)
    model = Supernet(space, bundle.num_classes)
    load_model_weights(model, checkpoint.weights, run.supernet)
    return model.to(device).eval(), bundle


def eval_subnet(run: RunDir, arch: Arch, calib_batches: int = 8, batch_size: int = 128,
                device: str = "cpu", allow_data_change: bool = False) -> dict[str, Any]:
    """Validation top-1 of one arch with inherited supernet weights (after BN recalibration)."""
    from glit_deploy.nn import arch_cost

    dev = torch.device(device)
    supernet, bundle = load_supernet(run, dev, allow_data_change)
    top1 = evaluate_subnet(supernet, arch, bundle, batch_size, calib_batches, dev)
    cost = arch_cost(supernet.space, arch, bundle.num_classes)
    return {"arch": arch.to_dict(), "digest": arch.digest, "params": cost.params, "macs": cost.macs,
            "val_top1": top1, "val_images": len(bundle.val), "calib_batches": calib_batches}
