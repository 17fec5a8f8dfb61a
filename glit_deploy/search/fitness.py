"""A search candidate's fitness past its inherited weights: a short fine-tune from them.

Inherited top-1 on a weight-sharing supernet orders far-apart archs right and near-tied ones no better
than chance (BENCHMARKS section 12: Kendall tau -0.11 against retraining over nine archs within 2 points
of the best on the supernet), and the evolutionary search takes the maximum over many near-tied archs:
it picks the arch the supernet overrates most, a winner's curse. Training each of the few candidates a
search chooses between for a few hundred steps from its inherited weights gives every one weights of
its own before it is scored, at a cost of a few hundred steps per candidate instead of a retraining.

Every candidate is fine-tuned on the same batches in the same order (one seed), so that what differs
between two scores is the arch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader

from glit_deploy.data import DataBundle, make_loader
from glit_deploy.errors import RunError
from glit_deploy.latency.budget import accepted_by_measurement
from glit_deploy.nn import Supernet
from glit_deploy.retrain import inherited_model
from glit_deploy.space import Arch
from glit_deploy.train import autocast, evaluate, training_progress


@dataclass(frozen=True)
class FinetuneConfig:
    """How each candidate is fine-tuned before it is scored (AdamW, linear warm-up, then constant)."""

    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-4  # a fifth of the supernet's peak, as level 2's split fine-tuning uses
    warmup_steps: int = 20
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise RunError(f"a fine-tuned fitness needs at least one step, not {self.steps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetuned_top1(supernet: Supernet, arch: Arch, bundle: DataBundle, cfg: FinetuneConfig, calib_batch_size: int,
                   calib_batches: int, device: torch.device, val_loader: DataLoader | None = None,
                   eval_at: tuple[int, ...] = (), progress: bool = False) -> dict[int, float]:
    """Validation top-1 of `arch` after `cfg.steps` steps of training from its inherited weights (BatchNorm
    recalibrated first on `calib_batches` batches of `calib_batch_size`, exactly as the search scores it,
    so that step 0 is its inherited top-1); also after each step count in `eval_at`. The supernet's
    weights are not changed. Returns {steps: top-1}. `progress`: show a progress bar."""
    model = inherited_model(supernet, arch, bundle, calib_batch_size, calib_batches).to(device)
    loader = make_loader(bundle.train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    if len(loader) == 0:
        raise RunError(f"fine-tuning batch size {cfg.batch_size} is larger than the training split "
                       f"({len(bundle.train)})")
    val_loader = val_loader or make_loader(bundle.val, cfg.batch_size * 2, shuffle=False)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    checkpoints = sorted({*(s for s in eval_at if 0 <= s < cfg.steps), cfg.steps})
    scores: dict[int, float] = {}
    if checkpoints[0] == 0:
        scores[0] = _top1(model, val_loader, device)
    bar = training_progress() if progress else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), bar:  # the caller's random state is left as it was
        task = bar.add_task(f"fine-tuning {arch.digest[:8]}", total=cfg.steps, info="") if progress else None
        torch.manual_seed(cfg.seed)
        step = 0
        for epoch in range(math.ceil(cfg.steps / len(loader))):
            loader.generator.manual_seed(cfg.seed * 100003 + epoch)
            for x, y in loader:
                model.train()
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with autocast(device):
                    loss = criterion(model(x), y)
                loss.backward()
                if cfg.clip_grad > 0:
                    dispatch_clip_grad(model.parameters(), cfg.clip_grad)
                optimizer.step()
                if not math.isfinite(loss.item()):
                    raise RuntimeError(f"fine-tuning {arch.digest} diverged (loss {loss.item()}) at step {step}")
                step += 1
                if step in checkpoints:
                    scores[step] = _top1(model, val_loader, device)
                if task is not None:
                    bar.update(task, advance=1, info=f"loss {loss.item():.3f}")
                if step == cfg.steps:
                    return scores
    return scores


def reranked_by_finetuning(ranked: Sequence[dict[str, Any]], top: int, score: Callable[[dict[str, Any]], float],
                           spread: int = 0) -> list[dict[str, Any]]:
    """`ranked` (most accurate first, by inherited top-1) when `top` of them are fine-tuned with nothing
    measured (level 1's split choice, `finetune_splits`; a winner is measured first, in
    `finetuned_winner_by_measurement`): those, by fine-tuned top-1 (`score`; ties by inherited top-1, then
    digest), each carrying its `finetuned_top1`, then the rest as they were.

    With `spread` 0 the fine-tuned are the `top` most accurate. With `spread` D they are the most accurate
    that differ from each other in at least D genes (`Arch.gene_distance`), topped up with the most accurate
    of the others where too few do: an evolutionary search's most accurate candidates are mostly one arch
    and its mutants, overrated together (BENCHMARKS section 12, batch 4), and the fine-tune can only choose
    between what it is given."""
    k = min(top, len(ranked))
    chosen: list[int] = []
    if spread > 0:
        archs: list[Arch] = []
        for i, entry in enumerate(ranked):
            if len(chosen) == k:
                break
            arch = Arch.from_dict(entry["arch"])
            if all(arch.gene_distance(other) >= spread for other in archs):
                chosen.append(i)
                archs.append(arch)
    picked = set(chosen)
    chosen += [i for i in range(len(ranked)) if i not in picked][: k - len(chosen)]
    picked = set(chosen)
    head = [{**ranked[i], "finetuned_top1": score(ranked[i])} for i in chosen]
    head.sort(key=lambda e: (-e["finetuned_top1"], -e["top1"], e["digest"]))
    return head + [entry for i, entry in enumerate(ranked) if i not in picked]


def finetuned_winner_by_measurement(first: Sequence[dict[str, Any]], remaining: Sequence[dict[str, Any]],
                                    attempt: Callable[[dict[str, Any]], dict[str, Any] | None],
                                    rejected: list[dict[str, Any]], limit_ms: float, count: int, top: int,
                                    score: Callable[[dict[str, Any]], float], spread: int = 0,
                                    announce: Callable[[float, int], None] = lambda ratio, candidates: None,
                                    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The winner when `top` candidates are fine-tuned: the `top` most accurate (inherited top-1) that
    measure within the limit, by the winner rule without fine-tuning (`accepted_by_measurement`), each
    fine-tuned (`score`), the best fine-tuned (ties by inherited top-1, then digest) carrying every one's
    score in `finetuned_candidates`. With `spread` D a candidate fewer than D genes from one accepted
    already is measured only when too few others meet the limit (as in `reranked_by_finetuning`).

    Measured before fine-tuned: a measurement costs seconds and a fine-tune minutes, and a candidate over
    the budget cannot win whatever it scores. (Fine-tuned first, the candidates a search pushes to the
    budget's edge were fine-tuned and then rejected, and the winner was left to the inherited order.)
    The search and random search, which is compared with it, share this rule. Returns the winner (None
    when none met the limit) and the second pass's record, as `pick_by_measurement` does."""
    def far_enough(entry: dict[str, Any], accepted: list[dict[str, Any]]) -> bool:
        arch = Arch.from_dict(entry["arch"])
        return all(arch.gene_distance(Arch.from_dict(a["arch"])) >= spread for a in accepted)

    accepted, second_pass = accepted_by_measurement(first, remaining, attempt, rejected, limit_ms, count, announce,
                                                    wanted=max(top, 1), admits=far_enough if spread > 0 else None)
    if not accepted:
        return None, second_pass
    tuned = [{**record, "finetuned_top1": score(record)} for record in accepted]
    tuned.sort(key=lambda e: (-e["finetuned_top1"], -e["top1"], e["digest"]))
    board = [{"digest": e["digest"], "top1": e["top1"], "finetuned_top1": e["finetuned_top1"]} for e in tuned]
    return {**tuned[0], "finetuned_candidates": board}, second_pass


def _top1(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    return evaluate(model, loader, device)
