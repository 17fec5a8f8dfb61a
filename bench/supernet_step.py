"""Training-step cost of the weight-sharing supernet against the extracted standalone model.

For the smallest, a middle and the largest arch of the `cifar` preset, times one full training step
(zero_grad, forward, cross-entropy, backward, AdamW step from timm's create_optimizer_v2, as in
glit_deploy.train) on the supernet running the arch and on `supernet.extract(arch)`. Supernet and
standalone steps alternate (their order flips every step), so both see the same machine load; the
ratio of the medians is the number that counts (project goal: at most 1.15).

The middle arch is `space.with_split([1] * depth)` (1 global + 2 local heads per block, every
detail gene at its middle value) unless --middle-seed picks a uniform sample instead.

    /root/.venvs/glit/bin/python bench/supernet_step.py [--batch-size 128] [--threads 2] \
        [--warmup 5] [--steps 40] [--json-out bench/out/supernet_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from timm.optim import create_optimizer_v2
from timm.utils import dispatch_clip_grad
from torch import Tensor, nn

from glit_deploy.nn import Supernet, arch_cost, extreme_arch
from glit_deploy.space import Arch, SearchSpace, get_space

NUM_CLASSES = 10
PHASES = ("forward", "backward", "optimizer")


def timed_step(model: nn.Module, forward: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer,
               x: Tensor, y: Tensor, label_smoothing: float, clip_grad: float) -> dict[str, float]:
    """One training step; returns the seconds of the whole step and of its phases (CPU: synchronous)."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x), y, label_smoothing=label_smoothing)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if clip_grad > 0:
        dispatch_clip_grad(model.parameters(), clip_grad)
    optimizer.step()
    t3 = time.perf_counter()
    return {"step": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def bench_arch(space: SearchSpace, arch: Arch, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved supernet / standalone training steps for one arch."""
    torch.manual_seed(args.seed)
    supernet = Supernet(space, NUM_CLASSES).train()
    standalone = supernet.extract(arch).train()
    x = torch.randn(args.batch_size, space.in_chans, space.image_size, space.image_size)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,))
    with torch.no_grad():  # same weights, same batch (train-mode BN on both): the outputs must agree
        max_diff = float((supernet(x, arch) - standalone(x)).abs().max())

    def super_forward(t: Tensor) -> Tensor:
        return supernet(t, arch)

    runners = {
        "supernet": (supernet, super_forward,
                     create_optimizer_v2(supernet, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)),
        "standalone": (standalone, standalone,
                       create_optimizer_v2(standalone, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)),
    }
    times: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            model, forward, optimizer = runners[name]
            t = timed_step(model, forward, optimizer, x, y, args.label_smoothing, args.clip_grad)
            if i >= args.warmup:
                times[name].append(t)

    cost = arch_cost(space, arch, NUM_CLASSES)
    out: dict[str, Any] = {"macs": cost.macs, "params": cost.params, "max_abs_logit_diff": max_diff,
                           "digest": arch.digest, "arch": arch.to_dict()}
    for name, samples in times.items():
        steps = [s["step"] for s in samples]
        out[name] = {"median_ms": 1e3 * statistics.median(steps), "p90_ms": 1e3 * p90(steps),
                     "min_ms": 1e3 * min(steps), "steps_ms": [1e3 * s for s in steps],
                     **{f"{p}_median_ms": 1e3 * statistics.median(s[p] for s in samples) for p in PHASES}}
    out["ratio"] = out["supernet"]["median_ms"] / out["standalone"]["median_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (fixed for both models)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per model before timing")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per model and arch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="as in TrainConfig")
    parser.add_argument("--clip-grad", type=float, default=0.0,
                        help="also clip gradients as train.py does (TrainConfig uses 1.0); 0 = off")
    parser.add_argument("--middle-seed", type=int, default=None,
                        help="middle arch = space.sample(random.Random(SEED)) instead of with_split([1]*depth)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation and input batch")
    parser.add_argument("--goal", type=float, default=1.15, help="target ratio supernet/standalone (medians)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    torch.set_num_threads(args.threads)

    space = get_space("cifar")
    if args.middle_seed is None:
        middle_label, middle = "middle (split 1-2, middle genes)", space.with_split([1] * space.depth)
    else:
        middle_label, middle = f"middle (sample seed {args.middle_seed})", space.sample(random.Random(args.middle_seed))
    archs = {"smallest": extreme_arch(space, False), middle_label: middle, "largest": extreme_arch(space, True)}

    console = Console()
    rows = []
    started = time.perf_counter()
    for label, arch in archs.items():
        console.print(f"[dim]{label}: {arch.describe(space.num_heads)}")
        rows.append({"label": label, **bench_arch(space, arch, args)})
    wall = time.perf_counter() - started

    table = Table(title=f"cifar supernet vs extracted standalone: one training step, batch {args.batch_size}, "
                  f"{args.threads} threads, {args.steps} interleaved steps each (+{args.warmup} warm-up)")
    for column in ("arch", "MACs", "supernet median", "supernet p90", "standalone median", "standalone p90",
                   "ratio", f"<= {args.goal:g}"):
        table.add_column(column, justify="left" if column == "arch" else "right")
    for r in rows:
        s, a = r["supernet"], r["standalone"]
        table.add_row(r["label"], f"{r['macs'] / 1e6:.1f} M", f"{s['median_ms']:.1f} ms", f"{s['p90_ms']:.1f} ms",
                      f"{a['median_ms']:.1f} ms", f"{a['p90_ms']:.1f} ms", f"{r['ratio']:.3f}",
                      "yes" if r["ratio"] <= args.goal else "[red]no")
    console.print(table)

    phases = Table(title="median per phase, supernet / standalone (forward includes zero_grad and the loss)")
    phases.add_column("arch")
    for p in PHASES:
        phases.add_column(p, justify="right")
    for r in rows:
        s, a = r["supernet"], r["standalone"]
        phases.add_row(r["label"], *(f"{s[f'{p}_median_ms']:.1f} / {a[f'{p}_median_ms']:.1f} ms" for p in PHASES))
    console.print(phases)
    worst = max(r["ratio"] for r in rows)
    console.print(f"largest ratio {worst:.3f}: goal <= {args.goal:g} {'met' if worst <= args.goal else 'NOT met'}; "
                  f"max |logit diff| {max(r['max_abs_logit_diff'] for r in rows):.2e}; wall {wall:.0f} s; "
                  f"torch {torch.__version__}")

    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "supernet_step", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "cpu_count": os.cpu_count(), "options": {k: v for k, v in vars(args).items()
                                                                     if k != "json_out"},
                   "goal": args.goal, "goal_met": worst <= args.goal, "wall_seconds": wall, "rows": rows}
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
