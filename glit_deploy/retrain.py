"""Retraining a found architecture as a standalone model, with the DeiT recipe through timm.

The recipe (DESIGN.md): AdamW, cosine schedule with warm-up, label smoothing, RandAugment, Mixup and
CutMix, random erasing, drop path, gradient clipping and an EMA of the weights; every piece is
timm's. The model starts from scratch or from the supernet's inherited weights (BN recalibrated). A run
without a supernet works too: `--space` and `--data` give what run.json would otherwise record.

Same guarantees as supernet training: per-epoch atomic checkpoints (the EMA weights travel in the
same safetensors file under `ema.`), `--resume` continues exactly, torchrun/DDP shards the data.
The final model is whichever of the raw and the EMA weights scores higher on the validation split
(the split is held out of the training images; the test set is never touched).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn

from glit_deploy import distributed
from glit_deploy.checkpoint import load_checkpoint, load_model_weights, restore_training_state, save_checkpoint
from glit_deploy.data import (
    DataBundle,
    canonical_spec,
    deit_train_transform,
    load_data,
    load_run_data,
    make_loader,
    set_train_transform,
)
from glit_deploy.errors import CheckpointError, RunError
from glit_deploy.latency.budget import Budget
from glit_deploy.nn import GLiT, Supernet, recalibrate_bn
from glit_deploy.plots import plot_training_curves
from glit_deploy.rundir import RunDir
from glit_deploy.space import NAMED_ARCHS, PRESETS, Arch, SearchSpace, get_space
from glit_deploy.train import (
    append_jsonl,
    autocast,
    calibration_batches,
    evaluate,
    load_supernet,
    prepare_run,
    training_progress,
)
from glit_deploy.trained import (
    INFO_FILE,
    TrainedModelInfo,
    float32_top1,
    load_trained_info,
    retrain_dir,
    save_trained_model,
)

console = Console(stderr=True)
EMA_PREFIX = "ema."


# Settings that do not change what is trained: a resume may change them.
NO_EFFECT_ON_WEIGHTS = {"workers", "eval_every"}


@dataclass
class RetrainConfig:
    """The DeiT recipe, scaled to short runs: timm names in brackets."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3  # peak AdamW learning rate (DeiT: 5e-4 per 512 images, for 300 epochs)
    min_lr: float = 1e-5
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm auto-augment string ("" or "none": off)
    reprob: float = 0.25  # random-erasing probability
    drop_path: float = 0.1
    clip_grad: float = 1.0
    ema: bool = True
    ema_decay: float = 0.9998  # with timm's warm-up, so that short runs average sensibly too
    init: str = "scratch"  # scratch | supernet
    calib_batches: int = 8  # BN recalibration of inherited weights
    seed: int = 0
    workers: int = 0
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.init not in ("scratch", "supernet"):
            raise RunError(f"--init must be scratch or supernet, not '{self.init}'")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise RunError(f"Mixup/CutMix need an even batch size, got {self.batch_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def retrain_space(run: RunDir, space_name: str | None, data_spec: str | None) -> SearchSpace:
    """The space to retrain in: the one run.json records or, on a run without one, `space_name`.

    A run without a recorded space or dataset needs both `--space` and `--data`; a given space or dataset
    that is not the recorded one is refused (whether the recorded dataset changed is `retrain`'s check).
    """
    meta = run.load_meta() if run.exists() else {}
    missing = [option for option, key, given in (("--space", "space", space_name), ("--data", "data", data_spec))
               if key not in meta and not given]
    if missing:
        raise RunError(f"{run.path} has no supernet or recorded {' and '.join(m[2:] for m in missing)}: give "
                       f"{' and '.join(missing)} to retrain from scratch (e.g. --space digits --data digits)")
    recorded_data = meta.get("data", {}).get("spec")
    if data_spec and recorded_data and canonical_spec(data_spec) != canonical_spec(recorded_data):
        raise RunError(f"{run.path} was created for data '{recorded_data}', not '{data_spec}': leave out --data, "
                       "or use another --run")
    if not space_name:
        return run.space()
    if space_name in NAMED_ARCHS and space_name not in PRESETS:
        raise RunError(f"'{space_name}' is an arch, not a space: use --space {NAMED_ARCHS[space_name][0]} "
                       f"--arch {space_name}")
    space = get_space(space_name)
    if "space" in meta and SearchSpace.from_dict(meta["space"]) != space:
        raise RunError(f"{run.path} was created for space '{meta['space'].get('name')}', not '{space_name}': "
                       "leave out --space, or use another --run")
    return space


def resolve_retrain_arch(run: RunDir, arch_spec: str | None, budget: str | None,
                         space: SearchSpace | None = None) -> tuple[Arch, str]:
    """The arch to retrain and its label: an arch spec, a search budget, or the only search winner.
    `space`: the space to resolve in (default: the run's)."""
    from glit_deploy.archs import resolve_arch

    space = space or run.space()
    if arch_spec and budget:
        raise RunError("give either --arch or --budget, not both")
    if arch_spec:
        arch = resolve_arch(arch_spec, space)
        return arch, f"arch-{arch.digest[:8]}"
    search_dir = run.path / "search"
    winners = sorted(p.name.removeprefix("best-").removesuffix(".json") for p in search_dir.glob("best-*.json"))
    if budget:
        label = Budget.parse(budget).label
        if label not in winners:
            raise RunError(f"{run.path} has no search winner for budget {label} "
                           f"(winners: {', '.join(winners) or 'none; run `glit search` first'})")
    elif len(winners) == 1:
        label = winners[0]
    else:
        raise RunError(f"{run.path} has {len(winners)} search winners ({', '.join(winners) or 'none'}): "
                       "pick one with --budget, or give --arch")
    path = search_dir / f"best-{label}.json"
    return space.validate(Arch.load(path), source=str(path)), label


def retrain(run: RunDir, arch: Arch, label: str, cfg: RetrainConfig, resume: bool = False, device: str = "auto",
            stop_after_epoch: int | None = None, space: SearchSpace | None = None, data_spec: str | None = None,
            skip_bad_images: bool = False, allow_data_change: bool = False) -> TrainedModelInfo:
    """Train `arch` as a standalone model into runs/NAME/retrain/LABEL; returns its info.

    `space` and `data_spec` (from `retrain_space` and `--data`) are recorded in run.json when it has none,
    and must match what it records otherwise; left out, the run's own are used. `skip_bad_images` applies
    to a dataset given here; `allow_data_change` goes on with a recorded dataset that changed since.
    """
    ctx = distributed.setup(device)
    try:
        return _retrain(run, arch, label, cfg, resume, ctx, stop_after_epoch, space, data_spec, skip_bad_images,
                        allow_data_change)
    finally:
        distributed.teardown(ctx)


def _retrain(run: RunDir, arch: Arch, label: str, cfg: RetrainConfig, resume: bool, ctx: distributed.DistContext,
             stop_after_epoch: int | None, space: SearchSpace | None, data_spec: str | None, skip_bad_images: bool,
             allow_data_change: bool) -> TrainedModelInfo:
    stage = retrain_dir(run, label)
    if cfg.init == "supernet" and load_checkpoint(run.supernet, with_state=False) is None:
        raise RunError(f"--init supernet needs a trained supernet, and {run.path} has none: use --init scratch, "
                       "or train one there with `glit train-supernet`")
    bundle: DataBundle | None = None
    if data_spec is not None:
        space = space or run.space()
        bundle = load_data(data_spec, space.image_size, skip_bad_images=skip_bad_images, report=ctx.is_main)
        if ctx.is_main:
            # Records the space and data on a fresh run; on a recorded one, refuses any that differ or changed.
            # resume=True: a supernet already in the run is no reason to refuse a retraining.
            prepare_run(run, space, data_spec, bundle, resume=True, allow_data_change=allow_data_change)
        distributed.barrier(ctx)
    elif space is not None and space != run.space():
        raise RunError(f"{run.path} was created for space '{run.space().name}', not '{space.name}'")
    space = run.space()
    meta = run.load_meta()
    data_spec = meta.get("data", {}).get("spec")
    if data_spec is None:
        raise RunError(f"{run.meta_path} records no dataset")
    if (stage / INFO_FILE).exists() and resume:
        info = load_trained_info(run, label)
        _same_retraining(stage, info.arch.to_dict(), info.extra.get("recipe"), arch, cfg)
        if ctx.is_main:
            console.print(f"{stage} is already retrained; nothing to do")
        return info
    checkpoint = load_checkpoint(stage) if resume else None
    if not resume and (stage / "latest.json").exists():
        raise RunError(f"{stage} already holds a retraining: pass --resume to continue it, or remove the folder")
    if checkpoint is not None:
        _same_retraining(stage, checkpoint.state.get("arch"), checkpoint.state.get("config"), arch, cfg)

    bundle = bundle or load_run_data(run, space.image_size, allow_data_change, report=ctx.is_main,
                                     update_record=ctx.is_main)
    set_recipe_transform(bundle, cfg)
    if ctx.is_main:
        stage.mkdir(parents=True, exist_ok=True)
        arch.save(stage / "arch.json", space=space.name)
        run.record_command("retrain", {"label": label, "digest": arch.digest, "resume": resume,
                                       "world_size": ctx.world_size, **asdict(cfg)})

    torch.manual_seed(cfg.seed)
    model = GLiT(arch, space, bundle.num_classes, drop_path_rate=cfg.drop_path)
    if cfg.init == "supernet" and checkpoint is None:
        model.load_state_dict(_inherited_weights(run, arch, cfg, bundle))
    trained = train_classifier(model, bundle, cfg, stage, label, ctx, checkpoint, identity={"arch": arch.to_dict()},
                               checkpoint_meta={"space": space.name, "label": label},
                               stop_after_epoch=stop_after_epoch)
    if trained.stopped:
        return TrainedModelInfo(label=label, arch=arch, space=space, class_names=bundle.class_names,
                                mean=bundle.mean, std=bundle.std, image_size=bundle.image_size,
                                data=data_spec, val_top1=None, extra={"stopped_after_epoch": trained.epochs_done - 1})
    final, chosen = trained.val_top1, trained.chosen
    info = TrainedModelInfo(label=label, arch=arch, space=space, class_names=bundle.class_names, mean=bundle.mean,
                            std=bundle.std, image_size=bundle.image_size, data=data_spec, val_top1=final[chosen],
                            extra={"weights": chosen, "val_top1_raw": final["raw"],
                                   "val_top1_ema": final.get("ema"), "epochs": cfg.epochs, "init": cfg.init,
                                   "val_images": len(bundle.val), "recipe": asdict(cfg)})
    if ctx.is_main:
        save_trained_model(run, trained.model.to("cpu"), info)
        console.print(f"retrained {label}: validation top-1 {final[chosen]:.2f} % ({chosen} weights) -> {stage}")
    distributed.barrier(ctx)
    return info


@dataclass
class TrainedClassifier:
    """What `train_classifier` returns: the better of the raw and EMA weights, and both scores."""

    model: nn.Module  # the chosen weights' module (in eval mode)
    val_top1: dict[str, float]  # "raw" and, with an EMA, "ema"
    chosen: str
    epochs_done: int
    stopped: bool = False  # True: stopped by `stop_after_epoch`, not finished (model and scores are empty)


def train_classifier(model: nn.Module, bundle: DataBundle, cfg: RetrainConfig, stage: Path, label: str,
                     ctx: distributed.DistContext, checkpoint: Any = None, identity: dict[str, Any] | None = None,
                     checkpoint_meta: dict[str, Any] | None = None, stop_after_epoch: int | None = None
                     ) -> TrainedClassifier:
    """Train any image classifier on `bundle` with the retraining recipe (`cfg`; every piece timm's),
    checkpointing every epoch in `stage` and resuming exactly from `checkpoint`. `identity` (what is
    trained, e.g. the arch) is stored with each checkpoint. GLiT retraining and the evidence's CNN
    baselines both train through here, so their recipes cannot drift apart.

    The training transform of `bundle` must already be set (`deit_train_transform`)."""
    model = model.to(ctx.device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = make_loader(bundle.train, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.workers,
                         drop_last=True, rank=ctx.rank, world_size=ctx.world_size)
    val_loader = make_loader(bundle.val, cfg.batch_size * 2, shuffle=False, rank=ctx.rank, world_size=ctx.world_size)
    updates_per_epoch = len(loader)
    if updates_per_epoch == 0:
        raise RunError(f"batch size {cfg.batch_size} is larger than the training split ({len(bundle.train)})")
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs,
                                       warmup_epochs=min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)),
                                       warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=bundle.num_classes)
    criterion: nn.Module = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(cfg.label_smoothing)

    start_epoch = 0
    if checkpoint is not None:
        own = {k: v for k, v in checkpoint.weights.items() if not k.startswith(EMA_PREFIX)}
        load_model_weights(model, own, stage)
        if ema is not None:
            ema_weights = {k[len(EMA_PREFIX):]: v for k, v in checkpoint.weights.items() if k.startswith(EMA_PREFIX)}
            load_model_weights(ema.module, ema_weights, f"{stage} (EMA)")
        start_epoch = restore_training_state(checkpoint, optimizer, scheduler, stage)
        if ctx.is_main:
            console.print(f"resuming {stage} after epoch {checkpoint.epoch}")

    train_model: nn.Module = model
    if ctx.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    metrics_path = stage / "metrics.jsonl"
    last: dict[str, Any] = {"epoch": start_epoch - 1}
    with training_progress() if ctx.is_main else contextlib.nullcontext() as progress:
        task = progress.add_task(f"retrain {label}", total=(cfg.epochs - start_epoch) * updates_per_epoch,
                                 info="") if progress else None
        for epoch in range(start_epoch, cfg.epochs):
            # Everything random in an epoch derives from (seed, epoch, rank): resumable exactly.
            epoch_seed = cfg.seed * 100003 + epoch * 101 + ctx.rank
            torch.manual_seed(epoch_seed)
            random.seed(epoch_seed)  # RandAugment draws from `random`, Mixup/CutMix from numpy
            np.random.seed(epoch_seed)
            loader.generator.manual_seed(cfg.seed * 100003 + epoch)
            if ctx.enabled:
                loader.sampler.set_epoch(epoch)
            model.train()
            started = time.perf_counter()
            loss_sum, seen = 0.0, 0
            for step, (x, y) in enumerate(loader):
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                if mixup is not None:
                    x, y_train = mixup(x, y)
                else:
                    y_train = y
                optimizer.zero_grad(set_to_none=True)
                with autocast(ctx.device):
                    loss = criterion(train_model(x).float(), y_train)
                loss.backward()
                if cfg.clip_grad > 0:
                    dispatch_clip_grad(model.parameters(), cfg.clip_grad)
                optimizer.step()
                global_step = epoch * updates_per_epoch + step + 1
                scheduler.step_update(global_step)
                if ema is not None:
                    ema.update(model, step=global_step)
                value = loss.item()
                if not math.isfinite(value):
                    raise RuntimeError(f"retraining diverged (loss {value}) at epoch {epoch} step {step}")
                loss_sum += value * len(y)
                seen += len(y)
                if progress:
                    progress.update(task, advance=1, info=f"epoch {epoch + 1}/{cfg.epochs} loss {value:.3f}")
            loss_sum, seen = distributed.all_reduce_sum(ctx, [loss_sum, seen])
            last = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
                    "epoch_seconds": time.perf_counter() - started, "steps": updates_per_epoch,
                    "world_size": ctx.world_size}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                model.eval()
                last["val_top1"] = evaluate(model, val_loader, ctx.device, ctx)
                if ema is not None:
                    last["val_top1_ema"] = evaluate(ema.module, val_loader, ctx.device, ctx)
            if ctx.is_main:
                weights = dict(model.state_dict())
                if ema is not None:
                    weights.update({EMA_PREFIX + k: v for k, v in ema.module.state_dict().items()})
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "config": asdict(cfg), **(identity or {}), "metrics": last}
                save_checkpoint(stage, epoch, weights, state, checkpoint_meta or {"label": label})
                append_jsonl(metrics_path, last)
                plot_training_curves(metrics_path, stage / "curves.png")
                summary = ", ".join(f"{k} {v:.2f}" for k, v in last.items() if k.startswith("val_top1"))
                console.print(f"epoch {epoch + 1}/{cfg.epochs}: loss {last['train_loss']:.4f} {summary}")
            distributed.barrier(ctx)
            if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch + 1 < cfg.epochs:
                return TrainedClassifier(model, {}, "", epoch + 1, stopped=True)

    model.eval()
    final = {"raw": evaluate(model, val_loader, ctx.device, ctx)}
    if ema is not None:
        final["ema"] = evaluate(ema.module, val_loader, ctx.device, ctx)
    chosen = max(final, key=lambda k: final[k])
    chosen_model = ema.module if chosen == "ema" else model
    return TrainedClassifier(chosen_model.eval(), final, chosen, cfg.epochs)


def _same_retraining(stage: Path, saved_arch: dict[str, Any] | None, saved_config: dict[str, Any] | None,
                     arch: Arch, cfg: RetrainConfig) -> None:
    """A resume (or a finished retraining asked for again) must be the same arch and recipe: refuse, and say
    what differs, rather than continue or return another training under the same label."""
    if saved_arch is not None and Arch.from_dict(saved_arch).digest != arch.digest:
        raise CheckpointError(f"{stage} holds the retraining of another arch ({Arch.from_dict(saved_arch).digest}, "
                              f"not {arch.digest}): use another label, or remove the folder")
    if saved_config is not None:
        saved = RetrainConfig.from_dict(saved_config)
        changed = [f"{f.name} {getattr(saved, f.name)} -> {getattr(cfg, f.name)}" for f in fields(cfg)
                   if f.name not in NO_EFFECT_ON_WEIGHTS and getattr(cfg, f.name) != getattr(saved, f.name)]
        if changed:
            raise RunError(f"{stage} was trained with other settings ({'; '.join(changed)}): resume it with the "
                           "settings it started with, or retrain under another label")


def set_recipe_transform(bundle: DataBundle, cfg: RetrainConfig) -> None:
    """The recipe's training augmentation (RandAugment, random erasing, on the dataset's crop and flip)."""
    set_train_transform(bundle, deit_train_transform(bundle, _auto_augment(cfg), cfg.reprob))


def _auto_augment(cfg: RetrainConfig) -> str | None:
    return None if cfg.rand_augment in ("", "none", "None") else cfg.rand_augment


def _inherited_weights(run: RunDir, arch: Arch, cfg: RetrainConfig, bundle: Any) -> dict[str, torch.Tensor]:
    """The supernet's weights for `arch`, BatchNorm recalibrated on training images."""
    supernet, _ = load_supernet(run)
    return inherited_model(supernet, arch, bundle, cfg.batch_size, cfg.calib_batches).state_dict()


def inherited_model(supernet: Supernet, arch: Arch, bundle: DataBundle, batch_size: int, calib_batches: int
                    ) -> GLiT:
    """`arch` as a standalone GLiT with the supernet's weights, BatchNorm recalibrated exactly as the search and
    `glit eval-subnet` score it (`train.evaluate_subnet`: the same calibration batches through the supernet)."""
    device = next(supernet.parameters()).device
    recalibrate_bn(supernet, calibration_batches(bundle, batch_size, calib_batches, device),
                   lambda x: supernet(x, arch))
    return supernet.extract(arch).eval()


def save_inherited_model(run: RunDir, arch: Arch, label: str, batch_size: int, calib_batches: int,
                         search_budget: str | None = None, device: str = "cpu") -> TrainedModelInfo:
    """Save `arch` with inherited, BN-recalibrated supernet weights as the trained model `label` (a candidate for
    deployment like any retrained model; not made the run's default). Its val_top1 is that of the saved weights
    on the validation split, in float32. `search_budget`: the budget label the search chose it under."""
    supernet, bundle = load_supernet(run, device)
    model = inherited_model(supernet, arch, bundle, batch_size, calib_batches)
    top1 = float32_top1(model, make_loader(bundle.val, batch_size, shuffle=False), device)
    data_spec = run.load_meta()["data"]["spec"]
    extra: dict[str, Any] = {"weights": "inherited", "init": "supernet", "epochs": 0, "calib_batches": calib_batches,
                             "calib_batch_size": batch_size, "val_images": len(bundle.val)}
    if search_budget:
        extra["search_budget"] = search_budget
    info = TrainedModelInfo(label=label, arch=arch, space=supernet.space, class_names=bundle.class_names,
                            mean=bundle.mean, std=bundle.std, image_size=bundle.image_size, data=data_spec,
                            val_top1=top1, extra=extra)
    save_trained_model(run, model.cpu(), info, make_default=False)
    return info


def load_metrics(stage: Path) -> list[dict[str, Any]]:
    path = stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
