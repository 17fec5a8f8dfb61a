"""Evidence, batch 3: the search against random search over several seeds of the search, each winner retrained.

Batch 1 compared one evolutionary search with one random search, and its retrained outcome turned on which
of two near-tied random archs the latency rule let through. Batch 3 runs both with several seeds of the
search (`bench/evidence_cifar.py --seed S`, one JSON per seed, the same supernet and budget), retrains both
winners of every seed with one recipe and one retraining seed (`bench/evidence_retrain.py --batch1 <that
JSON> --jobs evolution-s0,random-search-s0`, each seed's models in their own directory), and this script
reads what was published:

- per search seed, each winner's inherited top-1 (the fitness that chose it), retrained top-1 and the
  latency its file was published with, and the paired difference evolution - random search;
- over seeds: the mean, sample sd and standard error of that difference and how many seeds evolution won,
  each role's mean retrained top-1, and the reference models of `--reference` (the CNN baseline and the
  all-global arch retrained with the same recipe) next to them;
- Kendall's tau between inherited and retrained top-1 over every retrained winner: whether the supernet
  ordered the winners the way retraining does; and over every arch retrained with the same number of
  epochs and scored on the same supernet (`--same-supernet`: directories of earlier models whose
  `inherited_top1` comes from that supernet; each arch once, its seeds averaged); and over those of them
  within `--near-top` points of the best on the supernet, the archs a search actually chooses between;
- with `--remeasure S`: every winner's file and the reference files timed again here, all interleaved in
  one run, as ratios to the first seed's evolution winner (the comparison at equal latency).

A published model whose arch is not the one its seed's JSON names is refused, not reported. With
`--retrained-elsewhere DIR`, a winner whose arch an earlier batch already retrained with the same retraining
seed and recipe is read from there (and the report says so), instead of being retrained again.

    python bench/evidence_seeds.py --seeds 0,1,2 --remeasure 8 \\
        --json-out bench/evidence/cifar10-batch3.json --plot bench/evidence/cifar10-batch3.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_retrain import (
    REPO,
    RetrainEvidenceError,
    fmt,
    kendall,
    load_json,
    role_stats,
    run_script,
    time_files,
)

from glit_deploy.atomic_io import atomic_write, atomic_write_json

WINNERS = {"evolution": "evolution", "random-search": "random"}  # role -> the step of the seed's JSON
REFERENCE_ROLES = ("cnn", "all-global")
POOLED_ROLES = (*WINNERS, "all-global", "random")  # GLiT archs with an inherited score, whatever chose them
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def retrained_elsewhere(digest: str, retrain_seed: int, directories: Sequence[Path]) -> Path | None:
    """The sidecar of a model of arch `digest` retrained with `retrain_seed` in one of `directories` (the first
    found), or None. The caller checks that its recipe is this batch's."""
    for directory in directories:
        for path in sorted(directory.glob("*.json")):
            record = json.loads(path.read_text())
            if (record.get("digest") == digest and record.get("role") in POOLED_ROLES
                    and (record.get("recipe") or {}).get("seed") == retrain_seed):
                return path
    return None


def seed_winners(seed: int, state: dict[str, Any], models_dir: Path, retrain_seed: int,
                 elsewhere: Sequence[Path] = ()) -> dict[str, Any]:
    """Both winners of one search seed: what the search chose, and what retraining made of it (None until
    its job is published). A winner not published in `models_dir` is taken from a model of the same arch and
    retraining seed in `elsewhere`, when there is one, and marked `retrained_in`."""
    settings = state.get("settings") or {}
    row: dict[str, Any] = {"search_seed": seed, "models_dir": str(models_dir),
                           "supernet_sha256": (settings.get("supernet") or {}).get("sha256"),
                           "budget_ms": state.get("budget_ms"), "host": (state.get("latency_key") or {}).get("device")}
    for role, step in WINNERS.items():
        winner = (state.get(step) or {}).get("winner")
        if not winner:
            raise RetrainEvidenceError(f"search seed {seed}: the '{step}' step has no winner yet")
        name = f"{role}-s{retrain_seed}"
        entry = {"digest": winner["digest"], "inherited_top1": winner["top1"], "search_measured_ms": winner.get(
            "measured_ms"), "name": name, "val_top1": None, "measured_ms": None, "onnx": None, "epochs": None}
        sidecar = models_dir / f"{name}.json"
        if not sidecar.exists():
            sidecar = retrained_elsewhere(winner["digest"], retrain_seed, elsewhere) or sidecar
            if sidecar.exists():
                entry["retrained_in"] = str(sidecar)
        if sidecar.exists():
            record = json.loads(sidecar.read_text())
            if record["digest"] != winner["digest"]:
                raise RetrainEvidenceError(f"{sidecar} holds arch {record['digest']}, but search seed {seed}'s "
                                           f"{step} winner is {winner['digest']}: wrong --models-dir for this seed?")
            entry.update(val_top1=record["val_top1"], measured_ms=record["measured_ms"], epochs=record["epochs"],
                         recipe=record.get("recipe"),
                         onnx=str(sidecar.parent / record["onnx_file"]) if record.get("onnx_file") else None)
        row[role] = entry
    evo, rs = row["evolution"], row["random-search"]
    row["delta_inherited"] = evo["inherited_top1"] - rs["inherited_top1"]
    row["delta_retrained"] = (evo["val_top1"] - rs["val_top1"]
                              if evo["val_top1"] is not None and rs["val_top1"] is not None else None)
    return row


def seed_sources(items: Sequence[str]) -> dict[int, tuple[Path, Path]]:
    """`--seed-source SEED=JSON,MODELS` items: the seeds whose JSON and models directory are not the templates'
    (a seed searched in an earlier batch, under another name)."""
    out: dict[int, tuple[Path, Path]] = {}
    for item in items:
        seed, _, paths = item.partition("=")
        json_path, _, models = paths.partition(",")
        try:
            number = int(seed)
        except ValueError:
            number = None
        if number is None or not json_path or not models:
            raise RetrainEvidenceError(f"--seed-source takes SEED=JSON,MODELS_DIR, not {item!r}")
        out[number] = (REPO / json_path, REPO / models)
    return out


def searched_apart(rows: list[dict[str, Any]]) -> list[str]:
    """What the seeds do not share: the supernet checkpoint they searched, their budget, their latency host. The
    pairs stay comparable within a seed (both searches of a seed share all three); across seeds the report
    must say what varied besides the search's seed."""
    notes = []
    for key, what in (("supernet_sha256", "supernet checkpoints"), ("budget_ms", "budgets (ms)"),
                      ("host", "latency hosts")):
        values = {row["search_seed"]: row[key] for row in rows}
        if len(set(values.values())) > 1:
            notes.append(f"the seeds searched different {what}: "
                         + ", ".join(f"seed {seed} {value}" for seed, value in values.items()))
    return notes


def paired_stats(deltas: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(deltas), "values": deltas, "mean": None, "sd": None, "se": None,
                           "evolution_wins": sum(d > 0 for d in deltas)}
    if deltas:
        out["mean"] = statistics.fmean(deltas)
    if len(deltas) >= 2:
        out["sd"] = statistics.stdev(deltas)
        out["se"] = out["sd"] / math.sqrt(len(deltas))
    return out


def reference_records(directory: Path | None) -> list[dict[str, Any]]:
    if directory is None or not directory.is_dir():
        return []
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    return [r for r in records if r.get("role") in REFERENCE_ROLES]


def pooled_archs(rows: list[dict[str, Any]], directories: list[Path], epochs: int) -> list[dict[str, Any]]:
    """Every distinct arch retrained for `epochs` epochs with an inherited score: this batch's winners and the
    models in `directories` (which the caller vouches were scored on the same supernet). An arch retrained
    with several seeds counts once, with the mean of its retrained top-1."""
    by_digest: dict[str, dict[str, Any]] = {}

    def add(digest: str, source: str, inherited: float, retrained: float) -> None:
        entry = by_digest.setdefault(digest, {"digest": digest, "sources": [], "inherited_top1": inherited,
                                              "retrained": []})
        entry["sources"].append(source)
        entry["retrained"].append(retrained)

    for row in rows:
        for role in WINNERS:
            entry = row[role]
            if entry["val_top1"] is not None and entry["epochs"] == epochs:
                add(entry["digest"], f"search seed {row['search_seed']} {role}", entry["inherited_top1"],
                    entry["val_top1"])
    for directory in directories:
        for path in sorted(directory.glob("*.json")):
            record = json.loads(path.read_text())
            if (record.get("role") in POOLED_ROLES and record.get("inherited_top1") is not None
                    and record.get("epochs") == epochs):
                add(record["digest"], f"{directory.name}/{record['name']}", record["inherited_top1"],
                        record["val_top1"])
    archs = list(by_digest.values())
    for entry in archs:
        entry["retrained_top1"] = statistics.fmean(entry["retrained"])
    return sorted(archs, key=lambda e: -e["inherited_top1"])


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: inherited against retrained top-1, the two winners of a seed joined. Right: each role's models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_pairs, ax_roles) = plt.subplots(1, 2, figsize=(11, 4.2))
    earlier = [e for e in result["pooled"] if not any(src.startswith("search seed") for src in e["sources"])]
    if earlier:
        ax_pairs.scatter([e["inherited_top1"] for e in earlier], [e["retrained_top1"] for e in earlier],
                         marker="x", color="0.5", zorder=2, label="earlier archs, same supernet")
    for row in result["seeds"]:
        evo, rs = row["evolution"], row["random-search"]
        if evo["val_top1"] is not None and rs["val_top1"] is not None:
            ax_pairs.plot([evo["inherited_top1"], rs["inherited_top1"]], [evo["val_top1"], rs["val_top1"]],
                          color="0.7", zorder=1)
        for role, entry, marker, color in (("evolution", evo, "o", "C0"), ("random search", rs, "s", "C1")):
            if entry["val_top1"] is None:
                continue
            ax_pairs.scatter(entry["inherited_top1"], entry["val_top1"], marker=marker, color=color, zorder=2,
                             label=role if row is result["seeds"][0] else None)
            ax_pairs.annotate(f"s{row['search_seed']}", (entry["inherited_top1"], entry["val_top1"]),
                              textcoords="offset points", xytext=(4, 3), fontsize=8)
    tau = result["kendall_pooled"].get("tau")
    ax_pairs.set(xlabel="inherited-weight top-1 on the supernet (%)", ylabel="retrained top-1 (%)",
                 title="each seed's two winners joined; Kendall tau, all " + ("-" if tau is None else f"{tau:+.2f}"))
    if ax_pairs.get_legend_handles_labels()[0]:
        ax_pairs.legend(loc="best", fontsize=8)
    roles = [(name, s) for name, s in result["roles"].items() if s["n"]]
    for x, (_, stats) in enumerate(roles):
        ax_roles.bar(x, stats["mean"], color="0.85", edgecolor="0.5")
        ax_roles.scatter([x] * stats["n"], stats["values"], color="C0", zorder=3)
    ax_roles.set_xticks(range(len(roles)), [name for name, _ in roles], rotation=15)
    values = [v for _, s in roles for v in s["values"]]
    if values:
        ax_roles.set_ylim(min(values) - 3, max(values) + 2)
    ax_roles.set(ylabel="retrained top-1 (%)", title="retrained top-1 by role (each point one model)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def print_result(result: dict[str, Any]) -> None:
    out = Console(width=None if sys.stdout.isatty() else 180)
    timing = result["remeasured"]
    table = Table(title="evolution against random search, one row per search seed: inherited top-1 (the "
                        "fitness), retrained top-1, the latency each file was published with")
    columns = ["seed", "evolution arch", "inherited", "retrained", "ms", "random-search arch", "inherited",
               "retrained", "ms", "diff inherited", "diff retrained"]
    if timing:
        columns += ["evolution here", "random search here"]
    for column in columns:
        table.add_column(column, justify="left" if column.endswith("arch") else "right")
    for row in result["seeds"]:
        cells = [str(row["search_seed"])]
        for role in WINNERS:
            entry = row[role]
            cells += [entry["digest"][:8], fmt(entry["inherited_top1"], 2, " %"), fmt(entry["val_top1"], 2, " %"),
                      fmt(entry["measured_ms"], 3)]
        cells += [fmt(row["delta_inherited"], 2), fmt(row["delta_retrained"], 2)]
        if timing:
            for role in WINNERS:
                here = timing["models"].get(f"s{row['search_seed']}/{role}", {})
                cells.append(f"{fmt(here.get('median_ms'), 3)} ms ({fmt(here.get('ratio'), 2)}x)")
        table.add_row(*cells)
    out.print(table)
    for what in ("delta_inherited", "delta_retrained"):
        s = result[what]
        spread = f", sd {s['sd']:.2f}, standard error {s['se']:.2f}" if s["sd"] is not None else ""
        out.print(f"evolution - random search, {what.split('_')[1]} top-1 over {s['n']} seed(s): "
                  + (f"mean {s['mean']:+.2f} points{spread}; evolution ahead in {s['evolution_wins']} of {s['n']}"
                     if s["mean"] is not None else "-"))
    stats = Table(title="retrained top-1 per role (mean +- sample sd; references from --reference)")
    for column in ("role", "n", "mean", "sd", "values"):
        stats.add_column(column)
    for name, s in result["roles"].items():
        stats.add_row(name, str(s["n"]), fmt(s["mean"], 2, " %"), fmt(s["sd"], 2),
                      " ".join(f"{v:.2f}" for v in s["values"]) or "-")
    out.print(stats)
    near = f"the archs within {result['kendall_near_top']['within_points']:g} points of the best on the supernet"
    for key, what in (("kendall", "the retrained winners"), ("kendall_pooled", "every arch on this supernet"),
                      ("kendall_near_top", near)):
        k = result[key]
        p = f", p = {k['p_value']:.3g}" if k.get("p_value") is not None else ""
        out.print(f"Kendall tau, inherited vs retrained top-1 over {what} ({k['n']}): "
                  + (f"{k['tau']:+.3f}{p}" if k.get("tau") is not None else "-"))
    pooled = Table(title="every arch retrained with these epochs and scored on this supernet, by inherited top-1")
    for column in ("arch", "inherited", "retrained (mean over seeds)", "from"):
        pooled.add_column(column)
    for entry in result["pooled"]:
        pooled.add_row(entry["digest"][:8], fmt(entry["inherited_top1"], 2, " %"),
                       fmt(entry["retrained_top1"], 2, " %"), ", ".join(entry["sources"]))
    out.print(pooled)
    for row in result["seeds"]:
        for role in WINNERS:
            if row[role].get("retrained_in"):
                out.print(f"search seed {row['search_seed']}'s {role} winner {row[role]['digest'][:8]} was not "
                          f"retrained for this batch: read from {row[role]['retrained_in']} (the same arch, "
                          "retraining seed and recipe)")
    for note in result["notes"]:
        out.print(f"note: {note}; each pair shares them, the mean over seeds mixes them")
    if result["pending"]:
        out.print(f"not yet published: {', '.join(result['pending'])}")
    if timing:
        out.print(f"timed here: {timing['host']}, load average {timing['load_before']:.1f} -> "
                  f"{timing['load_after']:.1f}, every file interleaved in one run, ratios to {timing['reference']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma list of search seeds")
    parser.add_argument("--batch-json", default="bench/evidence/cifar10-batch3-seed{seed}.json",
                        help="each seed's bench/evidence_cifar.py JSON ({seed} is replaced)")
    parser.add_argument("--models-dir", default="bench/models/cifar10-b3-seed{seed}",
                        help="where each seed's winners were published ({seed} is replaced)")
    parser.add_argument("--seed-source", action="append", default=[], metavar="SEED=JSON,MODELS_DIR",
                        help="a seed whose JSON and models directory are not the templates' (repeatable)")
    parser.add_argument("--retrain-seed", type=int, default=0, help="the retraining seed of the jobs read")
    parser.add_argument("--reference", type=Path, default=REPO / "bench" / "models" / "cifar10",
                        help="published models whose CNN and all-global roles are shown beside the winners")
    parser.add_argument("--same-supernet", type=Path, nargs="*",
                        default=[REPO / "bench" / "models" / "cifar10", REPO / "bench" / "models" / "cifar10-repick"],
                        help="directories of earlier models scored on the same supernet, pooled into a second tau "
                             "(default: batch 1's and its re-pick's, both on checkpoint ecddcc5d19acb1dd)")
    parser.add_argument("--retrained-elsewhere", type=Path, nargs="*", default=[], metavar="DIR",
                        help="directories of earlier published models: a winner not yet published in its seed's "
                             "--models-dir is read from a model there of the same arch and retraining seed (the "
                             "recipes must match; the table says where each came from)")
    parser.add_argument("--near-top", type=float, default=2.0, metavar="POINTS",
                        help="a third tau over the pooled archs within POINTS of the best inherited top-1: the "
                             "archs a search chooses between")
    parser.add_argument("--remeasure", type=float, metavar="SECONDS",
                        help="time every file again here, interleaved, at least SECONDS")
    parser.add_argument("--json-out", type=Path, help="write it all to this JSON")
    parser.add_argument("--plot", type=Path, help="plot it to this PNG")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise RetrainEvidenceError(f"--seeds takes a comma list of integers, not {args.seeds!r}") from None
    if not seeds:
        raise RetrainEvidenceError("--seeds names no seed")

    sources = seed_sources(args.seed_source)
    rows = []
    for seed in seeds:
        batch_json, models_dir = sources.get(seed) or (REPO / args.batch_json.format(seed=seed),
                                                       REPO / args.models_dir.format(seed=seed))
        rows.append(seed_winners(seed, load_json(batch_json, "run bench/evidence_cifar.py --seed first"),
                                 models_dir, args.retrain_seed, args.retrained_elsewhere))
    recipes = {json.dumps(row[role]["recipe"], sort_keys=True) for row in rows for role in WINNERS
               if row[role].get("recipe") is not None}
    if len(recipes) > 1:
        raise RetrainEvidenceError("the winners were retrained with different recipes: not one schedule, not "
                                   "comparable (" + " | ".join(sorted(recipes)) + ")")
    references = reference_records(args.reference)
    notes = searched_apart(rows)

    retrained = [(row[role]["inherited_top1"], row[role]["val_top1"]) for row in rows for role in WINNERS
                 if row[role]["val_top1"] is not None]
    tau: dict[str, Any] = {"n": len(retrained), "tau": None}
    if len(retrained) >= 2:
        tau.update(kendall([x for x, _ in retrained], [y for _, y in retrained]))
    epochs = {row[role]["epochs"] for row in rows for role in WINNERS if row[role]["epochs"] is not None}
    if len(epochs) > 1:
        raise RetrainEvidenceError(f"the winners were retrained with different epochs ({sorted(epochs)}): "
                                   "not one schedule, not comparable")
    pooled = pooled_archs(rows, args.same_supernet, epochs.pop()) if epochs else []
    tau_pooled: dict[str, Any] = {"n": len(pooled), "tau": None}
    if len(pooled) >= 2:
        tau_pooled.update(kendall([e["inherited_top1"] for e in pooled], [e["retrained_top1"] for e in pooled]))
    best = max((e["inherited_top1"] for e in pooled), default=0.0)
    near = [e for e in pooled if e["inherited_top1"] >= best - args.near_top]
    tau_near: dict[str, Any] = {"n": len(near), "tau": None, "within_points": args.near_top}
    if len(near) >= 2:
        tau_near.update(kendall([e["inherited_top1"] for e in near], [e["retrained_top1"] for e in near]))
    roles = {role: role_stats([row[role]["val_top1"] for row in rows if row[role]["val_top1"] is not None])
             for role in WINNERS}
    for role in REFERENCE_ROLES:
        roles[f"{role} (reference)"] = role_stats([r["val_top1"] for r in references if r["role"] == role])
    result: dict[str, Any] = {
        "seeds": rows,
        "delta_inherited": paired_stats([row["delta_inherited"] for row in rows]),
        "delta_retrained": paired_stats([row["delta_retrained"] for row in rows
                                         if row["delta_retrained"] is not None]),
        "roles": roles, "kendall": tau, "kendall_pooled": tau_pooled,
        "kendall_near_top": tau_near, "pooled": pooled,
        "references": [{k: r.get(k) for k in ("name", "role", "seed", "val_top1", "measured_ms", "onnx_file")}
                       for r in references],
        "pending": [f"s{row['search_seed']}/{row[role]['name']}" for row in rows for role in WINNERS
                    if row[role]["val_top1"] is None],
        "remeasured": None, "notes": notes,
    }
    if args.remeasure:
        files = {f"s{row['search_seed']}/{role}": Path(row[role]["onnx"]) for row in rows for role in WINNERS
                 if row[role]["onnx"]}
        files.update({f"reference/{r['name']}": args.reference / r["onnx_file"] for r in references
                      if r.get("onnx_file")})
        if files:
            reference = next(iter(files))
            result["remeasured"] = time_files(files, args.remeasure, reference)
    print_result(result)
    if args.plot:
        plot(result, args.plot)
        console.print(f"wrote {args.plot}")
    if args.json_out:
        atomic_write_json(args.json_out, {"about": "bench/evidence_seeds.py", "argv": sys.argv[1:], **result})
        console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    run_script(main)
