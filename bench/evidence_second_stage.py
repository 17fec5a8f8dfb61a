"""Evidence, batch 4: what the second-stage fitness saw in the evolution's and random search's top candidates.

`bench/evidence_cifar.py --finetune-top K` fine-tunes the K most accurate candidates (inherited top-1) of
the evolution and of random search alike, and each picks by the fine-tuned score. Before any winner is
retrained, the scores themselves say something: which search's top K fine-tunes better, and how alike
each search's top K is. This script reads each seed's evidence JSON (random search's evaluations and
fine-tuned scores) and that seed's evolutionary search state (`OUT/search-evolution/search/state.json`:
its evaluations and the fine-tuned scores it keeps), and reports per seed and search:

- the inherited top-1 of the K fine-tuned candidates, and their fine-tuned top-1 (best and mean);
- their mean pairwise gene distance (`Arch.gene_distance`, the one `--finetune-spread` uses): of the 5
  genes a block over all blocks, how many differ between two of them;
- the mean inherited top-1 over all evaluations, and how many archs both searches evaluated.

    python bench/evidence_second_stage.py --seeds 0,1 \\
        --batch-json 'bench/evidence/cifar10-batch4-seed{seed}.json' --out '/work/evidence/b4/s{seed}' \\
        --json-out bench/evidence/cifar10-batch4-second-stage.json --plot bench/evidence/cifar10-batch4-second-stage.png

A batch that ran only the evolution step (batch 5: `--finetune-spread`) is compared with an earlier batch's
random search under the same budget: `--random-json 'bench/evidence/cifar10-batch4-seed{seed}.json'`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from dataclasses import fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from glit_deploy.atomic_io import atomic_write, atomic_write_json
from glit_deploy.space import Arch, BlockGenes

console = Console()


class EvidenceError(Exception):
    """A missing or mismatched input, reported in one line."""


def mean_pairwise_distance(archs: list[dict[str, Any]]) -> float:
    """The mean of `Arch.gene_distance` over every pair of `archs` (the distance `--finetune-spread` uses)."""
    pairs = list(itertools.combinations([Arch.from_dict(a) for a in archs], 2))
    return statistics.mean(a.gene_distance(b) for a, b in pairs) if pairs else 0.0


def gene_count(arch: dict[str, Any]) -> int:
    return len(arch["blocks"]) * len(fields(BlockGenes))


def summarise(name: str, evaluations: dict[str, dict[str, Any]], finetuned: dict[str, float]) -> dict[str, Any]:
    """One search's top-K as the second stage saw it (`finetuned`: digest -> fine-tuned top-1)."""
    missing = sorted(set(finetuned) - set(evaluations))
    if missing:
        raise EvidenceError(f"{name}: fine-tuned candidates {missing} are not among its evaluations")
    top = sorted(finetuned, key=lambda d: -finetuned[d])
    return {"search": name, "evaluations": len(evaluations),
            "mean_inherited_all": round(statistics.mean(e["top1"] for e in evaluations.values()), 2),
            "candidates": [{"digest": d, "inherited_top1": evaluations[d]["top1"], "finetuned_top1": finetuned[d]}
                           for d in top],
            "best_finetuned": finetuned[top[0]], "mean_finetuned": round(statistics.mean(finetuned.values()), 2),
            "mean_pairwise_gene_distance": round(mean_pairwise_distance([evaluations[d]["arch"] for d in top]), 1),
            "genes": gene_count(next(iter(evaluations.values()))["arch"])}


def read_seed(seed: int, batch_json: Path, out: Path, random_json: Path | None = None) -> dict[str, Any]:
    """One seed's two searches: the evolution of `out`'s state, random search of `random_json` (default
    `batch_json`: a batch that ran only the evolution step compares with an earlier batch's random search)."""
    for path in (batch_json, random_json or batch_json):
        if not path.exists():
            raise EvidenceError(f"{path} does not exist (bench/evidence_cifar.py --json-out)")
    state_path = out / "search-evolution" / "search" / "state.json"
    if not state_path.exists():
        raise EvidenceError(f"{state_path} does not exist: the seed's evolutionary search state is needed")
    batch, state = json.loads(batch_json.read_text()), json.loads(state_path.read_text())
    random_batch = json.loads(random_json.read_text()) if random_json else batch
    if not random_batch.get("random", {}).get("finetuned") or not state.get("finetuned"):
        raise EvidenceError(f"seed {seed}: no fine-tuned scores (was it run with --finetune-top?)")
    if random_batch["budget_ms"] != batch["budget_ms"]:
        raise EvidenceError(f"seed {seed}: {random_json} searched under {random_batch['budget_ms']} ms, "
                            f"{batch_json} under {batch['budget_ms']} ms: not comparable")
    evolution = summarise("evolution", {k.split(":", 1)[1]: v for k, v in state["evaluations"].items()},
                          {k.split(":", 1)[1]: v for k, v in state["finetuned"].items()})
    random_search = summarise("random search", {e["digest"]: e for e in random_batch["random"]["evaluations"]},
                              random_batch["random"]["finetuned"])
    shared = {c["digest"] for c in evolution["candidates"]} & {c["digest"] for c in random_search["candidates"]}
    return {"seed": seed, "budget_ms": batch["budget_ms"], "evolution": evolution, "random_search": random_search,
            "finetuned_difference": round(evolution["best_finetuned"] - random_search["best_finetuned"], 2),
            "shared_candidates": sorted(shared),
            "winners": {"evolution": batch["evolution"]["winner"]["digest"],
                        "random_search": random_batch["random"]["winner"]["digest"]},
            "finetune_spread": batch["settings"]["search"].get("finetune_spread", 0),
            "random_finetune_spread": random_batch["settings"]["search"].get("finetune_spread", 0)}


def plot(seeds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 4), squeeze=False)
    for ax, seed in zip(axes[0], seeds, strict=True):
        for key, colour in (("evolution", "tab:blue"), ("random_search", "tab:orange")):
            s = seed[key]
            xs = [c["inherited_top1"] for c in s["candidates"]]
            ys = [c["finetuned_top1"] for c in s["candidates"]]
            ax.scatter(xs, ys, color=colour,
                       label=f"{s['search']} top {len(xs)} (gene distance {s['mean_pairwise_gene_distance']:g})")
        ax.set_title(f"search seed {seed['seed']}, budget {seed['budget_ms']:g} ms")
        ax.set_xlabel("inherited top-1 (%)")
        ax.set_ylabel("fine-tuned top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="comma list of search seeds")
    parser.add_argument("--batch-json", default="bench/evidence/cifar10-batch4-seed{seed}.json")
    parser.add_argument("--out", default="/work/evidence/b4/s{seed}", help="each seed's evidence_cifar --out")
    parser.add_argument("--random-json", help="each seed's JSON whose random search to compare with (default: "
                                              "--batch-json's own)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    try:
        seeds = [read_seed(int(s), Path(args.batch_json.format(seed=s)), Path(args.out.format(seed=s)),
                           Path(args.random_json.format(seed=s)) if args.random_json else None)
                 for s in args.seeds.split(",")]
    except EvidenceError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None
    table = Table(title="the second stage: each search's fine-tuned top candidates")
    for col in ("seed", "search", "inherited (its K)", "fine-tuned best", "fine-tuned mean", "gene distance",
                "mean inherited, all"):
        table.add_column(col, justify="right" if col not in ("search",) else "left")
    for seed in seeds:
        for key in ("evolution", "random_search"):
            s = seed[key]
            inh = [c["inherited_top1"] for c in s["candidates"]]
            table.add_row(str(seed["seed"]), s["search"], f"{min(inh):.2f}-{max(inh):.2f}",
                          f"{s['best_finetuned']:.2f}", f"{s['mean_finetuned']:.2f}",
                          f"{s['mean_pairwise_gene_distance']:g} of {s['genes']}", f"{s['mean_inherited_all']:.2f}")
    console.print(table)
    diffs = [s["finetuned_difference"] for s in seeds]
    console.print(f"evolution - random search, best fine-tuned top-1: {', '.join(f'{d:+.2f}' for d in diffs)} "
                  f"(mean {statistics.mean(diffs):+.2f})")
    if args.json_out:
        atomic_write_json(args.json_out, {"about": "bench/evidence_second_stage.py", "seeds": seeds,
                                          "finetuned_difference_mean": round(statistics.mean(diffs), 2)})
    if args.plot:
        plot(seeds, args.plot)


if __name__ == "__main__":
    main()
