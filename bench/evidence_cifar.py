"""Evidence, batch 1 (the supernet part): does the evolutionary search beat random search on CIFAR-10?

On one trained `cifar` supernet and under one latency budget (35 % of the way through the range the
space spans on the target, by the latency model, as in BENCHMARKS section 6), this runs four
resumable steps and writes each one's result into one JSON file as soon as it has it:

1. evolution   the two-level search (`glit_deploy.search.runner.search`, the code behind `glit search`)
               in a fresh copy of the supernet run, OUT/search-evolution; its winner and its number of
               evaluations N.
2. random      random search with the same N evaluations: archs drawn uniformly from the space, kept
               when their predicted latency is within the budget (distinct digests), each scored like
               the search scores (inherited-weight validation top-1 after BN recalibration on the same
               batches). Its winner follows the search's rule, with the search's own functions: the most
               accurate arch whose end-to-end measurement is within the budget less the search's
               margin (3 %), a reading the latency table contradicts timed again (at most 10
               candidates measured). Until 2026-12-01 this step applied no margin and no retiming:
               batch 1's random-search winner was chosen that way. Also scores 3
               "random" archs (the first 3 within budget of the seed+1000 stream), to be retrained
               without any ranking.
3. ranking     at least 12 archs spread over lo .. 1.15 x budget (12 equal-width bins of predicted
               latency, one arch each), scored the same way, with parameters and multiply-adds: the
               set whose retrained accuracy will give Kendall's tau against the supernet's ranking.
4. all-global  the same evolution restricted to the all-global split (DeiT-like blocks, details still
               searched) in OUT/search-all-global; its winner.

With `--finetune-top K` both the evolution (`glit search --finetune-top`) and random search fine-tune their K
most accurate candidates that measure within the budget, from the inherited weights, and the best fine-tuned
wins (the one rule, `glit_deploy.search.fitness.finetuned_winner_by_measurement`; batches 4 to 7 fine-tuned
the K most accurate before measuring them); a score the evolution computed for an arch is reused by
random search. `--finetune-spread D` makes both fine-tune the most accurate candidates that are pairwise at
least D genes apart instead (`glit search --finetune-spread`). `--finetune-splits K` makes the evolution
fine-tune its K most accurate level-1 candidates and search the best one's split at level 2
(`glit search --finetune-splits`). The evolution searches on the table this JSON's budget comes from
(`--latency-table`).

Every step is skipped when the JSON records it as done; the random and ranking steps save after every
evaluation, and the two searches resume from their own state (`search/state.json`), so a killed run
rerun with the same command goes on where it stopped. A JSON written with other settings (supernet
weights, budget, search sizes, seed, ...) is refused rather than mixed.

    # first: the supernet (5 epochs, as in BENCHMARKS section 2)
    nice -n 10 /work/main/.venv/bin/python bench/cifar_supernet.py --epochs 5 --threads 1 \
        --run /work/evidence/cifar-supernet --data cifar10:/work/shared/data/cifar10 \
        --resume-from-existing --json-out /work/evidence/cifar_supernet.json
    # then this batch, every step (rerun the same command after an interruption)
    nice -n 10 /work/main/.venv/bin/python bench/evidence_cifar.py --supernet-run /work/evidence/cifar-supernet \
        --out /work/evidence --json-out /work/evidence/evidence.json \
        --population 8 --generations 2 --parents 3 --children 4 --calib-batches 2
    # or some steps only (random needs the evolution's N)
    nice -n 10 /work/main/.venv/bin/python bench/evidence_cifar.py --steps random,ranking

Random search's winner of a finished JSON picked again under the search's latency rule, on this host,
without the supernet (the evaluations are the JSON's; only the end-to-end timings are taken again, the
evolution's winner first as a reference for the host):

    nice -n 0 /work/main/.venv/bin/python bench/evidence_cifar.py --repick-random bench/evidence/cifar10-batch1.json \
        --json-out bench/evidence/cifar10-batch1-repick.json

A small end-to-end check on the built-in digits space (about 35 s on one core, 21 s of it the latency
table; at 35 % of the digits range the search may find no level-2 candidate, hence --budget):

    nice -n 10 /work/main/.venv/bin/glit train-supernet --run /tmp/ev-digits --space digits --data digits \
        --epochs 2 --threads 1
    GLIT_CACHE_DIR=/tmp/ev-cache nice -n 10 /work/main/.venv/bin/python bench/evidence_cifar.py \
        --supernet-run /tmp/ev-digits --budget 0.16ms --population 4 --generations 1 --parents 2 --children 2 \
        --calib-batches 1 --out /tmp/ev-out --json-out /tmp/ev-out/evidence.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from glit_deploy.atomic_io import atomic_write_json
from glit_deploy.checkpoint import latest_checkpoint_dir
from glit_deploy.data import make_loader
from glit_deploy.errors import GlitError
from glit_deploy.latency import LatencyModel, Target, get_target, measure_arch
from glit_deploy.latency.budget import (
    Budget,
    candidate_verdict,
    decision_protocol,
    latency_record,
    pick_by_measurement,
    timed_candidate,
)
from glit_deploy.latency.measure import TABLE, Protocol, Timing, time_interleaved
from glit_deploy.nn.counting import arch_cost
from glit_deploy.nn.model import GLiT
from glit_deploy.rundir import RunDir
from glit_deploy.runtimes import cpu_name
from glit_deploy.search import SearchConfig, budget_label, parse_latency
from glit_deploy.search.fitness import finetuned_top1, finetuned_winner_by_measurement
from glit_deploy.search.runner import given_latency_model, latency_table_path, run_latency_model, search
from glit_deploy.space import Arch, SearchSpace, get_space
from glit_deploy.train import evaluate_subnet, load_supernet

STEPS = ("evolution", "random", "ranking", "all-global")
BUDGET_FRACTION = 0.35
RANDOM_RETRAIN = 3  # the "random" archs, retrained without ranking
RANDOM_RETRAIN_SEED_OFFSET = 1000
RANKING_BINS = 12
RANKING_TOP = 1.15  # the ranking set's bins end at 1.15 x budget
RANKING_SEED_OFFSET = 2000
BIN_TRIES = 2000
MAX_DRAWS = 200_000
WINNER_FIELDS = ("arch", "top1", "digest", "predicted_ms", "measured_ms", "params", "macs", "finetuned_top1")

console = Console(stderr=True)


class EvidenceError(GlitError):
    """Inconsistent or missing inputs of this script (printed as one `error:` line, exit code 2)."""


# the supernet run -------------------------------------------------------------------------------
def supernet_fingerprint(run: RunDir) -> dict[str, Any]:
    """Which weights a run's supernet holds: its latest epoch and the digest of its safetensors file."""
    ckpt = latest_checkpoint_dir(run.supernet)
    if ckpt is None:
        raise EvidenceError(f"{run.path} has no supernet checkpoint; train one first (glit train-supernet)")
    weights = ckpt / "model.safetensors"
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"checkpoint": str(ckpt.relative_to(run.path)), "sha256": digest.hexdigest()[:16]}


def fresh_run(source: RunDir, path: Path) -> RunDir:
    """A run directory sharing the trained supernet, without any earlier search.

    Copied under a temporary name and renamed, so a copy killed half-way is never taken for a run.
    """
    tmp = path.with_name(f".{path.name}.copying")
    for stale in (path, tmp):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    shutil.copy2(source.meta_path, tmp / "run.json")
    shutil.copytree(source.supernet, tmp / "supernet")
    tmp.rename(path)
    return RunDir(path)


# scoring ----------------------------------------------------------------------------------------
class Scorer:
    """Scores archs exactly as the search does: the supernet of `run` (loaded on first use), BN
    recalibrated on the same `calib_batches` training batches, top-1 on the validation split."""

    def __init__(self, run: RunDir, space: SearchSpace, num_classes: int, latency: LatencyModel,
                 cfg: SearchConfig) -> None:
        self.run, self.space, self.num_classes, self.latency, self.cfg = run, space, num_classes, latency, cfg
        self.device = torch.device("cpu")
        self._loaded: tuple[Any, Any, Any] | None = None

    def record(self, arch: Arch) -> dict[str, Any]:
        """What the JSON keeps of an arch that has not been scored (yet)."""
        cost = arch_cost(self.space, arch, self.num_classes)
        return {"digest": arch.digest, "arch": arch.to_dict(), "predicted_ms": self.latency.predict_ms(arch),
                "params": cost.params, "macs": cost.macs}

    def _load(self) -> tuple[Any, Any, Any]:
        if self._loaded is None:
            supernet, bundle = load_supernet(self.run, self.device)
            self._loaded = supernet, bundle, make_loader(bundle.val, self.cfg.batch_size, shuffle=False)
        return self._loaded

    def score(self, arch: Arch) -> dict[str, Any]:
        supernet, bundle, val_loader = self._load()
        started = time.perf_counter()
        top1 = evaluate_subnet(supernet, arch, bundle, self.cfg.batch_size, self.cfg.calib_batches, self.device,
                               val_loader=val_loader)
        return {**self.record(arch), "top1": top1, "seconds": round(time.perf_counter() - started, 3)}


    def finetuned(self, arch: Arch) -> float:
        """The search's second fitness (`--finetune-top`): `finetuned_top1` with the search's settings."""
        supernet, bundle, val_loader = self._load()
        return finetuned_top1(supernet, arch, bundle, self.cfg.finetune_config(), self.cfg.batch_size,
                              self.cfg.calib_batches, self.device, val_loader, progress=True)[self.cfg.finetune_steps]


def score_all(step: dict[str, Any], plan_key: str, done_key: str, scorer: Scorer, save: Callable[[], None],
              known: dict[str, dict[str, Any]], what: str) -> None:
    """Score the archs of `step[plan_key]` not yet in `step[done_key]`, saving after each one."""
    plan, done = step[plan_key], step[done_key]
    for i in range(len(done), len(plan)):
        arch = Arch.from_dict(plan[i]["arch"])
        entry = dict(known[arch.digest]) if arch.digest in known else scorer.score(arch)
        done.append({**{k: v for k, v in plan[i].items() if k not in entry}, **entry})
        known[arch.digest] = entry
        best = f"; best so far {max(e['top1'] for e in done):.2f} %" if what == "random search" else ""
        took = f"{entry['seconds']:.1f} s" if "seconds" in entry else "scored before"
        console.print(f"{what} {i + 1}/{len(plan)}: {entry['top1']:.2f} % at {entry['predicted_ms']:.3f} ms "
                      f"predicted ({took}){best}")
        save()


def known_scores(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Scores this JSON holds already (by digest): scoring is deterministic, so never twice."""
    known: dict[str, dict[str, Any]] = {}
    for step in (state.get("random"), state.get("ranking")):
        for key in ("evaluations", "random_archs", "archs"):
            for e in (step or {}).get(key, []):
                known[e["digest"]] = {k: e[k] for k in ("digest", "arch", "top1", "predicted_ms", "params", "macs")}
    return known


# drawing archs ----------------------------------------------------------------------------------
def draw_within(space: SearchSpace, latency: LatencyModel, budget: float, rng: random.Random, count: int
                ) -> tuple[list[Arch], int]:
    """The first `count` distinct uniform draws whose predicted latency is within `budget` (the search's
    budget less its margin, as the search's own candidates are: `EvolutionarySearch.feasible`)."""
    archs: list[Arch] = []
    seen: set[str] = set()
    draws = 0
    while len(archs) < count:
        if draws >= MAX_DRAWS:
            raise EvidenceError(f"only {len(archs)} of {MAX_DRAWS:,} uniform draws fit {budget_label(budget)}")
        arch = space.sample(rng)
        draws += 1
        if arch.digest not in seen and latency.predict_ms(arch) <= budget:
            seen.add(arch.digest)
            archs.append(arch)
    return archs, draws


def draw_ranking_set(space: SearchSpace, latency: LatencyModel, lo: float, top: float, rng: random.Random
                     ) -> tuple[list[tuple[int, str, Arch]], list[float]]:
    """One arch per equal-width bin of predicted latency in lo .. top.

    Uniform draws first (at most BIN_TRIES per bin). Uniform archs rarely come near the fastest arch
    of the space, so a bin left empty is tried again with mutations of the fastest arch (each gene
    resampled with a probability drawn from 0.05 .. 0.5); if bins still stay empty, uniform draws from
    the whole lo .. top top the set up to RANKING_BINS archs.
    """
    edges = [lo + i * (top - lo) / RANKING_BINS for i in range(RANKING_BINS + 1)]

    def bin_of(ms: float) -> int | None:
        if ms < lo or ms > top:
            return None
        return min(int((ms - lo) / (top - lo) * RANKING_BINS), RANKING_BINS - 1)

    fastest = latency.fastest_arch(space)
    makers: dict[str, Callable[[], Arch]] = {
        "uniform": lambda: space.sample(rng),
        "near-fastest": lambda: space.mutate(fastest, rng, rng.uniform(0.05, 0.5)),
    }
    picked: dict[int, tuple[str, Arch]] = {}
    taken: set[str] = set()
    for sampler in ("uniform", "near-fastest"):
        for i in range(RANKING_BINS):
            if i in picked:
                continue
            for _ in range(BIN_TRIES):
                arch = makers[sampler]()
                if arch.digest not in taken and bin_of(latency.predict_ms(arch)) == i:
                    picked[i] = (sampler, arch)
                    taken.add(arch.digest)
                    break
    chosen = [(i, sampler, arch) for i, (sampler, arch) in sorted(picked.items())]
    for _ in range(BIN_TRIES * RANKING_BINS):
        if len(chosen) >= RANKING_BINS:
            break
        arch = space.sample(rng)
        b = bin_of(latency.predict_ms(arch))
        if b is not None and arch.digest not in taken:
            taken.add(arch.digest)
            chosen.append((b, "top-up", arch))
    return sorted(chosen, key=lambda c: (c[0], c[2].digest)), edges


def search_settings(cfg: SearchConfig) -> dict[str, Any]:
    """The search's settings as a JSON records them; a setting added since that is at its default is left
    out, so that a JSON written before it still resumes."""
    settings = asdict(cfg)
    for added, default in (("finetune_spread", 0), ("finetune_splits", 0), ("level2_splits", 1)):
        if settings[added] == default:
            del settings[added]
    return settings


def search_budget(ms: float) -> Budget:
    """A budget as `search` takes it: a median `Budget`."""
    return Budget(ms)


def measure_within(arch: Arch, predicted_ms: float, space: SearchSpace, num_classes: int, target: Target,
                   budget: float, margin: float) -> dict[str, Any]:
    """End-to-end timings and the search's own decision on them, as a JSON record with `median_ms` and
    `within_budget`: the same protocol, the same margin (`candidate_verdict`) and the same retiming of a
    reading the latency table contradicts (`timed_candidate`), so that random search and the evolution
    face one latency rule."""
    median = Budget(budget)

    def before_retime(timing: Timing, pause_s: float) -> None:
        console.print(f"{arch.digest[:8]} measured {median.bound_ms(timing):.4f} ms (95 % bound), over the limit; "
                      f"predicted {predicted_ms:.4f} ms: timing it again in {pause_s:g} s")

    attempts, decided = timed_candidate(
        lambda: measure_arch(arch, space, num_classes, target, 1, decision_protocol([median])), predicted_ms,
        median, margin, before_retime)
    record = {**latency_record(decided, median), **candidate_verdict(decided, median, margin), "margin": margin}
    if len(attempts) > 1:
        record["attempts"] = [latency_record(t, median) for t in attempts]
    return record


def pick_winner(step: dict[str, Any], budget_ms: float, margin: float,
                measure: Callable[[dict[str, Any]], dict[str, Any]], save: Callable[[], None],
                candidates: int, finetune_top: int = 0,
                finetuned: Callable[[dict[str, Any]], float] | None = None, finetune_spread: int = 0
                ) -> dict[str, Any]:
    """The search's rule: the most accurate evaluation whose end-to-end measurement meets the budget less the
    search's margin, with the search's second pass when all of the `candidates` most accurate are rejected
    (`table_corrected_candidates`). A measurement kept from before the margin was applied here is taken again.
    With `finetune_top` K, the K most accurate that meet the budget are fine-tuned (`finetuned`) and the best
    fine-tuned wins, by the search's own rule (`finetuned_winner_by_measurement`)."""
    measured = step.setdefault("measured", {})
    rejected: list[dict[str, Any]] = []

    def attempt(entry: dict[str, Any]) -> dict[str, Any] | None:
        if measured.get(entry["digest"], {}).get("margin") != margin:
            measured[entry["digest"]] = measure(entry)
            save()
        record = measured[entry["digest"]]
        if record["within_budget"]:
            return {**{k: entry[k] for k in WINNER_FIELDS if k in entry}, "measured_ms": record["median_ms"],
                    "latency": record, "rejected_over_budget": rejected}
        rejected.append({"digest": entry["digest"], "top1": entry["top1"], "predicted_ms": entry["predicted_ms"],
                         "measured_ms": record["median_ms"], "bound_ms": record["bound_ms"]})
        return None

    ranked = sorted(step["evaluations"], key=lambda e: (-e["top1"], e["predicted_ms"], e["digest"]))
    limit_ms = Budget(budget_ms).limit_ms(margin)
    if finetune_top and finetuned is not None:
        winner, second_pass = finetuned_winner_by_measurement(ranked[:candidates], ranked[candidates:], attempt,
                                                              rejected, limit_ms, candidates, finetune_top,
                                                              finetuned, finetune_spread)
    else:
        winner, second_pass = pick_by_measurement(ranked[:candidates], ranked[candidates:], attempt, rejected,
                                                  limit_ms, candidates)
    if winner is not None:
        return winner
    return {"digest": None, "rejected_over_budget": rejected, **({"second_pass": second_pass} if second_pass else {}),
            "error": f"none of the {len(rejected)} random archs measured (the most accurate, then those the latency "
                     "table corrected by the clock put within the limit) was within the budget less the margin"}


# the steps --------------------------------------------------------------------------------------
class Evidence:
    def __init__(self, args: argparse.Namespace, state: dict[str, Any], source: RunDir, space: SearchSpace,
                 num_classes: int, target: Target, latency: LatencyModel, budget: float, lo: float,
                 cfg: SearchConfig) -> None:
        self.args, self.state, self.source, self.space = args, state, source, space
        self.num_classes, self.target, self.latency = num_classes, target, latency
        self.budget, self.lo, self.cfg = budget, lo, cfg
        self.scorer = Scorer(source, space, num_classes, latency, cfg)

    def save(self) -> None:
        atomic_write_json(self.args.json_out, self.state)

    def measure(self, entry: dict[str, Any]) -> dict[str, Any]:
        return measure_within(Arch.from_dict(entry["arch"]), entry["predicted_ms"], self.space, self.num_classes,
                              self.target, self.budget, self.cfg.latency_margin)

    def run(self, name: str) -> None:
        if self.state.get(name, {}).get("done"):
            console.print(f"[green]{name}: done already[/green] (in {self.args.json_out})")
            return
        console.rule(name)
        started = time.perf_counter()
        if name in ("evolution", "all-global"):
            self.state[name] = self.evolution(name)
        elif name == "random":
            self.random_search()
        else:
            self.ranking_set()
        step = self.state[name]
        step["wall_seconds"] = step.get("wall_seconds", 0.0) + time.perf_counter() - started
        step["done"] = True
        self.save()

    def evolution(self, name: str) -> dict[str, Any]:
        path = self.args.out / f"search-{name}"
        resume = path.exists()
        run = RunDir(path) if resume else fresh_run(self.source, path)
        if supernet_fingerprint(run) != self.state["settings"]["supernet"]:
            raise EvidenceError(f"{path} holds other supernet weights than {self.source.path}; move it away")
        split = [self.space.num_heads] * self.space.depth if name == "all-global" else None
        cfg = replace(self.cfg, fixed_split=split)
        earlier = load_state(run.path / "search" / "state.json").get("config")
        if earlier is not None and earlier != asdict(cfg):
            # the search resumes with the configuration its state recorded, whatever it is given
            raise EvidenceError(f"{path} holds a search with another configuration; move it away")
        started = time.perf_counter()
        # A new search takes the table this JSON's budget and random search use; a resumed one keeps its own.
        table = None if resume else latency_table_path(self.source, self.target.label, 1)
        summary = search(run, [search_budget(self.budget)], self.target, 1, cfg, resume=resume, device="cpu",
                         latency_table=table)
        result = summary["budgets"][budget_label(self.budget)]
        return {"search_dir": str(path), "fixed_split": split, "evaluated": summary["evaluated"],
                "cache_hits": summary["cache_hits"], "search_seconds": summary["seconds"],
                "resumed": resume, "call_seconds": time.perf_counter() - started,
                "winner": {k: result[k] for k in (*WINNER_FIELDS, "latency") if k in result}
                if result.get("digest") else None,
                "rejected_over_budget": result.get("rejected_over_budget", []), "error": result.get("error")}

    def random_search(self) -> None:
        evolution = self.state.get("evolution", {})
        if not evolution.get("done"):
            raise EvidenceError("the random search makes as many evaluations as the evolution made: "
                                "run the evolution step first (--steps evolution)")
        step = self.state.get("random")
        if step is None:
            n = evolution["evaluated"]
            limit = Budget(self.budget).limit_ms(self.cfg.latency_margin)
            plan, draws = draw_within(self.space, self.latency, limit, random.Random(self.args.seed), n)
            retrain_seed = self.args.seed + RANDOM_RETRAIN_SEED_OFFSET
            retrain, retrain_draws = draw_within(self.space, self.latency, limit, random.Random(retrain_seed),
                                                 RANDOM_RETRAIN)
            step = {"done": False, "n": n, "seed": self.args.seed, "draws": draws, "acceptance": n / draws,
                    "retrain_seed": retrain_seed, "retrain_draws": retrain_draws,
                    "plan": [self.scorer.record(a) for a in plan],
                    "retrain_plan": [self.scorer.record(a) for a in retrain],
                    "evaluations": [], "random_archs": []}
            self.state["random"] = step
            self.save()
            console.print(f"random: {n} archs within {budget_label(self.budget)} from {draws} uniform draws "
                          f"({100 * n / draws:.1f} % accepted)")
        known = known_scores(self.state)
        score_all(step, "plan", "evaluations", self.scorer, self.save, known, "random search")
        score_all(step, "retrain_plan", "random_archs", self.scorer, self.save, known, "random arch")
        step["winner"] = pick_winner(step, self.budget, self.cfg.latency_margin, self.measure, self.save,
                                     self.cfg.winner_candidates, self.cfg.finetune_top, self.finetuned,
                                     self.cfg.finetune_spread)

    def finetuned(self, entry: dict[str, Any]) -> float:
        """A random-search candidate's fine-tuned score, kept in the step (saved at once) and shared with the
        evolution's search state where it fine-tuned the same arch (the score is deterministic)."""
        scores = self.state["random"].setdefault("finetuned", {})
        if entry["digest"] not in scores:
            evolution = load_state(self.args.out / "search-evolution" / "search" / "state.json")
            scores[entry["digest"]] = evolution.get("finetuned", {}).get(f"supernet:{entry['digest']}") \
                or self.scorer.finetuned(Arch.from_dict(entry["arch"]))
            self.save()
        return scores[entry["digest"]]

    def ranking_set(self) -> None:
        step = self.state.get("ranking")
        if step is None:
            top = round(self.budget * RANKING_TOP, 4)
            seed = self.args.seed + RANKING_SEED_OFFSET
            chosen, edges = draw_ranking_set(self.space, self.latency, self.lo, top, random.Random(seed))
            step = {"done": False, "seed": seed, "range_ms": [self.lo, top], "bin_edges_ms": edges,
                    "empty_bins": sorted(set(range(RANKING_BINS)) - {b for b, _, _ in chosen}),
                    "plan": [{"bin": b, "sampler": s, **self.scorer.record(a)} for b, s, a in chosen],
                    "archs": []}
            self.state["ranking"] = step
            self.save()
            console.print(f"ranking: {len(chosen)} archs over {self.lo:.3f} .. {top:.3f} ms "
                          f"(samplers: {', '.join(sorted({s for _, s, _ in chosen}))}; "
                          f"empty bins: {step['empty_bins'] or 'none'})")
        score_all(step, "plan", "archs", self.scorer, self.save, known_scores(self.state), "ranking arch")


# output -----------------------------------------------------------------------------------------
def heads(arch: dict[str, Any] | None) -> str:
    return " ".join(str(b["global_heads"]) for b in arch["blocks"]) if arch else "-"


def fmt(value: float | None, unit: str, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}"


def print_table(state: dict[str, Any]) -> None:
    rows: list[tuple[str, dict[str, Any] | None]] = []
    for name, role in (("evolution", "evolution winner"), ("random", "random-search winner"),
                       ("all-global", "all-global winner")):
        step = state.get(name)
        if step and step.get("done"):
            winner = step.get("winner")
            rows.append((f"{role} (N={step.get('evaluated', step.get('n'))})",
                         winner if winner and winner.get("digest") else None))
    for i, e in enumerate((state.get("random") or {}).get("random_archs", []), 1):
        rows.append((f"random arch {i}", e))
    for e in (state.get("ranking") or {}).get("archs", []):
        rows.append((f"ranking {e['bin'] + 1}" + ("" if e["sampler"] == "uniform" else f" ({e['sampler']})"), e))
    budget = state["budget_ms"]
    lo, hi = state["range_ms"]
    table = Table(title=f"evidence on {state['settings']['space']} ({state['settings']['target']}, batch 1): "
                        f"budget {budget_label(budget)}, space spans {lo:.3f}-{hi:.3f} ms (predicted)")
    for column in ("role", "global heads per block", "inherited top-1", "predicted", "measured", "params", "MACs"):
        table.add_column(column, justify="left" if column in ("role", "global heads per block") else "right")
    for role, e in rows:
        if e is None:
            table.add_row(role, "none", "-", "-", "-", "-", "-")
            continue
        table.add_row(role, heads(e.get("arch")), fmt(e.get("top1"), "%", 2), fmt(e.get("predicted_ms"), "ms", 3),
                      fmt(e.get("measured_ms"), "ms", 3), fmt(e["params"] / 1e6 if "params" in e else None, "M", 3),
                      fmt(e["macs"] / 1e6 if "macs" in e else None, "M", 1))
    out = Console(width=None if sys.stdout.isatty() else 150)
    out.print(table)
    evo, rnd = state.get("evolution", {}).get("winner"), (state.get("random") or {}).get("winner")
    if evo and rnd and rnd.get("digest") and state.get("random", {}).get("done"):
        out.print(f"evolution - random search, inherited top-1 at equal evaluations: "
                  f"{evo['top1'] - rnd['top1']:+.2f} points")


# picking random search's winner again -----------------------------------------------------------
def repick_random(source: Path, json_out: Path, reference: bool, interleave_seconds: float) -> dict[str, Any]:
    """Random search's winner picked again from a finished JSON under the search's rule, on this host.

    Needs no supernet: the evaluations (inherited top-1, batch 1's predicted latency) are the JSON's; only
    the end-to-end measurements are taken again, so the pick is the one the search's rule
    (`candidate_verdict`, `timed_candidate`) makes on this host. The earlier winner and measurements are
    kept under `earlier_winner` and `earlier_measured`. With `reference`, the evolution's winner is timed
    first under the same rule: its reading against the JSON's tells whether this host times like the one
    that set the budget. An interrupted re-pick goes on from `json_out`.
    """
    state = load_state(json_out) or load_state(source)
    step = state.get("random") or {}
    if not step.get("done") or not state.get("evolution", {}).get("winner"):
        raise EvidenceError(f"{source} holds no finished evolution and random steps to pick from")
    space = get_space(state["settings"]["space"])
    if space.digest != state["settings"]["space_digest"]:
        raise EvidenceError(f"the space {space.name} changed since {source} was written")
    key = state["latency_key"]
    target = get_target(state["settings"]["target"], state["settings"]["latency_threads"])
    margin = state["settings"]["search"]["latency_margin"]
    budget = state["budget_ms"]

    def measure(entry: dict[str, Any]) -> dict[str, Any]:
        return measure_within(Arch.from_dict(entry["arch"]), entry["predicted_ms"], space, key["num_classes"],
                              target, budget, margin)

    host = {"cpu": cpu_name(), "when": time.strftime("%Y-%m-%d %H:%M"), "load_before": list(os.getloadavg())}
    if "earlier_winner" not in step:
        step["earlier_winner"], step["earlier_measured"] = step.pop("winner"), step.pop("measured", {})
        step["repick"] = {"from": str(source), "host": host}
    if reference and "reference" not in step["repick"]:
        evo = state["evolution"]["winner"]
        step["repick"]["reference"] = {"digest": evo["digest"], "recorded_ms": evo["measured_ms"],
                                       "latency": measure(evo)}
        atomic_write_json(json_out, state)
    step["winner"] = pick_winner(step, budget, margin, measure, lambda: atomic_write_json(json_out, state),
                                 state["settings"]["search"]["winner_candidates"])
    step["repick"]["load_after"] = list(os.getloadavg())
    atomic_write_json(json_out, state)
    if interleave_seconds and "interleaved" not in step["repick"]:
        step["repick"]["interleaved"] = time_candidates(state, space, key["num_classes"], target, interleave_seconds)
        atomic_write_json(json_out, state)
    return state


def time_candidates(state: dict[str, Any], space: SearchSpace, num_classes: int, target: Target,
                    seconds: float) -> dict[str, Any]:
    """The evolution's winner and every random-search candidate the two picks measured, timed interleaved in one
    run on this host (ratios to the evolution's winner): the comparison at equal latency that single timings
    taken minutes apart cannot give."""
    step = state["random"]
    evo = state["evolution"]["winner"]
    entries = {evo["digest"]: evo}
    by_digest = {e["digest"]: e for e in step["evaluations"]}
    for digest in (*step.get("earlier_measured", {}), *step.get("measured", {})):
        entries.setdefault(digest, by_digest[digest])
    image = torch.randn(1, space.in_chans, space.image_size, space.image_size)
    runners = {d[:8]: target.runner(GLiT(Arch.from_dict(e["arch"]), space, num_classes).eval(), image)
               for d, e in entries.items()}
    load_before = os.getloadavg()[0]
    timings = time_interleaved(runners, Protocol(min_seconds=seconds, max_seconds=4 * seconds))
    reference = timings[evo["digest"][:8]].median_ms
    return {"load_before": load_before, "load_after": os.getloadavg()[0], "min_seconds": seconds,
            "models": {name: {"top1": entries[next(d for d in entries if d[:8] == name)]["top1"], **t.to_dict(),
                              "ratio_to_evolution": t.median_ms / reference} for name, t in timings.items()}}


def print_repick(state: dict[str, Any]) -> None:
    step = state["random"]
    budget, margin = state["budget_ms"], state["settings"]["search"]["latency_margin"]
    out = Console(width=None if sys.stdout.isatty() else 150)
    out.print(f"budget {budget_label(budget)}, limit {budget * (1 - margin):.4f} ms (less the {100 * margin:g} % "
              f"margin); host {step['repick']['host']['cpu']}")
    ref = step["repick"].get("reference")
    if ref:
        out.print(f"reference, the evolution's winner {ref['digest'][:8]}: recorded {ref['recorded_ms']:.4f} ms, "
                  f"here {ref['latency']['median_ms']:.4f} ms")
    for name, winner in (("earlier winner", step["earlier_winner"]), ("winner now", step["winner"])):
        if winner.get("digest"):
            out.print(f"{name}: {winner['digest'][:8]} ({heads(winner['arch'])}) {winner['top1']:.2f} %, "
                      f"measured {winner['measured_ms']:.4f} ms, bound {winner['latency']['bound_ms']:.4f} ms")
        else:
            out.print(f"{name}: none ({winner.get('error')})")
        for r in winner.get("rejected_over_budget", []):
            out.print(f"   rejected {r['digest'][:8]} {r['top1']:.2f} %: measured {r['measured_ms']:.4f} ms, "
                      f"predicted {r['predicted_ms']:.4f}")
    timed = step["repick"].get("interleaved")
    if timed:
        out.print(f"interleaved on this host (load {timed['load_before']:.2f} -> {timed['load_after']:.2f}):")
        for name, t in sorted(timed["models"].items(), key=lambda kv: kv[1]["ratio_to_evolution"]):
            out.print(f"   {name} {t['top1']:.2f} %: median {t['median_ms']:.4f} ms "
                      f"({t['ratio_to_evolution']:.3f}x the evolution's winner)")


# main -------------------------------------------------------------------------------------------
def parse_steps(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown step(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(STEPS)}")
    return [s for s in STEPS if s in names]


def load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvidenceError(f"{path} is corrupt ({exc.msg}); move it away to start over") from None


def source_latency_model(source: RunDir, target: Target) -> LatencyModel:
    """The supernet run's own latency table when it was measured with this code's settings: the table every
    earlier batch on that run took its budget from and searched on, used as it is (`glit search
    --latency-table`'s rule: checked against the host, only warned about). Rebuilding it because a host check
    ran under load would change the candidates' predictions between batches. Otherwise a table is measured
    (or taken from the cache) now."""
    path = latency_table_path(source, target.label, 1)
    if path.exists():
        try:
            return given_latency_model(source, path, target, 1, TABLE)
        except GlitError as exc:  # measured with other settings (or an older format): measure it now
            console.print(f"[yellow]note: {exc}; measuring the table again[/yellow]")
    return run_latency_model(source, target, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--supernet-run", type=Path, default=Path("/work/evidence/cifar-supernet"))
    parser.add_argument("--out", type=Path, default=Path("/work/evidence"), help="where the search copies go")
    parser.add_argument("--json-out", type=Path, default=Path("/work/evidence/evidence.json"))
    parser.add_argument("--budget", help=f"latency budget, e.g. 1.51ms (default: {100 * BUDGET_FRACTION:g} %% into the "
                                         "space's predicted range, or the one the JSON records)")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--latency-threads", type=int, default=1, help="runtime threads of the latency target")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for scoring")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--parents", type=int, default=3)
    parser.add_argument("--children", type=int, default=4, help="mutations and crossovers per generation, each")
    parser.add_argument("--finetune-top", type=int, default=0,
                        help="the search's --finetune-top, for the evolution and random search alike")
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--finetune-spread", type=int, default=0,
                        help="the search's --finetune-spread, for the evolution and random search alike")
    parser.add_argument("--finetune-splits", type=int, default=0,
                        help="the evolution's --finetune-splits (random search has no levels)")
    parser.add_argument("--level2-splits", type=int, default=1,
                        help="the evolution's --level2-splits: level 2 searches level 1's K best splits")
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=parse_steps, default=list(STEPS),
                        help=f"comma list, run in the order {','.join(STEPS)} (default: all)")
    parser.add_argument("--repick-random", type=Path, metavar="JSON",
                        help="pick the random step's winner of this finished JSON again under the search's rule, "
                             "on this host, into --json-out (no supernet needed), and exit")
    parser.add_argument("--no-reference", action="store_true",
                        help="with --repick-random: do not time the evolution's winner first")
    parser.add_argument("--interleave-seconds", type=float, default=8.0,
                        help="with --repick-random: then time every candidate measured and the evolution's winner "
                             "interleaved for at least this long (0: not)")
    args = parser.parse_args()
    args.out, args.json_out = args.out.resolve(), args.json_out.resolve()
    torch.set_num_threads(args.threads)
    if args.repick_random:
        if args.json_out == args.repick_random.resolve():
            raise EvidenceError("--json-out must be another file than --repick-random: the source stays as it was")
        print_repick(repick_random(args.repick_random, args.json_out, not args.no_reference, args.interleave_seconds))
        return

    state = load_state(args.json_out)
    source = RunDir(args.supernet_run.resolve())
    meta = source.load_meta()
    space, num_classes = source.space(), meta["data"]["num_classes"]
    cfg = SearchConfig(population=args.population, generations=args.generations, parents=args.parents,
                       mutations=args.children, crossovers=args.children, calib_batches=args.calib_batches,
                       finetune_top=args.finetune_top, finetune_steps=args.finetune_steps,
                       finetune_spread=args.finetune_spread, finetune_splits=args.finetune_splits,
                       level2_splits=args.level2_splits, seed=args.seed)
    settings = {"supernet_run": str(source.path), "supernet": supernet_fingerprint(source), "space": space.name,
                "space_digest": space.digest, "data": meta["data"].get("spec"), "target": args.target,
                "latency_threads": args.latency_threads, "out": str(args.out), "search": search_settings(cfg)}
    if state and state.get("settings") != settings:
        old = state.get("settings", {})
        flat_old, flat_new = {**old, **old.get("search", {})}, {**settings, **settings["search"]}
        changed = [f"{k} {flat_old.get(k)} -> {flat_new.get(k)}" for k in sorted({*flat_old, *flat_new} - {"search"})
                   if flat_old.get(k) != flat_new.get(k)]
        raise EvidenceError(f"{args.json_out} was written with other settings ({'; '.join(changed)}); "
                            "use another --json-out and --out, or move them away to start over")

    target = get_target(args.target, args.latency_threads)
    latency = source_latency_model(source, target)
    lo, hi = latency.block_range_ms(space, True), latency.block_range_ms(space, False)
    budget = parse_latency(args.budget) if args.budget else state.get("budget_ms")
    if budget is None:
        budget = round(lo + BUDGET_FRACTION * (hi - lo), 3)
    if state.get("budget_ms") not in (None, budget):
        raise EvidenceError(f"{args.json_out} was made for budget {budget_label(state['budget_ms'])}, "
                            f"not {budget_label(budget)}")
    if state.get("range_ms") and [round(v, 3) for v in state["range_ms"]] != [round(lo, 3), round(hi, 3)]:
        console.print(f"[yellow]note: the latency model now spans {lo:.3f}-{hi:.3f} ms; the JSON recorded "
                      f"{state['range_ms'][0]:.3f}-{state['range_ms'][1]:.3f} ms (table re-measured?)[/yellow]")
    if not state:
        state = {"about": "bench/evidence_cifar.py: evolutionary against random search on one supernet",
                 "settings": settings, "budget_ms": budget,
                 "budget_rule": "--budget" if args.budget else f"lo + {BUDGET_FRACTION} x (hi - lo), 3 decimals",
                 "range_ms": [lo, hi], "latency_key": latency.key,
                 "latency_report": asdict(latency.report) if latency.report else None}
        atomic_write_json(args.json_out, state)
    console.print(f"space {space.name} spans {lo:.3f}-{hi:.3f} ms on {args.target} (predicted); "
                  f"budget {budget_label(budget)}; steps {','.join(args.steps)}")

    evidence = Evidence(args, state, source, space, num_classes, target, latency, budget, state["range_ms"][0], cfg)
    for name in args.steps:
        evidence.run(name)
    print_table(state)


if __name__ == "__main__":
    try:
        main()
    except GlitError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(2)
