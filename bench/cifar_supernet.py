"""Train the `cifar` supernet on CIFAR-10 for a few epochs and report subnet accuracy.

Reports the validation top-1 (5,000 images held out of the 50,000 training images, after BN
recalibration) of the largest, the smallest and five random subnets, with their multiply-adds,
and the wall time per epoch.

    python bench/cifar_supernet.py --epochs 5 [--run bench/out/cifar-supernet] [--sandwich]

Rerunning with the same --run continues or reuses the trained supernet.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from glit_deploy.nn import arch_cost, extreme_arch
from glit_deploy.rundir import RunDir
from glit_deploy.space import get_space
from glit_deploy.train import TrainConfig, evaluate_subnet, load_supernet, train_supernet

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=f"cifar10:{REPO.parent / 'shared' / 'data' / 'cifar10'}")
    parser.add_argument("--run", type=Path, default=REPO / "bench" / "out" / "cifar-supernet")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sandwich", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    space = get_space("cifar")
    run = RunDir(args.run)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=1,
                      sandwich=args.sandwich, eval_every=10**6)
    resume = (run.supernet / "latest.json").exists()
    train_supernet(run, space, args.data, cfg, resume=resume, device="cpu")

    supernet, bundle = load_supernet(run)
    rng = random.Random(2026)
    archs = [("largest", extreme_arch(space, True)), ("smallest", extreme_arch(space, False))]
    archs += [(f"random {i}", space.sample(rng)) for i in range(5)]
    rows = []
    for label, arch in archs:
        top1 = evaluate_subnet(supernet, arch, bundle, 256, 8, torch.device("cpu"))
        cost = arch_cost(space, arch, bundle.num_classes)
        rows.append({"arch": label, "digest": arch.digest, "split": list(arch.split), "macs": cost.macs,
                     "params": cost.params, "val_top1": top1})
    epochs = [json.loads(line) for line in (run.supernet / "metrics.jsonl").read_text().splitlines()]

    table = Table(title=f"cifar supernet after {len(epochs)} epochs "
                  f"({'sandwich' if args.sandwich else 'uniform'} sampling), CIFAR-10 val (5,000 images)")
    for column in ("arch", "split (global heads)", "multiply-adds", "params", "val top-1"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["arch"], " ".join(map(str, r["split"])), f"{r['macs'] / 1e6:.1f} M",
                      f"{r['params'] / 1e6:.3f} M", f"{r['val_top1']:.2f} %")
    console = Console()
    console.print(table)
    seconds = [e["epoch_seconds"] for e in epochs]
    console.print(f"epoch wall time: {', '.join(f'{s:.0f}' for s in seconds)} s (torch {torch.__version__}, "
                  f"{args.threads} threads)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "epoch_seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
