"""How well a supernet ranks archs for training from scratch (issue 12's "why"): batch 1's archs
re-scored on another supernet, against their retrained accuracy.

Batch 1 (`bench/evidence_cifar.py`) scored its archs on one 5-epoch `cifar` supernet trained with uniform
single-arch sampling; batch 2 (`bench/evidence_retrain.py`) retrains some of them from scratch. Whether
another way of training the supernet (the sandwich rule, more epochs) ranks them better is the question
this script answers: it scores the same archs on each supernet given, exactly as the search scores
(`train.evaluate_subnet`: BatchNorm recalibrated on batch 1's number of training batches of its batch
size, top-1 on the 5,000 held-out images), then reports, for batch 1's scores and for each supernet:

- Kendall's tau between inherited and retrained top-1 over the ranking set (its short schedule), the
  number issue 12 asks of a supernet (goal >= 0.6), and over its mixed archs alone (neither all-local nor
  all-global: the archs a search chooses among, where batch 1's supernet ordered worst);
- the same over every retrained arch of the long schedule (winners, random archs; the mean over seeds);
- which of the evolution and random-search winners the supernet puts first;
- Kendall's tau between the supernet's scores and batch 1's (do the two supernets agree at all).

The supernets are trained by `bench/cifar_supernet.py` (e.g. `--sandwich`, `--epochs 10`), each in its
own run directory; scores are kept in the JSON as they come, so an interrupted call resumes.

    nice -n 15 python bench/cifar_supernet.py --epochs 5 --sandwich --threads 1 \\
        --run /work/evidence/cifar-supernet-sandwich
    nice -n 15 python bench/supernet_ranking.py --supernet sandwich-5ep=/work/evidence/cifar-supernet-sandwich \\
        --threads 1 --json-out bench/evidence/supernet-ranking.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from evidence_retrain import batch1_jobs, inherited_scores, kendall, run_script  # noqa: E402

from glit_deploy.atomic_io import atomic_write_json  # noqa: E402
from glit_deploy.data import make_loader  # noqa: E402
from glit_deploy.errors import GlitError  # noqa: E402
from glit_deploy.rundir import RunDir  # noqa: E402
from glit_deploy.space import Arch, SearchSpace, get_space  # noqa: E402
from glit_deploy.train import evaluate_subnet, load_supernet  # noqa: E402

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
BATCH1_LABEL = "batch 1"  # batch 1's own scores: its uniform 5-epoch supernet


class RankingError(GlitError):
    """Inconsistent inputs (printed as one `error:` line, exit code 2)."""


def batch1_archs(batch1: dict[str, Any], space: SearchSpace) -> dict[str, dict[str, Any]]:
    """Every arch batch 1 retrains or ranks (evidence_retrain's jobs), by digest: {arch, roles, batch-1 score}."""
    scores = inherited_scores(batch1)
    found: dict[str, dict[str, Any]] = {}
    for job in batch1_jobs(batch1, space, epochs=1, ranking_epochs=1)[0]:
        item = found.setdefault(job.arch.digest, {"arch": job.arch.to_dict(), "roles": [],
                                                  "batch1": scores.get(job.arch.digest)})
        if job.role not in item["roles"]:
            item["roles"].append(job.role)
    return found


def retrained(models_dir: Path) -> dict[tuple[str, int], list[float]]:
    """Retrained top-1 of every published model, by (digest, epochs)."""
    results: dict[tuple[str, int], list[float]] = {}
    for path in sorted(models_dir.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("digest") and record.get("val_top1") is not None and record.get("epochs"):
            results.setdefault((record["digest"], int(record["epochs"])), []).append(float(record["val_top1"]))
    return results


def score_supernet(label: str, run: RunDir, archs: dict[str, dict[str, Any]], settings: dict[str, Any],
                   scores: dict[str, Any], save: Any, allow_data_change: bool = False) -> None:
    """Score every arch on the supernet of `run`, keeping each score in scores[label] as it comes."""
    done = scores.setdefault(label, {"run": str(run.path), "top1": {}})
    if done["run"] != str(run.path):
        raise RankingError(f"supernet '{label}' was {done['run']} in the JSON, {run.path} now: use another label")
    todo = [d for d in archs if d not in done["top1"]]
    if not todo:
        return
    supernet, bundle = load_supernet(run, torch.device("cpu"), allow_data_change=allow_data_change)
    space = run.space()
    val_loader = make_loader(bundle.val, settings["batch_size"], shuffle=False)
    for i, digest in enumerate(todo, 1):
        arch = space.validate(Arch.from_dict(archs[digest]["arch"]), source=f"batch 1 arch {digest}")
        started = time.perf_counter()
        top1 = evaluate_subnet(supernet, arch, bundle, settings["batch_size"], settings["calib_batches"],
                               torch.device("cpu"), val_loader=val_loader)
        done["top1"][digest] = top1
        save()
        console.print(f"{label}: {i}/{len(todo)} {digest} ({', '.join(archs[digest]['roles'])}): {top1:.2f} % "
                      f"({time.perf_counter() - started:.0f} s)")


def is_mixed(arch: dict[str, Any], num_heads: int) -> bool:
    """Neither all-local (no global head anywhere) nor all-global: the archs the search chooses among."""
    split = Arch.from_dict(arch).split
    return 0 < sum(split) < num_heads * len(split)


def report(archs: dict[str, dict[str, Any]], scores: dict[str, Any], results: dict[tuple[str, int], list[float]],
           ranking_epochs: int, epochs: int, num_heads: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per supernet: its taus and which winner it puts first; and one row per arch (its scores, retrained)."""
    labels = [BATCH1_LABEL, *scores]
    inherited = {BATCH1_LABEL: {d: a["batch1"] for d, a in archs.items() if a["batch1"] is not None},
                 **{label: s["top1"] for label, s in scores.items()}}
    table = Table(title="inherited top-1 per supernet, and retrained top-1 (mean over seeds)")
    for column in ("arch", "roles", "global heads", *labels, f"retrained {ranking_epochs} ep",
                   f"retrained {epochs} ep"):
        table.add_column(column)
    rows = []
    for digest, a in archs.items():
        short, long_ = results.get((digest, ranking_epochs)), results.get((digest, epochs))
        split = Arch.from_dict(a["arch"]).split
        rows.append({"digest": digest, "roles": a["roles"], "split": list(split),
                     "inherited": {lb: inherited[lb].get(digest) for lb in labels},
                     f"retrained_{ranking_epochs}ep": statistics.fmean(short) if short else None,
                     f"retrained_{epochs}ep": statistics.fmean(long_) if long_ else None,
                     f"seeds_{epochs}ep": len(long_ or [])})
        table.add_row(digest[:8], ",".join(a["roles"]), " ".join(map(str, split)),
                      *(f"{inherited[lb][digest]:.2f}" if digest in inherited[lb] else "-" for lb in labels),
                      f"{statistics.fmean(short):.2f}" if short else "-",
                      f"{statistics.fmean(long_):.2f} (n={len(long_)})" if long_ else "-")
    console.print(table)

    per_supernet: dict[str, Any] = {}
    for label in labels:
        scored = inherited[label]
        out: dict[str, Any] = {}
        for name, epochs_of, roles, mixed_only in (
                ("ranking set", ranking_epochs, {"ranking"}, False),
                ("ranking set, mixed", ranking_epochs, {"ranking"}, True),
                ("long schedule", epochs, {"evolution", "random-search", "all-global", "random"}, False)):
            pairs = [(scored[d], statistics.fmean(results[(d, epochs_of)])) for d, a in archs.items()
                     if roles & set(a["roles"]) and d in scored and (d, epochs_of) in results
                     and (not mixed_only or is_mixed(a["arch"], num_heads))]
            out[name] = {"n": len(pairs), **(kendall([p[0] for p in pairs], [p[1] for p in pairs])
                                             if len(pairs) >= 2 else {"tau": None})}
        winners = {role: d for d, a in archs.items() for role in a["roles"] if role in ("evolution", "random-search")}
        if len(winners) == 2 and all(d in scored for d in winners.values()):
            out["prefers"] = max(winners, key=lambda role: scored[winners[role]])
        common = [d for d in archs if d in scored and d in inherited[BATCH1_LABEL]]
        if label != BATCH1_LABEL and len(common) >= 2:
            out["agreement with batch 1"] = {"n": len(common), **kendall(
                [inherited[BATCH1_LABEL][d] for d in common], [scored[d] for d in common])}
        per_supernet[label] = out

    summary = Table(title="how each supernet ranks (Kendall's tau-b, inherited vs retrained)")
    for column in ("supernet", "tau, ranking set", "tau, its mixed archs", "tau, long schedule", "puts first",
                   "tau vs batch 1"):
        summary.add_column(column)
    for label, out in per_supernet.items():
        def tau(part: dict[str, Any] | None) -> str:
            return "-" if not part or part.get("tau") is None else f"{part['tau']:.2f} (n={part['n']})"
        summary.add_row(label, tau(out["ranking set"]), tau(out["ranking set, mixed"]), tau(out["long schedule"]),
                        out.get("prefers", "-"),
                        tau(out.get("agreement with batch 1")))
    console.print(summary)
    return per_supernet, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--supernet", action="append", default=[], metavar="LABEL=RUN",
                        help="a supernet run to score the archs on (repeatable)")
    parser.add_argument("--batch1", type=Path, default=REPO / "bench" / "evidence" / "cifar10-batch1.json")
    parser.add_argument("--models-dir", type=Path, default=REPO / "bench" / "models" / "cifar10")
    parser.add_argument("--epochs", type=int, default=10, help="the long retraining schedule")
    parser.add_argument("--ranking-epochs", type=int, default=5, help="the ranking set's schedule")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--allow-data-change", action="store_true",
                        help="score a supernet whose recorded dataset changed since (glit's --allow-data-change)")
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "evidence" / "supernet-ranking.json",
                        help="scores so far (read back to resume) and the report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch1 = json.loads(args.batch1.read_text())
    settings = batch1["settings"]["search"]
    archs = batch1_archs(batch1, get_space(batch1["settings"]["space"]))
    previous = json.loads(args.json_out.read_text()) if args.json_out.exists() else {}
    scores: dict[str, Any] = previous.get("supernets", {})

    def save() -> None:
        atomic_write_json(args.json_out, {"about": "bench/supernet_ranking.py", "batch1": str(args.batch1),
                                          "settings": {k: settings[k] for k in ("batch_size", "calib_batches")},
                                          "supernets": scores,
                                          **{key: previous[key] for key in ("report", "archs") if key in previous}})

    for item in args.supernet:
        label, sep, path = item.partition("=")
        if not sep or not label or label == BATCH1_LABEL:
            raise RankingError(f"--supernet {item!r}: give LABEL=RUN (LABEL not '{BATCH1_LABEL}')")
        run = RunDir(Path(path).resolve())
        if run.space().name != batch1["settings"]["space"]:
            raise RankingError(f"{run.path} is a '{run.space().name}' supernet, batch 1's archs are "
                               f"'{batch1['settings']['space']}'")
        score_supernet(label, run, archs, settings, scores, save, args.allow_data_change)
    previous["report"], previous["archs"] = report(archs, scores, retrained(args.models_dir.resolve()),
                                                   args.ranking_epochs, args.epochs,
                                                   get_space(batch1["settings"]["space"]).num_heads)
    save()
    console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    run_script(main)
