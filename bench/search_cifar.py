"""The two-level search on a `cifar` supernet trained on CIFAR-10, under two latency budgets.

Reports wall time, evaluations and cache hits of the search, and for each budget the GLiT winner
against the best all-global (DeiT-like) arch of the space under the same budget, found by the
same evolution restricted to the all-global split; both by inherited-weight validation top-1
(5,000 held-out training images, BN recalibrated) and both measured end to end on the target.

    python bench/cifar_supernet.py --epochs 5          # first: the supernet
    python bench/search_cifar.py [--budgets 0.6ms 0.9ms] [--target ort-cpu] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from glit_deploy.latency import get_target
from glit_deploy.rundir import RunDir
from glit_deploy.search import SearchConfig, budget_label, parse_latency
from glit_deploy.search.runner import run_latency_model, search

REPO = Path(__file__).resolve().parents[1]


def fresh_run(source: RunDir, path: Path) -> RunDir:
    """A run directory sharing the trained supernet, without any earlier search."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    shutil.copy2(source.meta_path, path / "run.json")
    shutil.copytree(source.supernet, path / "supernet")
    return RunDir(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernet-run", type=Path, default=REPO / "bench" / "out" / "cifar-supernet")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--budgets", nargs="*", default=[], help="default: 35 %% and 65 %% into the space's range")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--parents", type=int, default=4)
    parser.add_argument("--children", type=int, default=6, help="mutations and crossovers per generation, each")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="continue the searches under --out")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    source = RunDir(args.supernet_run)
    space = source.space()
    target = get_target(args.target)
    latency = run_latency_model(source, target, 1)
    lo, hi = latency.block_range_ms(space, True), latency.block_range_ms(space, False)
    budgets = [parse_latency(b) for b in args.budgets] or [round(lo + f * (hi - lo), 3) for f in (0.35, 0.65)]
    cfg = SearchConfig(population=args.population, generations=args.generations, parents=args.parents,
                       mutations=args.children, crossovers=args.children, calib_batches=args.calib_batches)
    all_global = [space.num_heads] * space.depth
    results = {}
    for name, split in (("glit", None), ("all-global", all_global)):
        path = args.out / f"search-{name}"
        run = RunDir(path) if args.resume and path.exists() else fresh_run(source, path)
        started = time.perf_counter()
        summary = search(run, budgets, target, 1, SearchConfig(**{**cfg.__dict__, "fixed_split": split}),
                         resume=args.resume, device="cpu")
        results[name] = {**summary, "wall_seconds": time.perf_counter() - started}

    console = Console()
    table = Table(title=f"search on the cifar supernet, {args.target} batch 1 (space spans {lo:.3f}-{hi:.3f} ms)")
    for column in ("budget", "GLiT winner top-1", "measured", "split", "all-global top-1", "measured", "delta"):
        table.add_column(column)
    rows = []
    for budget in budgets:
        label = budget_label(budget)
        g, d = results["glit"]["budgets"][label], results["all-global"]["budgets"][label]
        row = {"budget_ms": budget, "glit": g, "all_global": d,
               "delta": (g["top1"] - d["top1"]) if g.get("digest") and d.get("digest") else None}
        rows.append(row)
        table.add_row(label, f"{g['top1']:.2f} %" if g.get("digest") else "none",
                      f"{g['measured_ms']:.3f} ms" if g.get("digest") else "-",
                      " ".join(str(b["global_heads"]) for b in g["arch"]["blocks"]) if g.get("digest") else "-",
                      f"{d['top1']:.2f} %" if d.get("digest") else "none",
                      f"{d['measured_ms']:.3f} ms" if d.get("digest") else "-",
                      f"{row['delta']:+.2f}" if row["delta"] is not None else "-")
    console.print(table)
    for name, r in results.items():
        console.print(f"{name}: {r['wall_seconds']:.0f} s wall, {r['evaluated']} evaluations, "
                      f"{r['cache_hits']} cache hits")
    if args.json_out:
        args.json_out.write_text(json.dumps({"budgets": budgets, "range_ms": [lo, hi], "rows": rows,
                                             "runs": {k: {kk: vv for kk, vv in v.items() if kk != "budgets"}
                                                      for k, v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
