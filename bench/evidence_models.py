"""Evidence (issue 12): every published CIFAR-10 model in one table, and every search against random search.

Each batch of the evidence published its retrained models in its own directory under `bench/models/`
(`cifar10/` for batch 1 and its baselines, `cifar10-b3-seed0/`, `cifar10-u15h-seed1/`, ...), each model an
ONNX file with a sidecar `NAME.json` (role, retraining seed, arch, inherited and retrained top-1, the
latency its file was published with). This script reads all of them, and for each directory the batch JSON
under `bench/evidence/` that chose its archs (the supernet checkpoint, the budget, the host, the fitness),
and prints:

- one table, every model a row: batch, supernet checkpoint, budget, fitness, role, retraining seed,
  global heads per block, digest, inherited top-1 (the fitness), retrained top-1, epochs, published ms;
- every search against random search: each directory holding both winners at the same schedule, with the
  difference of their retrained means (over retraining seeds), then the mean, sd and sign count over all
  of them and per fitness and supernet (each pair of archs once: two searches that picked the same two
  archs share their retrained models). Batches 5 to 7 changed only the evolution's second stage and ran
  no random search; they are compared with batch 4's of the same seed;
- next to each difference, the difference of the two winners' fitness (what the searches maximised: the
  inherited top-1, or the fine-tuned top-1 where the search fine-tuned), and per group how often the
  evolution found the higher fitness and Kendall's tau between the fitness gap and the retrained gap:
  whether a search that wins on its fitness also wins after retraining (with --plot, as a scatter).

It reads only what was published; nothing is retrained. With `--remeasure SECONDS` it also times one file of
each distinct model (its lowest retraining seed) on this host, all interleaved in one run (ort-cpu, one thread,
batch 1), with each one's ratio to batch 1's evolution winner: the sidecars' `measured_ms` were taken on the
hosts and at the loads of the sessions that published them, so only these ratios compare files at equal latency.

    python bench/evidence_models.py --markdown bench/evidence/models-table.md --json-out bench/evidence/models.json \
        --plot bench/evidence/models-fitness-gap.png
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_retrain import REPO, arch_text, fmt, kendall, role_stats, time_files

from glit_deploy.atomic_io import atomic_write, atomic_write_json, atomic_write_text

MODELS = REPO / "bench" / "models"
EVIDENCE = REPO / "bench" / "evidence"
# directories whose batch JSON is not named after them
BATCH_JSON = {"cifar10": "cifar10-batch1.json", "cifar10-repick": "cifar10-batch1-repick.json",
              "cifar10-u15": "cifar10-u15-search.json"}
# pairs left out of the pooled figures, and why (they stay in the table)
SUPERSEDED = {"cifar10-batch1.json": "its random search ran without the search's 3 % latency margin; "
              "cifar10-batch1-repick.json picks again under the search's rule"}
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def batch_json(directory: Path) -> Path | None:
    """The batch JSON that chose the archs of `directory` (cifar10-b3-seed0 -> cifar10-batch3-seed0.json)."""
    name = BATCH_JSON.get(directory.name) or re.sub(r"^cifar10-b(\d+)-", r"cifar10-batch\1-", directory.name) + ".json"
    path = EVIDENCE / name
    return path if path.is_file() else None


def fitness_of(search: dict[str, Any]) -> str:
    """How the batch's search scored a candidate, in words short enough for a table cell."""
    parts = ["inherited top-1"]
    if search.get("finetune_top"):
        parts = [f"fine-tune top {search['finetune_top']} ({search.get('finetune_steps', '?')} steps)"]
        if search.get("finetune_splits"):
            parts.append(f"split by fine-tune of {search['finetune_splits']}")
    if search.get("finetune_spread"):
        parts.append(f"spread {search['finetune_spread']}")
    if search.get("level2_splits"):
        parts.append(f"level 2 over {search['level2_splits']} splits")
    return ", ".join(parts)


def batch_context(directory: Path) -> dict[str, Any]:
    path = batch_json(directory)
    if path is None:
        return {"batch_json": None, "supernet": "?", "budget_ms": None, "fitness": "?", "host": "?"}
    return batch_context_of(path)


def batch_context_of(path: Path) -> dict[str, Any]:
    state = json.loads(path.read_text())
    settings = state.get("settings", {})
    device = (state.get("latency_key") or {}).get("device", "?")
    return {"batch_json": str(path.relative_to(REPO)),
            "supernet": ((settings.get("supernet") or {}).get("sha256") or "?")[:8],
            "budget_ms": state.get("budget_ms"), "fitness": fitness_of(settings.get("search", {})),
            "host": "AVX-512" if "avx512f" in device else ("AVX2" if "avx2" in device else device)}


def load_models(root: Path) -> list[dict[str, Any]]:
    rows = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        context = batch_context(directory)
        for sidecar in sorted(directory.glob("*.json")):
            record = json.loads(sidecar.read_text())
            if "role" not in record or "val_top1" not in record:
                continue
            file = directory / record.get("onnx_file", "")
            # a CNN baseline was fitted to a latency, not scored on a supernet
            searched = {} if record["role"] != "cnn" else {"supernet": "–", "fitness": "– (fitted to the latency)"}
            rows.append({"batch": directory.name, **context, **searched, "name": record.get("name", sidecar.stem),
                         "role": record["role"], "seed": record.get("seed"), "digest": record.get("digest"),
                         "split": arch_text(record),
                         "inherited_top1": record.get("inherited_top1"), "val_top1": record["val_top1"],
                         "epochs": record.get("epochs"), "measured_ms": record.get("measured_ms"),
                         "file": str(file.relative_to(REPO) if file.is_relative_to(REPO) else file)})
    return rows


def batch_jsons() -> list[Path]:
    """Every batch JSON of a search (it has `settings`), in name order."""
    return sorted(p for p in EVIDENCE.glob("cifar10-*.json") if "settings" in json.loads(p.read_text()))


def random_step_of(path: Path, state: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The random search a batch's evolution is compared with: its own, or, for batches 5 to 7 (they changed
    only the evolution's second stage and ran no random search), batch 4's of the same seed."""
    if state.get("random"):
        return state["random"], path.name
    borrowed = re.sub(r"^cifar10-batch[567]-", "cifar10-batch4-", path.name)
    if borrowed != path.name and (EVIDENCE / borrowed).is_file():
        return json.loads((EVIDENCE / borrowed).read_text()).get("random"), borrowed
    return None, ""


def fitness_score(winner: dict[str, Any]) -> float | None:
    """The score the search ranked its winner by: the fine-tuned top-1 where it fine-tuned, else inherited top-1."""
    return winner.get("finetuned_top1", winner.get("top1"))


def retrained(rows: list[dict[str, Any]], digest: str, epochs: int, prefer: str) -> list[dict[str, Any]]:
    """The models of arch `digest` retrained for `epochs`, one per retraining seed: those in directory
    `prefer` first, then any other directory's (a batch whose winner an earlier batch retrained reads it there)."""
    found: dict[Any, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["batch"] != prefer):
        if r["digest"] == digest and r["epochs"] == epochs and r["role"] != "ranking":
            found.setdefault(r["seed"], r)
    return list(found.values())


def search_pairs(rows: list[dict[str, Any]], epochs: int = 10) -> list[dict[str, Any]]:
    """Per batch JSON whose two winners were both retrained: each winner's retrained mean over its retraining
    seeds and the difference evolution - random search."""
    pairs = []
    for path in batch_jsons():
        state = json.loads(path.read_text())
        random_step, random_from = random_step_of(path, state)
        evo_winner = ((state.get("evolution") or {}).get("winner") or {})
        rnd_winner = ((random_step or {}).get("winner") or {})
        if not evo_winner.get("digest") or not rnd_winner.get("digest"):
            continue
        home = next((r["batch"] for r in rows if r["batch_json"] == str(path.relative_to(REPO))), None)
        evo = retrained(rows, evo_winner["digest"], epochs, home)
        rnd = retrained(rows, rnd_winner["digest"], epochs, home)
        if not evo or not rnd:
            continue
        context = batch_context_of(path)
        evo_mean, rnd_mean = statistics.fmean(r["val_top1"] for r in evo), statistics.fmean(r["val_top1"] for r in rnd)
        evo_fitness, rnd_fitness = fitness_score(evo_winner), fitness_score(rnd_winner)
        pairs.append({**context, "batch_json": path.name, "random_search_from": random_from, "epochs": epochs,
                      "superseded": SUPERSEDED.get(path.name),
                      "evolution": {"digest": evo_winner["digest"], "n": len(evo), "mean": evo_mean,
                                    "inherited_top1": evo_winner.get("top1"), "fitness_top1": evo_fitness,
                                    "models": [r["file"] for r in evo]},
                      "random_search": {"digest": rnd_winner["digest"], "n": len(rnd), "mean": rnd_mean,
                                        "inherited_top1": rnd_winner.get("top1"), "fitness_top1": rnd_fitness,
                                        "models": [r["file"] for r in rnd]},
                      "difference": evo_mean - rnd_mean,
                      "fitness_difference": None if evo_fitness is None or rnd_fitness is None
                      else evo_fitness - rnd_fitness})
    return pairs


def distinct(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs with each (evolution arch, random-search arch) once: two searches that picked the same two
    archs share their retrained models, so they are one data point, not two."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for p in pairs:
        if p["superseded"]:
            continue
        seen.setdefault((p["evolution"]["digest"], p["random_search"]["digest"]), p)
    return list(seen.values())


def pooled(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    diffs = [p["difference"] for p in pairs]
    if not diffs:
        return {"n": 0}
    stats = role_stats(diffs)
    mean, sd = stats["mean"], stats["sd"]
    scored = [p for p in pairs if p["fitness_difference"] is not None]
    fitness_gaps = [p["fitness_difference"] for p in scored]
    # does the gap the search won on its fitness carry into the retrained gap? (tau needs 3 points to mean anything)
    carried = kendall(fitness_gaps, [p["difference"] for p in scored]) if len(scored) >= 3 else {"tau": None}
    return {"n": len(diffs), "mean": mean, "sd": sd, "se": sd / len(diffs) ** 0.5 if sd is not None else None,
            "evolution_ahead": sum(d > 0 for d in diffs),
            "fitness_n": len(scored), "fitness_mean": statistics.fmean(fitness_gaps) if fitness_gaps else None,
            "evolution_ahead_on_fitness": sum(g > 0 for g in fitness_gaps),
            "fitness_gap_vs_retrained_gap": carried}


def plot_fitness_gap(pairs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Each distinct pair a point: the fitness gap the evolution won or lost by, against the retrained gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    scored = [p for p in pairs if p["fitness_difference"] is not None]
    for i, fitness in enumerate(dict.fromkeys(p["fitness"] for p in scored)):
        group = [p for p in scored if p["fitness"] == fitness]
        ax.scatter([p["fitness_difference"] for p in group], [p["difference"] for p in group], color=f"C{i}",
                   label=f"{fitness} ({len(group)})", zorder=3)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    overall = summary["all searches"]
    tau = overall.get("fitness_gap_vs_retrained_gap", {}).get("tau")
    ax.set(xlabel="evolution − random search, fitness (points)", ylabel="evolution − random search, retrained (points)",
           title=f"{overall['n']} searches: fitness gap against retrained gap, Kendall tau "
                 + ("-" if tau is None else f"{tau:+.2f}"))
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def gap_text(s: dict[str, Any]) -> str:
    """A group's fitness gap in words: its mean, how often evolution was ahead on it, and whether it carried."""
    if not s.get("fitness_n"):
        return "-"
    tau = s["fitness_gap_vs_retrained_gap"].get("tau")
    return (f"{s['fitness_mean']:+.2f}, ahead in {s['evolution_ahead_on_fitness']} of {s['fitness_n']}"
            + ("" if tau is None else f"; tau with the retrained gap {tau:+.2f}"))


def model_key(row: dict[str, Any]) -> str:
    """What makes two published files the same model but for the retraining seed: the arch, or the CNN's name."""
    return row["digest"] or f"{row['batch']}/{row['name'].rsplit('-s', 1)[0]}"


REFERENCE = ("cifar10", "evolution")  # the ratios' 1.00x: batch 1's evolution winner


def remeasure_models(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One file per distinct model (its lowest seed, the ranking set's 5-epoch files left out: their archs
    are timed by the latency table's measurements, not compared here), timed interleaved; each row gets its
    model's ratio."""
    chosen: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["seed"] or 0, r["batch"])):
        if r["role"] != "ranking":
            chosen.setdefault(model_key(r), r)
    reference = next(k for k, r in chosen.items() if (r["batch"], r["role"]) == REFERENCE)
    timing = time_files({k: REPO / r["file"] for k, r in chosen.items()}, seconds, reference)
    for r in rows:
        here = timing["models"].get(model_key(r))
        r["interleaved_ratio"] = None if here is None else here["ratio"]
        r["interleaved_ms"] = None if here is None else here["median_ms"]
    return timing


def markdown(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    timed = any("interleaved_ratio" in r for r in rows)
    lines = ["| batch | supernet | budget | fitness | model | role | seed | global heads | digest | inherited | "
             "retrained | epochs | published ms |" + (" interleaved, vs batch 1's evolution |" if timed else ""),
             "|" + "---|" * 4 + "---|---|---:|---|---|---:|---:|---:|---:|" + ("---:|" if timed else "")]
    for r in rows:
        lines.append(f"| `{r['batch']}` | {r['supernet']} | {fmt(r['budget_ms'], 3)} | {r['fitness']} | "
                     f"`{r['name']}` | {r['role']} | {r['seed']} | {r['split']} | `{(r['digest'] or '-')[:8]}` | "
                     f"{fmt(r['inherited_top1'], 2, ' %')} | {fmt(r['val_top1'], 2, ' %')} | {r['epochs']} | "
                     f"{fmt(r['measured_ms'], 3)} |"
                     + (f" {fmt(r.get('interleaved_ratio'), 2, 'x')} |" if timed else ""))
    lines += ["", "| search (batch JSON) | supernet | host | budget | fitness | evolution, retrained (n) | "
              "random search, retrained (n) | evolution − random | fitness gap |",
              "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for p in pairs:
        e, q = p["evolution"], p["random_search"]
        source = p["random_search_from"]
        borrowed = "" if source == p["batch_json"] else f" (random search of {source})"
        if p["superseded"]:
            borrowed += " (not pooled: " + p["superseded"] + ")"
        lines.append(f"| `{p['batch_json']}`{borrowed} | {p['supernet']} | {p['host']} | {fmt(p['budget_ms'], 3)} | "
                     f"{p['fitness']} | `{e['digest'][:8]}` {e['mean']:.2f} % ({e['n']}) | "
                     f"`{q['digest'][:8]}` {q['mean']:.2f} % ({q['n']}) | {p['difference']:+.2f} | "
                     f"{fmt(p['fitness_difference'], 2)} |")
    for label, s in summary.items():
        if s["n"]:
            lines.append(f"| **{label}** | | | | | | {s['n']} distinct pairs, "
                         f"evolution ahead in {s['evolution_ahead']} | "
                         f"**{s['mean']:+.2f}** (sd {fmt(s['sd'])}, se {fmt(s['se'])}) | {gap_text(s)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=MODELS)
    parser.add_argument("--markdown", type=Path, help="write both tables as markdown here")
    parser.add_argument("--json-out", type=Path, help="write every row, every pair and the pooled figures here")
    parser.add_argument("--remeasure", type=float, metavar="SECONDS",
                        help="time one file of each distinct model here, interleaved, at least SECONDS")
    parser.add_argument("--plot", type=Path,
                        help="plot each distinct pair's fitness gap against its retrained gap here")
    args = parser.parse_args(argv)
    if not args.models_root.is_dir():
        console.print(f"[red]error: no models directory at {args.models_root}")
        return 2
    rows = load_models(args.models_root)
    timing = remeasure_models(rows, args.remeasure) if args.remeasure else None
    pairs = search_pairs(rows)
    unique = distinct(pairs)
    summary = {"all searches": pooled(unique)}
    for fitness in dict.fromkeys(p["fitness"] for p in unique):
        summary[fitness] = pooled([p for p in unique if p["fitness"] == fitness])
    # the fine-tune variants differ only in which candidates reach the second stage: one group as well
    fine_tuned = [p for p in unique if p["fitness"].startswith("fine-tune")]
    summary["fine-tune second stage, every variant"] = pooled(fine_tuned)
    for supernet in dict.fromkeys(p["supernet"] for p in unique):
        summary[f"supernet {supernet}"] = pooled([p for p in unique if p["supernet"] == supernet])

    table = Table(title=f"{len(rows)} published models")
    for column in ("batch", "role", "seed", "global heads", "digest", "inherited", "retrained", "ep", "ms",
                   *(("here", "ratio") if timing else ())):
        table.add_column(column)
    for r in rows:
        here = (fmt(r.get("interleaved_ms"), 3), fmt(r.get("interleaved_ratio"), 2, "x")) if timing else ()
        table.add_row(r["batch"], r["role"], str(r["seed"]), r["split"], (r["digest"] or "-")[:8],
                      fmt(r["inherited_top1"]), fmt(r["val_top1"]), str(r["epochs"]), fmt(r["measured_ms"], 3), *here)
    console.print(table)
    versus = Table(title="evolution against random search, per search")
    for column in ("batch JSON", "supernet", "fitness", "evolution", "random search", "difference", "fitness gap"):
        versus.add_column(column)
    for p in pairs:
        e, q = p["evolution"], p["random_search"]
        versus.add_row(p["batch_json"], p["supernet"], p["fitness"], f"{e['mean']:.2f} ({e['n']})",
                       f"{q['mean']:.2f} ({q['n']})", f"{p['difference']:+.2f}", fmt(p["fitness_difference"], 2))
    console.print(versus)
    for label, s in summary.items():
        if s["n"]:
            console.print(f"{label}: {s['n']} distinct pairs, mean {s['mean']:+.2f} (sd {fmt(s['sd'])}, "
                          f"se {fmt(s['se'])}), evolution ahead in {s['evolution_ahead']}; fitness gap {gap_text(s)}")
    if args.markdown:
        atomic_write_text(args.markdown, markdown(rows, pairs, summary))
    if args.json_out:
        atomic_write_json(args.json_out, {"models": rows, "pairs": pairs, "pooled": summary, "remeasured": timing})
    if timing:
        console.print(f"timed here: {timing['host']}, load average {timing['load_before']:.1f} -> "
                      f"{timing['load_after']:.1f}, {len(timing['models'])} files interleaved in one run")
    if args.plot:
        plot_fitness_gap(unique, summary, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
