"""Does the budget hold for the file that is handed over? Searches under budgets across the range,
each winner exported by `glit export`'s code, and the exported file timed again on its own.

For each space (digits, and cifar when a cifar supernet run is given) and each budget (spread evenly
between the 20th and 50th percentile of the range the space spans on the target, by the latency
model): a fresh copy of the supernet run, the search (`glit_deploy.search.runner.search`, the code
behind `glit search`), the winner's inherited weights (BN recalibrated) saved as the run's deploy
model under the budget's label, then `export_run_onnx` (the code behind `glit export --format onnx`:
parity, then the written file timed on the run's target and held to the budget), and finally an
independent measurement of `export/model.onnx` with a fresh onnxruntime session
(`Target.measure_file`, the code behind `glit latency measure --model`). Reported per search: the
budget, the search's measurement of the winner, the export's measurement of the file (median, 95 %
interval, bound), the independent one, their difference, and whether anything was over.

    python bench/deployed_budget.py --digits-searches 6 \\
        [--cifar-run /work/evidence/cifar-supernet --cifar-searches 4] [--json-out bench/out/deployed_budget.json]

A digits supernet is trained first when --digits-run does not hold one (sandwich, 20 epochs, ~4 min).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from glit_deploy.data import make_loader
from glit_deploy.export.onnx_export import OnnxOptions, export_run_onnx
from glit_deploy.latency import get_target
from glit_deploy.latency.budget import Budget, decision_protocol
from glit_deploy.latency.table import LatencyModel
from glit_deploy.nn.supernet import recalibrate_bn
from glit_deploy.rundir import RunDir
from glit_deploy.search import SearchConfig
from glit_deploy.search.runner import run_latency_model, search
from glit_deploy.space import Arch
from glit_deploy.train import TrainConfig, calibration_batches, evaluate, load_supernet, train_supernet
from glit_deploy.trained import TrainedModelInfo, save_trained_model

REPO = Path(__file__).resolve().parents[1]
console = Console(width=180)


def digits_supernet(path: Path) -> RunDir:
    run = RunDir(path)
    if not (run.supernet / "latest.json").exists():
        from glit_deploy.space import get_space

        train_supernet(run, get_space("digits"), "digits",
                       TrainConfig(epochs=20, batch_size=32, lr=2e-3, sandwich=True, eval_every=20), device="cpu")
    return run


def fresh_copy(source: RunDir, path: Path) -> RunDir:
    """A run with the source's supernet and latency table, and nothing searched or exported."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    shutil.copy2(source.meta_path, path / "run.json")
    shutil.copytree(source.supernet, path / "supernet")
    shutil.copytree(source.path / "latency", path / "latency")
    return RunDir(path)


def deploy_inherited(run: RunDir, arch: Arch, label: str) -> None:
    """Save the winner's inherited weights (BN recalibrated) where `glit retrain` saves a model."""
    supernet, bundle = load_supernet(run, torch.device("cpu"))
    model = supernet.extract(arch)
    recalibrate_bn(model, calibration_batches(bundle, 128, 4, torch.device("cpu")))
    model.eval()
    top1 = evaluate(model, make_loader(bundle.val, 256, shuffle=False), torch.device("cpu"))
    info = TrainedModelInfo(label=label, arch=arch, space=supernet.space, class_names=bundle.class_names,
                            mean=bundle.mean, std=bundle.std, image_size=bundle.image_size,
                            data=run.load_meta()["data"]["spec"], val_top1=top1,
                            extra={"source": "supernet extract (bench/deployed_budget.py)"})
    save_trained_model(run, model, info)


def one_search(source: RunDir, out: Path, budget: Budget, cfg: SearchConfig, threads: int) -> dict[str, Any]:
    run = fresh_copy(source, out)
    target = get_target("ort-cpu", threads)
    started = time.perf_counter()
    summary = search(run, [budget], target, 1, cfg, resume=False, device="cpu")
    winner = summary["budgets"][budget.label]
    row: dict[str, Any] = {"budget": budget.label, "budget_ms": budget.ms, "search_seconds":
                           time.perf_counter() - started, "winner": winner}
    if not winner.get("digest"):
        return {**row, "error": winner.get("error")}
    deploy_inherited(run, Arch.from_dict(winner["arch"]), budget.label)
    try:
        exported = export_run_onnx(run, budget.label, OnnxOptions(parity_images=256), threads=threads)
        row["export"] = exported.sidecar["latency"]
    except Exception as exc:  # an over-budget file is the failure this benchmark looks for: record it
        row["export_error"] = str(exc)
        rejected = run.path / "export" / "rejected" / "model.json"
        row["export"] = json.loads(rejected.read_text()).get("latency") if rejected.exists() else None
        return row
    independent = get_target("ort-cpu", threads).measure_file(run.path / "export" / "model.onnx", 1,
                                                              decision_protocol([budget]))
    row["independent"] = {"median_ms": independent.median_ms, "ci_ms": [independent.ci_low_ms, independent.ci_high_ms],
                          "disturbed_rounds": independent.disturbed_rounds, "rounds": independent.rounds,
                          "within_budget": budget.accepts(independent)}
    row["independent_vs_reported"] = independent.median_ms / row["export"]["median_ms"] - 1
    return row


def plot_against_budget(rows: list[dict[str, Any]], path: Path) -> None:
    """Each deployed file's measured median (95 % interval as error bar) against its budget, per space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = sorted({r["space"] for r in rows})
    fig, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 4.2), squeeze=False)
    for ax, space in zip(axes[0], spaces, strict=True):
        mine = [r for r in rows if r["space"] == space and r.get("export")]
        budgets = [r["budget_ms"] for r in mine]
        medians = [r["export"]["median_ms"] for r in mine]
        errors = [[m - r["export"]["ci_ms"][0] for m, r in zip(medians, mine, strict=True)],
                  [r["export"]["ci_ms"][1] - m for m, r in zip(medians, mine, strict=True)]]
        ax.errorbar(budgets, medians, yerr=errors, fmt="o", label="exported file (export's measurement)")
        independent = [(r["budget_ms"], r["independent"]["median_ms"]) for r in mine if r.get("independent")]
        if independent:
            ax.plot(*zip(*independent, strict=True), "x", label="the same file, timed again")
        if budgets:
            lo, hi = min(budgets) * 0.9, max(budgets) * 1.05
            ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="budget")
        ax.set(title=f"{space}: deployed latency against budget", xlabel="budget (ms)", ylabel="median latency (ms)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits-run", type=Path, default=REPO / "bench" / "out" / "digits-supernet")
    parser.add_argument("--digits-searches", type=int, default=6)
    parser.add_argument("--cifar-run", type=Path, help="a trained cifar supernet run (bench/cifar_supernet.py)")
    parser.add_argument("--cifar-searches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "deployed-budget")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads of the target")
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    spaces = [("digits", digits_supernet(args.digits_run), args.digits_searches)] if args.digits_searches else []
    if args.cifar_run:
        spaces.append(("cifar", RunDir(args.cifar_run), args.cifar_searches))
    cfg = SearchConfig(population=args.population, generations=args.generations, parents=3, mutations=3,
                       crossovers=3, calib_batches=1)
    rows, loads = [], [os.getloadavg()[0]]
    for name, source, count in spaces:
        latency: LatencyModel = run_latency_model(source, get_target("ort-cpu", args.threads), 1)
        space = source.space()
        lo, hi = latency.block_range_ms(space, True), latency.block_range_ms(space, False)
        for i in range(count):
            fraction = 0.2 + 0.3 * i / max(count - 1, 1)
            budget = Budget(round(lo + fraction * (hi - lo), 4))
            console.print(f"[bold]{name}[/] budget {budget} ({100 * fraction:.0f} % of {lo:.4f}-{hi:.4f} ms)")
            row = one_search(source, args.out / f"{name}-{i}", budget, cfg, args.threads)
            rows.append({"space": name, "fraction": fraction, **row})
            loads.append(os.getloadavg()[0])

    table = Table(title="budgets against the deployed file (ort-cpu, batch 1, "
                  f"{args.threads} thread): load average {min(loads):.1f}-{max(loads):.1f}")
    for column in ("space", "budget", "search: winner", "export: file median (95 % interval)", "bound",
                   "independent", "indep. vs reported", "over budget?"):
        table.add_column(column)
    over = 0
    for r in rows:
        exp, ind = r.get("export") or {}, r.get("independent") or {}
        bad = bool(r.get("export_error")) or (ind and not ind["within_budget"])
        over += bool(bad)
        table.add_row(r["space"], r["budget"],
                      f"{r['winner']['measured_ms']:.4f}" if r["winner"].get("digest") else "none",
                      f"{exp['median_ms']:.4f} ({exp['ci_ms'][0]:.4f}-{exp['ci_ms'][1]:.4f})" if exp else "-",
                      f"{exp['bound_ms']:.4f}" if exp else "-",
                      f"{ind['median_ms']:.4f}" if ind else "-",
                      f"{100 * r['independent_vs_reported']:+.1f} %" if ind else "-",
                      ("YES: " + r.get("export_error", "independent measurement over"))[:60] if bad else "no")
    console.print(table)
    console.print(f"{over} of {len(rows)} deployed files over their budget")
    plot_against_budget(rows, args.out / "deployed_vs_budget.png")
    console.print(f"plot: {args.out / 'deployed_vs_budget.png'}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"rows": rows, "load_average": loads, "threads": args.threads,
                                             "machine": platform.processor() or platform.machine(),
                                             "search": cfg.__dict__}, indent=2, default=str))


if __name__ == "__main__":
    main()
