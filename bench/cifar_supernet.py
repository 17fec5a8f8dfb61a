"""Train the `cifar` supernet on CIFAR-10 for a few epochs; report epoch wall time and subnet accuracy.

Trains with glit_deploy.train.train_supernet (TrainConfig: batch 128, lr 1e-3, 1 warm-up epoch,
uniform single-arch sampling unless --sandwich, workers 0, evaluation only after the last epoch)
into a run directory, reads the wall time of every epoch from supernet/metrics.jsonl, then loads
the supernet (load_supernet) and reports the validation top-1 (the 5,000 images that
glit_deploy.data holds out of the 50,000 training images, after BatchNorm recalibration on 8
training batches: evaluate_subnet) of the largest, the smallest and 5 random archs
(space.sample(random.Random(seed)) for seeds 0-4), with their multiply-adds and parameters from
arch_cost.

    nice -n 5 /root/.venvs/glit/bin/python bench/cifar_supernet.py --epochs 5 \
        [--run bench/out/cifar-supernet] [--data cifar10:/work/shared/data/cifar10] \
        [--resume-from-existing] [--json-out bench/out/cifar_supernet.json]

With --resume-from-existing a run directory that already holds a checkpoint is continued, or,
when it has all --epochs epochs, only evaluated. Without it such a run directory is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from glit_deploy.checkpoint import load_checkpoint
from glit_deploy.errors import GlitError
from glit_deploy.nn import arch_cost, extreme_arch
from glit_deploy.rundir import RunDir
from glit_deploy.space import Arch, get_space
from glit_deploy.train import TrainConfig, evaluate_subnet, load_supernet, train_supernet

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = f"cifar10:{REPO.parent / 'shared' / 'data' / 'cifar10'}"
# TrainConfig fields that do not change the trained weights: a run trained with other values is reusable.
NO_EFFECT_ON_WEIGHTS = {"eval_every", "workers", "calib_batches"}


def epoch_records(run: RunDir) -> list[dict[str, Any]]:
    """The metrics of each epoch (the last record wins if a resumed run wrote an epoch twice)."""
    path = run.supernet / "metrics.jsonl"
    if not path.exists():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def saved_state(run: RunDir) -> tuple[TrainConfig, int] | None:
    """The TrainConfig and the number of finished epochs of the run's latest supernet checkpoint."""
    checkpoint = load_checkpoint(run.supernet, with_state=True)
    if checkpoint is None:
        return None
    return TrainConfig.from_dict(checkpoint.state.get("config", {})), checkpoint.epoch + 1


def sampling_rule(cfg: TrainConfig) -> str:
    if not cfg.sandwich:
        return "uniform one-arch"
    return "sandwich" if cfg.distill else "sandwich (no distillation)"


def eval_archs(seeds: list[int]) -> list[tuple[str, int | None, Arch]]:
    space = get_space("cifar")
    archs: list[tuple[str, int | None, Arch]] = [("largest", None, extreme_arch(space, True)),
                                                 ("smallest", None, extreme_arch(space, False))]
    archs += [(f"random (seed {s})", s, space.sample(random.Random(s))) for s in seeds]
    return archs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"data spec (default {DEFAULT_DATA})")
    parser.add_argument("--run", type=Path, default=REPO / "bench" / "out" / "cifar-supernet")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--sandwich", action="store_true", help="sandwich rule instead of one uniform arch a step")
    parser.add_argument("--no-distill", action="store_true",
                        help="with --sandwich: every arch learns from the labels (no in-place distillation)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (TrainConfig.seed)")
    parser.add_argument("--eval-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4],
                        help="seeds of the random archs evaluated after training")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--resume-from-existing", action="store_true",
                        help="continue (or, when complete, only evaluate) a run dir that holds a checkpoint")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--allow-data-change", action="store_true",
                        help="go on with a run whose recorded dataset changed since (glit's --allow-data-change)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()

    space = get_space("cifar")
    run = RunDir(args.run)
    try:
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          warmup_epochs=args.warmup_epochs, sandwich=args.sandwich, distill=not args.no_distill,
                          seed=args.seed, workers=0, calib_batches=args.calib_batches, eval_every=10**9)
    except GlitError as exc:
        sys.exit(str(exc))

    if run.exists() and run.load_meta().get("data", {}).get("spec") not in (None, args.data):
        sys.exit(f"{run.path} was trained on another dataset; choose another --run")
    saved = saved_state(run)
    if saved is not None and not args.resume_from_existing:
        sys.exit(f"{run.path} already holds a supernet checkpoint: pass --resume-from-existing to continue or "
                 "reuse it, or choose another --run")
    previous, done = saved if saved is not None else (None, 0)
    if previous is not None:
        changed = [k for k, v in asdict(cfg).items() if k not in NO_EFFECT_ON_WEIGHTS and asdict(previous).get(k) != v]
        if changed:
            sys.exit(f"{run.path} was trained with other settings ({', '.join(changed)} differ); choose another --run")
    trained_now = done < cfg.epochs
    started = time.perf_counter()
    if trained_now:
        console.print(f"training {run.path}: epochs {done + 1}-{cfg.epochs} of {cfg.epochs}")
        train_supernet(run, space, args.data, cfg, resume=previous is not None, device="cpu",
                       allow_data_change=args.allow_data_change)
    else:
        console.print(f"{run.path} already has {done} epochs: evaluating only")
    train_wall = time.perf_counter() - started

    supernet, bundle = load_supernet(run, allow_data_change=args.allow_data_change)
    rows = []
    for label, seed, arch in eval_archs(args.eval_seeds):
        t0 = time.perf_counter()
        top1 = evaluate_subnet(supernet, arch, bundle, cfg.batch_size, cfg.calib_batches, torch.device("cpu"))
        cost = arch_cost(space, arch, bundle.num_classes)
        rows.append({"arch": label, "seed": seed, "digest": arch.digest, "split": list(arch.split),
                     "macs": cost.macs, "params": cost.params, "val_top1": top1,
                     "eval_seconds": time.perf_counter() - t0, "genes": arch.describe(space.num_heads)})
    epochs = epoch_records(run)

    timing = Table(title=f"cifar supernet training on {bundle.name} ({len(bundle.train)} train images, batch "
                   f"{cfg.batch_size}, {sampling_rule(cfg)} sampling, "
                   f"{args.threads} threads)")
    for column in ("epoch", "steps", "train loss", "lr at end", "wall time"):
        timing.add_column(column, justify="right")
    for e in epochs:
        timing.add_row(str(e["epoch"] + 1), str(e["steps"]), f"{e['train_loss']:.4f}", f"{e['lr']:.2e}",
                       f"{e['epoch_seconds']:.0f} s")
    console.print(timing)

    accuracy = Table(title=f"val top-1 after {len(epochs)} epochs ({len(bundle.val)} held-out images, BN "
                     f"recalibrated on {cfg.calib_batches} batches)")
    for column in ("arch", "split (global heads)", "MACs", "params", "val top-1"):
        accuracy.add_column(column, justify="left" if column == "arch" else "right")
    for r in rows:
        accuracy.add_row(r["arch"], " ".join(map(str, r["split"])), f"{r['macs'] / 1e6:.1f} M",
                         f"{r['params'] / 1e6:.3f} M", f"{r['val_top1']:.2f} %")
    console.print(accuracy)
    console.print(f"run {run.path}; {'trained now' if trained_now else 'reused'}; training wall {train_wall:.0f} s; "
                  f"torch {torch.__version__}")

    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "cifar_supernet", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                   "threads": args.threads, "run": str(run.path), "data": args.data, "config": asdict(cfg),
                   "trained_now": trained_now, "train_wall_seconds": train_wall,
                   "train_size": len(bundle.train), "val_size": len(bundle.val), "epochs": epochs, "archs": rows}
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
