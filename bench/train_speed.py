"""What makes a CIFAR-10 retraining step cheaper on this CPU, measured before anything is adopted (issue 12).

One training step of the retraining recipe's model (the evidence's evolution winner by default, drop-path
on, batch 128 of 32 px images, AdamW, the recipe's soft-target loss) in each variant, the variants timed
interleaved round by round (a few steps each, in turn) so that the machine's load falls on all of them alike.
Every variant's speed-up is the ratio of medians within the one run:

    eager       float32, as `glit retrain` trains today (the baseline)
    bf16        the same under torch.autocast("cpu", bfloat16) (AVX-512 BF16 on this CPU)
    compiled    torch.compile(model) (inductor, C++ code for this CPU), float32
    compiled-bf16   both
    channels-last   the input and weights in channels-last memory format

The data side is timed too: one batch of the recipe's augmentation (RandAugment, random erasing, crop and
flip on PIL images) from the real dataset, next to a step, to see whether the loader is worth a change.

    nice -n 0 python bench/train_speed.py --threads 1 --rounds 6 --json-out bench/out/train_speed.json

A variant that fails (a compiler missing, an op without a bf16 kernel) is reported as failed, not skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

from glit_deploy.atomic_io import atomic_write_json
from glit_deploy.data import load_recorded_data, make_loader
from glit_deploy.nn import GLiT
from glit_deploy.retrain import RetrainConfig, set_recipe_transform
from glit_deploy.rundir import RunDir
from glit_deploy.space import Arch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("eager", "bf16", "compiled", "compiled-bf16", "channels-last")
console = Console()


def make_step(variant: str, arch: Arch, run: RunDir, batch: int, num_classes: int
              ) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One optimiser step of a fresh model in `variant`; returns the loss."""
    torch.manual_seed(0)
    model = GLiT(arch, run.space(), num_classes, drop_path_rate=0.1).train()
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    criterion = SoftTargetCrossEntropy()
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if variant.startswith("compiled"):
        forward = torch.compile(model)
    if variant == "channels-last":
        model = model.to(memory_format=torch.channels_last)
    use_bf16 = variant.endswith("bf16")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        if variant == "channels-last":
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with context:
            loss = criterion(forward(x).float(), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=Path, default=REPO / "bench" / "evidence" / "arch-evolution.json")
    parser.add_argument("--run", type=Path, default=REPO / "bench" / "evidence",
                        help="a run whose run.json gives the space and the dataset")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = RunDir(args.run)
    arch = Arch.load(args.arch)
    bundle = load_recorded_data(run.load_meta()["data"], 32)
    set_recipe_transform(bundle, RetrainConfig(batch_size=args.batch))
    loader = iter(make_loader(bundle.train, args.batch, shuffle=True, seed=0, drop_last=True))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=generator)
    y = torch.softmax(torch.randn(args.batch, bundle.num_classes, generator=generator), dim=1)

    steps: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {}
    setup: dict[str, Any] = {}
    for variant in args.variants.split(","):
        started = time.perf_counter()
        try:
            step = make_step(variant, arch, run, args.batch, bundle.num_classes)
            for _ in range(2):  # warm-up; compilation happens here
                step(x, y)
        except Exception as error:  # a variant this machine cannot run is a result too
            setup[variant] = {"failed": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            console.print(f"[red]{variant}: failed: {setup[variant]['failed']}[/red]")
            continue
        steps[variant] = step
        setup[variant] = {"warmup_s": round(time.perf_counter() - started, 1)}
        console.print(f"{variant}: ready ({setup[variant]['warmup_s']} s of set-up and 2 warm-up steps)")

    times: dict[str, list[float]] = {v: [] for v in [*steps, "data"]}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for variant, step in steps.items():
            for _ in range(args.steps):
                started = time.perf_counter()
                step(x, y)
                times[variant].append(time.perf_counter() - started)
        started = time.perf_counter()
        next(loader)
        times["data"].append(time.perf_counter() - started)
    load_after = os.getloadavg()

    base = statistics.median(times["eager"]) if times.get("eager") else None
    table = Table(title=f"one training step, batch {args.batch}, {args.threads} thread(s), interleaved "
                        f"{args.rounds} rounds x {args.steps} steps; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    for column in ("variant", "median s", "min s", "max s", "speed-up vs eager", "set-up"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    rows = {}
    for variant, values in times.items():
        median = statistics.median(values)
        rows[variant] = {"median_s": median, "min_s": min(values), "max_s": max(values), "n": len(values),
                         "speedup": base / median if base and variant != "data" else None, **setup.get(variant, {})}
        table.add_row(variant if variant != "data" else "data (one augmented batch)", f"{median:.3f}",
                      f"{min(values):.3f}", f"{max(values):.3f}",
                      f"{base / median:.2f}x" if base and variant != "data" else "-",
                      f"{setup[variant]['warmup_s']} s" if variant in setup else "-")
    for variant, info in setup.items():
        if "failed" in info:
            table.add_row(variant, "failed", "", "", "", info["failed"][:60])
    console.print(table)
    if args.json_out:
        atomic_write_json(args.json_out, {
            "about": "bench/train_speed.py", "arch": arch.digest, "batch": args.batch, "threads": args.threads,
            "rounds": args.rounds, "steps": args.steps, "load_before": load_before, "load_after": load_after,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "variants": rows,
            "failed": {v: i["failed"] for v, i in setup.items() if "failed" in i}})
        console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
