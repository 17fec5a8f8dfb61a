"""CIFAR-10: the GLiT search winner against the best all-global (DeiT-like) arch, both retrained.

Takes the two searches that `bench/search_cifar.py` ran on the same `cifar` supernet and under the
same latency budget (one over the whole GLiT space, one restricted to all-global blocks), retrains
both winners as standalone models with the same recipe, epochs and seed, and reports their
validation top-1 (5,000 images held out of the training set) and end-to-end measured latency.
Goal (issue 4): the GLiT winner at least 3 points ahead.

    python bench/search_cifar.py ...                       # first: the two searches
    python bench/cifar_pipeline.py [--budget LABEL] [--epochs 10] [--init scratch] [--json-out F]

Each retraining lands in retrain/BUDGET-EPOCHSep-INIT of its search run, so runs with other epochs never
collide. Rerunning continues retrainings that were interrupted (their checkpoints are per epoch). On a
small machine the two retrainings can run side by side, one thread each, and a last call collects them:

    python bench/cifar_pipeline.py --epochs 20 --budget 1.51ms --only glit --threads 1 &
    python bench/cifar_pipeline.py --epochs 20 --budget 1.51ms --only all-global --threads 1 &
    wait; python bench/cifar_pipeline.py --epochs 20 --budget 1.51ms --json-out bench/out/cifar_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from glit_deploy.retrain import RetrainConfig, resolve_retrain_arch, retrain
from glit_deploy.rundir import RunDir
from glit_deploy.search.evolution import load_summary

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="where search_cifar.py wrote")
    parser.add_argument("--budget", help="budget label, e.g. 1.2ms (default: every budget both searches have)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--init", default="scratch", choices=["scratch", "supernet"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--only", choices=["glit", "all-global"], help="retrain only this one (no table)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = {"glit": RunDir(args.out / "search-glit"), "all-global": RunDir(args.out / "search-all-global")}
    summaries = {name: load_summary(run) for name, run in runs.items()}
    common = [label for label, r in summaries["glit"]["budgets"].items()
              if r.get("digest") and summaries["all-global"]["budgets"].get(label, {}).get("digest")]
    labels = [args.budget] if args.budget else common
    cfg = RetrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, init=args.init,
                        warmup_epochs=min(5, max(args.epochs // 5, 1)))
    rows = []
    for label in labels:
        row: dict = {"budget": label}
        for name, run in runs.items():
            if args.only and name != args.only:
                continue
            arch, _ = resolve_retrain_arch(run, None, label)
            started = time.perf_counter()
            info = retrain(run, arch, f"{label}-{args.epochs}ep-{args.init}", cfg, resume=True, device="cpu")
            history = [json.loads(line) for line in
                       (run.path / "retrain" / info.label / "metrics.jsonl").read_text().splitlines() if line]
            result = summaries[name]["budgets"][label]
            row[name] = {"digest": arch.digest, "split": [b.global_heads for b in arch.blocks],
                         "val_top1": info.val_top1, "weights": info.extra.get("weights"),
                         "supernet_top1": result["top1"], "measured_ms": result["measured_ms"],
                         "budget_ms": result["budget_ms"], "params": result["params"], "macs": result["macs"],
                         "retrain_seconds": time.perf_counter() - started,
                         "epoch_seconds": [h.get("epoch_seconds") for h in history],
                         "val_top1_by_epoch": [h.get("val_top1") for h in history],
                         "val_top1_ema_by_epoch": [h.get("val_top1_ema") for h in history]}
        if args.only:
            continue
        row["delta"] = row["glit"]["val_top1"] - row["all-global"]["val_top1"]
        rows.append(row)
    if args.only:
        return

    table = Table(title=f"CIFAR-10, both retrained {args.epochs} epochs ({args.init}); validation top-1 of 5,000")
    for column in ("budget", "GLiT winner", "split", "measured", "all-global", "measured", "delta", "goal +3"):
        table.add_column(column)
    for r in rows:
        g, d = r["glit"], r["all-global"]
        table.add_row(r["budget"], f"{g['val_top1']:.2f} %", " ".join(map(str, g["split"])),
                      f"{g['measured_ms']:.3f} ms", f"{d['val_top1']:.2f} %", f"{d['measured_ms']:.3f} ms",
                      f"{r['delta']:+.2f}", "yes" if r["delta"] >= 3 else "no")
    Console().print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps({"config": cfg.__dict__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
