"""Training-step cost of the weight-sharing supernet against the extracted standalone model.

For the smallest, a middle and the largest arch of the `cifar` preset, times one full training
step (zero_grad, forward, cross-entropy, backward, AdamW step) on the supernet running the arch and
on `supernet.extract(arch)`. The two are interleaved step by step, so both see the same machine
load; the ratio of the medians is what counts (goal: at most 1.15).

    python bench/supernet_step.py [--batch-size 128] [--steps 30] [--threads 2] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from timm.optim import create_optimizer_v2

from glit_deploy.nn import Supernet, arch_cost, extreme_arch
from glit_deploy.space import get_space


def step_seconds(forward, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(forward(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    space = get_space("cifar")
    archs = {"smallest": extreme_arch(space, False), "middle (split 1/2, middle details)":
             space.with_split([1] * space.depth), "largest": extreme_arch(space, True)}
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    rows = []
    for label, arch in archs.items():
        supernet = Supernet(space, 10).train()
        standalone = supernet.extract(arch).train()
        opt_super = create_optimizer_v2(supernet, opt="adamw", lr=1e-4, weight_decay=0.05)
        opt_alone = create_optimizer_v2(standalone, opt="adamw", lr=1e-4, weight_decay=0.05)
        times_super, times_alone = [], []
        for i in range(args.warmup + args.steps):
            t_super = step_seconds(lambda t, a=arch, m=supernet: m(t, a), opt_super, x, y)
            t_alone = step_seconds(standalone, opt_alone, x, y)
            if i >= args.warmup:
                times_super.append(t_super)
                times_alone.append(t_alone)
        med_super, med_alone = statistics.median(times_super), statistics.median(times_alone)
        rows.append({"arch": label, "macs": arch_cost(space, arch, 10).macs, "supernet_ms": 1e3 * med_super,
                     "supernet_p90_ms": 1e3 * p90(times_super), "standalone_ms": 1e3 * med_alone,
                     "standalone_p90_ms": 1e3 * p90(times_alone), "ratio": med_super / med_alone})

    table = Table(title=f"cifar supernet training step vs extracted model (batch {args.batch_size}, "
                  f"{args.threads} threads, {args.steps} interleaved steps)")
    for column in ("arch", "multiply-adds", "supernet median (p90)", "standalone median (p90)", "ratio"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["arch"], f"{r['macs'] / 1e6:.1f} M", f"{r['supernet_ms']:.1f} ({r['supernet_p90_ms']:.1f}) ms",
                      f"{r['standalone_ms']:.1f} ({r['standalone_p90_ms']:.1f}) ms", f"{r['ratio']:.3f}")
    Console().print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
