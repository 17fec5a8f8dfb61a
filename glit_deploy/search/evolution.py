"""The paper's two-level evolutionary search, constrained by latency measured on the target.

Level 1 searches the global/local split of every block with the details at middle values; level 2
fixes the best split and searches the details. Both levels evolve a population (SPOS/AutoFormer
style: the top parents survive, children come from mutation and crossover). Fitness is the
validation top-1 of the inherited-weight subnet after BatchNorm recalibration. Candidates over the
budget by the latency model are never evaluated, and an arch seen before reuses its score (never
re-drawn). The state is written atomically after every generation so that `--resume` continues
exactly.

Bookkeeping that cannot mix results: every budget keeps its own pool of the candidates it
considered, with the weights each was scored under. A budget's winner is chosen from its own pool,
among the candidates scored with the weights of its last level (level 2 may fine-tune the
supernet), taken in order of accuracy, measured end to end on the target
(`glit_deploy.latency.measure`), and accepted only when the 95 % upper bound of the budgeted
statistic is within the budget less the latency margin (`glit_deploy.latency.budget.candidate_verdict`);
one that is not is recorded as rejected and the next is measured. When all of the most accurate
are rejected (the table reads low on the host today), a second pass measures the candidates that the
table corrected by the clock's ratio to it puts within the limit (`table_corrected_candidates`).
A candidate the latency table predicts within the budget but the clock reads over it is timed
again after a pause first (`glit_deploy.latency.budget.timed_candidate`, as the export does).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from glit_deploy import distributed
from glit_deploy.atomic_io import atomic_write_json
from glit_deploy.errors import GlitError, RunError
from glit_deploy.latency.budget import (
    Budget,
    candidate_verdict,
    latency_record,
    pick_by_measurement,
    timed_candidate,
)
from glit_deploy.latency.measure import Timing
from glit_deploy.latency.table import LatencyModel
from glit_deploy.nn.counting import arch_cost
from glit_deploy.rundir import RunDir
from glit_deploy.search.fitness import FinetuneConfig, finetuned_winner_by_measurement, reranked_by_finetuning
from glit_deploy.space import Arch, SearchSpace

console = Console(stderr=True)
STATE_VERSION = 2  # 2: budgets with a statistic, per-budget pools, measurements with intervals


@dataclass
class SearchConfig:
    population: int = 50
    generations: int = 20
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.15
    seed: int = 0
    max_params: int | None = None
    max_macs: int | None = None
    calib_batches: int = 8
    batch_size: int = 256
    winner_candidates: int = 10
    max_tries: int = 500
    fixed_split: list[int] | None = None  # skip level 1 and search the details of this split
    # A winner's upper bound must be this much under the budget, so that the deployed file, measured
    # again at export, still fits it: sessions timed side by side agree within 2.5 %, but one host's
    # timings minutes apart drift by up to 15 % under other load (BENCHMARKS section 8).
    latency_margin: float = 0.03
    # Under an int8 target: how many of a budget's most accurate candidates (float32 fitness) are also
    # scored quantized before the winner is chosen; they are then taken in order of int8 accuracy.
    # The winner is always quantized and scored, whatever this is.
    quant_eval: int = 0
    # How many of a budget's most accurate candidates that measure within it are fine-tuned from their
    # inherited weights for `finetune_steps` steps, the best fine-tuned winning (`search.fitness`):
    # inherited top-1 orders near-tied archs by chance (BENCHMARKS section 12). 0: inherited top-1 alone.
    finetune_top: int = 0
    finetune_steps: int = 400
    # With finetune_top: the fine-tuned candidates must differ in at least this many genes from each other
    # (`finetuned_winner_by_measurement`), so that they are not one arch and its mutants. 0: the most accurate.
    finetune_spread: int = 0
    # How many of a budget's most accurate level-1 candidates (one split each) are fine-tuned like
    # `finetune_top`'s before level 1 ends; the best fine-tuned gives level 2 its split. Level 2 searches
    # one split only, so a split the inherited score overrates caps the whole search (section 12, batch 5).
    # 0: the split of the most accurate level-1 candidate.
    finetune_splits: int = 0
    # How many of level 1's best splits level 2 searches (their details, each split's level-1 candidate a
    # seed): level 2 of one split hands the winner rule one arch and its mutants, while random search's
    # draws span as many splits as evaluations (section 12, batch 6). The splits are level 1's most
    # accurate distinct ones, the best fine-tuned first under `finetune_splits`. 1: the paper's one split.
    level2_splits: int = 1

    def __post_init__(self) -> None:
        if self.finetune_top and self.quant_eval:
            raise GlitError("--finetune-top and --quant-eval both reorder the most accurate candidates before "
                            "they are measured: use one of them")
        if self.finetune_splits and self.fixed_split is not None:
            raise GlitError("--finetune-splits chooses level 1's split by fine-tuning; --fixed-split skips level 1: "
                            "use one of them")
        if self.level2_splits < 1:
            raise GlitError(f"--level2-splits must be at least 1, not {self.level2_splits}")
        if self.level2_splits > 1 and self.fixed_split is not None:
            raise GlitError("--level2-splits searches several of level 1's splits; --fixed-split skips level 1: "
                            "use one of them")

    def finetune_config(self) -> FinetuneConfig:
        """How `finetune_top` fine-tunes each candidate: `finetune_steps` steps, the search's seed."""
        return FinetuneConfig(steps=self.finetune_steps, seed=self.seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


Evaluator = Callable[[list[Arch]], list[float]]
Measurer = Callable[[Arch], Timing]
QuantScorer = Callable[[Arch, str], float]  # int8 top-1 of an arch under the named weights
FinetuneScorer = Callable[[Arch, str], float]  # top-1 of an arch fine-tuned from the named weights


class EvolutionarySearch:
    """Runs the search for one or more budgets; every step is saved in `search/state.json`."""

    def __init__(self, run: RunDir, space: SearchSpace, num_classes: int, latency: LatencyModel,
                 budgets: Sequence[Budget], cfg: SearchConfig, evaluate: Evaluator, measure: Measurer,
                 ctx: distributed.DistContext | None = None, weights_tag: Callable[[int], str] | None = None,
                 before_level2: Callable[[tuple[int, ...]], None] | None = None,
                 quantized: QuantScorer | None = None, finetuned: FinetuneScorer | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.run, self.space, self.num_classes = run, space, num_classes
        self.latency, self.cfg = latency, cfg
        self.budgets = sorted(set(budgets))
        self.evaluate_fn, self.measure_fn = evaluate, measure
        self.ctx = ctx or distributed.DistContext(0, 1, 0, torch.device("cpu"))
        self.weights_tag = weights_tag or (lambda level: "supernet")
        self.before_level2 = before_level2
        self.quantized_fn = quantized  # None: the target deploys float32
        self.finetuned_fn = finetuned  # None: no candidate is fine-tuned (finetune_top is then ignored)
        self.sleep = sleep  # the pause before a contradicted candidate is timed again
        self.dir = run.path / "search"
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = {}
        self.rng = random.Random(cfg.seed)
        self.cache_hits = 0

    # constraints -------------------------------------------------------------------------------
    def check_budgets(self) -> None:
        """Fail at once, with the range the space spans, when a budget cannot be met."""
        lo = self.latency.block_range_ms(self.space, fastest=True)
        hi = self.latency.block_range_ms(self.space, fastest=False)
        for budget in self.budgets:
            if budget.limit_ms(self.cfg.latency_margin) < lo:
                raise GlitError(
                    f"latency budget {budget} (less the {100 * self.cfg.latency_margin:g} % margin, "
                    f"{budget.limit_ms(self.cfg.latency_margin):.4f} ms) is below the fastest arch of space "
                    f"'{self.space.name}' on {self.latency.key['target']} at batch {self.latency.key['batch_size']}: "
                    f"the space spans {lo:.3f} ms .. {hi:.3f} ms (predicted)")
        if self.cfg.max_params is not None or self.cfg.max_macs is not None:
            from glit_deploy.nn.counting import extreme_arch

            small = [self.latency.fastest_arch(self.space), extreme_arch(self.space, largest=False)]
            if not any(self.feasible(a, max(self.budgets)) for a in small):
                cost = arch_cost(self.space, small[1], self.num_classes)
                raise GlitError(f"the parameter/multiply-add limits exclude even the smallest arch of the space "
                                f"({cost.params:,} parameters, {cost.macs:,} multiply-adds)")

    def feasible(self, arch: Arch, budget: Budget) -> bool:
        """Within the limits, and predicted within the budget less the margin (the table predicts medians;
        every percentile is at least the median). The margin is room the winner's measurement must keep:
        an arch the table puts past it is measured over it unless the clock reads below the table, so a
        search that explored up to the budget itself spent a large margin on archs that could not win."""
        if self.latency.predict_ms(arch) > budget.limit_ms(self.cfg.latency_margin):
            return False
        if self.cfg.max_params is None and self.cfg.max_macs is None:
            return True
        cost = arch_cost(self.space, arch, self.num_classes)
        return (self.cfg.max_params is None or cost.params <= self.cfg.max_params) and \
            (self.cfg.max_macs is None or cost.macs <= self.cfg.max_macs)

    def level1_arch(self, split: tuple[int, ...], budget: Budget) -> Arch | None:
        """A split's level-1 candidate: middle details, or its fastest details if those are over budget."""
        arch = self.space.with_split(split)
        if self.feasible(arch, budget):
            return arch
        fastest = self.latency.fastest_arch(self.space, split)
        return fastest if self.feasible(fastest, budget) else None

    # population ------------------------------------------------------------------------------
    def _new_candidates(self, make: Callable[[], Arch | None], count: int, budget: Budget,
                        taken: set[str], tag: str) -> list[Arch]:
        """Up to `count` new feasible archs that this budget has not considered under these weights
        (an arch scored for another budget comes back with its score, never re-drawn)."""
        pool = self._pool(budget)
        out: list[Arch] = []
        tries = 0
        while len(out) < count and tries < self.cfg.max_tries:
            tries += 1
            arch = make()
            if arch is None or arch.digest in taken or self._cache_key(arch, tag) in pool \
                    or not self.feasible(arch, budget):
                continue
            taken.add(arch.digest)
            out.append(arch)
        return out

    def _pool(self, budget: Budget) -> dict[str, int]:
        """This budget's candidates: cache key -> level it was considered at."""
        return self.state.setdefault("pools", {}).setdefault(budget.label, {})

    def initial_population(self, level: int, budget: Budget, splits: Sequence[tuple[int, ...]] | None,
                           seed: list[Arch] | None = None) -> list[Arch]:
        """The feasible `seed` archs (see `_seeds`) first, then random feasible archs: at level 2 of the
        given `splits` (the split of each drawn at random; None: any split)."""
        space, rng = self.space, self.rng
        if level == 1:
            def make() -> Arch | None:
                return self.level1_arch(tuple(rng.choice(space.global_heads) for _ in range(space.depth)), budget)
        else:
            def make() -> Arch | None:
                # one split draws no split (the random stream stays the paper's one-split search's)
                split = None if not splits else splits[0] if len(splits) == 1 else rng.choice(splits)
                return space.sample(rng, split=split)
        tag = self.weights_tag(level)
        taken: set[str] = set()
        # The seed enters even when this budget considered it before (at level 1 with the same weights):
        # level 2 starts from level 1's best, with its score reused.
        first = [a for a in seed or [] if self.feasible(a, budget)]
        taken.update(a.digest for a in first)
        return first + self._new_candidates(make, self.cfg.population - len(first), budget, taken, tag)

    def children(self, level: int, budget: Budget, parents: list[Arch]) -> list[Arch]:
        space, rng, prob = self.space, self.rng, self.cfg.mutation_prob
        taken = {p.digest for p in parents}
        tag = self.weights_tag(level)

        def mutate() -> Arch | None:
            parent = rng.choice(parents)
            if level == 1:
                return self.level1_arch(space.mutate(parent, rng, prob, level="split").split, budget)
            return space.mutate(parent, rng, prob, level="details")

        # Level 2 crosses the details of parents of one split: a block-wise crossover of two splits would be
        # a split level 1 never chose. (With one split every pair qualifies, drawn as before.)
        mixed = level == 2 and len({p.split for p in parents}) > 1
        pairs = [(a, b) for i, a in enumerate(parents) for b in parents[i + 1:] if a.split == b.split]

        def cross() -> Arch | None:
            if len(parents) < 2 or (mixed and not pairs):
                return None
            a, b = rng.choice(pairs) if mixed else rng.sample(parents, 2)
            child = space.crossover(a, b, rng)
            return self.level1_arch(child.split, budget) if level == 1 else child

        kids = self._new_candidates(mutate, self.cfg.mutations, budget, taken, tag)
        crossed = self._new_candidates(cross, self.cfg.crossovers, budget, taken, tag)
        kids += crossed
        if mixed and len(crossed) < self.cfg.crossovers:
            # Parents whose splits have no partner cannot be crossed: mutations take the crossovers' place,
            # so that a generation makes as many candidates as with one split.
            kids += self._new_candidates(mutate, self.cfg.crossovers - len(crossed), budget, taken, tag)
        return kids

    # evaluation ------------------------------------------------------------------------------
    @staticmethod
    def _cache_key(arch: Arch, tag: str) -> str:
        return f"{tag}:{arch.digest}"

    def evaluate(self, archs: list[Arch], level: int, budget: Budget) -> list[float]:
        """Scores of `archs` under the level's weights: reused when known, evaluated otherwise."""
        tag = self.weights_tag(level)
        evaluations = self.state["evaluations"]
        pool = self._pool(budget)
        for arch in archs:
            pool.setdefault(self._cache_key(arch, tag), level)
        todo = [a for a in archs if self._cache_key(a, tag) not in evaluations]
        self.cache_hits += len(archs) - len(todo)
        if todo:
            for arch, top1 in zip(todo, self.evaluate_fn(todo), strict=True):
                cost = arch_cost(self.space, arch, self.num_classes)
                evaluations[self._cache_key(arch, tag)] = {
                    "arch": arch.to_dict(), "top1": top1, "predicted_ms": self.latency.predict_ms(arch),
                    "params": cost.params, "macs": cost.macs, "weights": tag, "level": level}
        self.state["evaluated"] += len(todo)
        return [evaluations[self._cache_key(a, tag)]["top1"] for a in archs]

    # state -----------------------------------------------------------------------------------
    def _fresh_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": asdict(self.cfg), "budgets": [b.label for b in self.budgets],
                "latency_key": self.latency.key, "space_digest": self.space.digest,
                "evaluations": {}, "pools": {}, "measured": {}, "history": [], "results": {}, "evaluated": 0,
                "cache_hits": 0,
                "cursor": {"budget": 0, "level": 1 if self.cfg.fixed_split is None else 2, "generation": 0},
                "population": None, "parents": [], "split": self.cfg.fixed_split, "done": False, "seconds": 0.0}

    def _save(self) -> None:
        self.state["rng"] = _rng_to_json(self.rng.getstate())
        self.state["cache_hits"] = self.cache_hits
        if self.ctx.is_main:
            atomic_write_json(self.state_path, self.state)

    def load_or_start(self, resume: bool) -> None:
        """Rank 0 reads or starts the state and every rank takes that: ranks never race on the file."""
        self.state = distributed.decided_on_main(self.ctx, lambda: self._read_state(resume))
        if self.state.get("rng") is not None:
            self.cfg = SearchConfig.from_dict(self.state["config"])
            self.rng.setstate(_rng_from_json(self.state["rng"]))
            self.cache_hits = self.state.get("cache_hits", 0)

    def _read_state(self, resume: bool) -> dict[str, Any]:
        if not self.state_path.exists():
            return self._fresh_state()
        if not resume:
            raise RunError(f"{self.dir} already holds a search; pass --resume to continue it, or move it away")
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunError(f"{self.state_path} is corrupt ({exc.msg})") from None
        if state.get("version") != STATE_VERSION:
            raise RunError(f"{self.state_path} was written by another version of glit's search; start a new search "
                           "in another run directory")
        given = {"budgets": [b.label for b in self.budgets], "space": self.space.digest, **asdict(self.cfg)}
        # A setting added since the state was written reads as its default there.
        defaults = {f.name: f.default for f in fields(SearchConfig)}
        stored = {"budgets": state.get("budgets"), "space": state.get("space_digest"),
                  **defaults, **state.get("config", {})}
        changed = [f"{k} {stored.get(k)} -> {v}" for k, v in given.items() if stored.get(k) != v]
        if changed:
            raise RunError(f"{self.state_path} is a search with other settings ({'; '.join(changed)}): resume it "
                           "with the settings it started with, or start a new search in another run directory")
        if state.get("latency_key") != self.latency.key:
            raise RunError(f"{self.state_path} was searched with another latency table (target, device, "
                           "batch size or protocol changed)")
        return state

    # the search ------------------------------------------------------------------------------
    def run_search(self, resume: bool = False) -> dict[str, Any]:
        if self.cfg.fixed_split is not None:
            self.space.validate(self.space.with_split(self.cfg.fixed_split), source="--fixed-split")
        self.check_budgets()
        self.load_or_start(resume)
        started = time.perf_counter() - self.state.get("seconds", 0.0)
        cursor = self.state["cursor"]
        with _progress(self.ctx.is_main) as progress:
            task = progress.add_task("search", total=len(self.budgets) * self._levels() * self.cfg.generations,
                                     completed=self._steps_done(cursor), info="")
            while not self.state["done"]:
                budget = self.budgets[cursor["budget"]]
                level = cursor["level"]
                if self.state["population"] is None:
                    split = tuple(self.state["split"]) if self.state["split"] else None
                    if level == 2 and self.before_level2 is not None:
                        self.before_level2(split)
                    population = self.initial_population(level, budget, self._level2_splits(), self._seeds(level))
                    if not population:
                        raise GlitError(f"no arch of the space fits {budget} with the given limits")
                    self.state["population"] = [a.to_dict() for a in population]
                    self.state["parents"] = []
                    self._save()
                self._generation(budget, level, cursor)
                self.state["seconds"] = time.perf_counter() - started
                best = self.state["parents"][0] if self.state["parents"] else None
                info = ""
                if best:
                    info = (f"{budget.label} L{level} best {best['top1']:.2f}% at {best['predicted_ms']:.3f} ms"
                            f" | evals {self.state['evaluated']} cache hits {self.cache_hits}")
                progress.update(task, completed=self._steps_done(cursor), info=info)
                self._save()
        return self.finish()

    def _seeds(self, level: int) -> list[Arch]:
        """What a population starts from besides random archs: entering level 2, level 1's best; at the
        start of a budget, the earlier budgets' winners (and their level-1 bests), so that a looser
        budget always considers what a tighter one found (their scores are reused, not re-drawn)."""
        if level == 2 and self.state.get("level1_best"):
            best = Arch.from_dict(self.state["level1_best"])
            return [best, *(Arch.from_dict(a) for a in self.state.get("level1_others", []))]
        found = [r["arch"] for r in self.state["results"].values() if r.get("digest")]
        if level == 1:
            found += [entry["arch"] for entry in self.state.get("level1", {}).values()]
        seeds = {a.digest: a for a in map(Arch.from_dict, found)
                 if level == 1 or list(a.split) == list(self.cfg.fixed_split or a.split)}
        return list(seeds.values())

    def _levels(self) -> int:
        return 1 if self.cfg.fixed_split is not None else 2

    def _steps_done(self, cursor: dict[str, int]) -> int:
        """Generations done, for the progress bar (a fixed split runs level 2 only)."""
        levels_done = cursor["level"] - 1 if self._levels() == 2 else 0
        return (cursor["budget"] * self._levels() + levels_done) * self.cfg.generations + cursor["generation"]

    def _generation(self, budget: Budget, level: int, cursor: dict[str, int]) -> None:
        population = [Arch.from_dict(a) for a in self.state["population"]]
        scores = self.evaluate(population, level, budget)
        tag = self.weights_tag(level)
        for arch, top1 in zip(population, scores, strict=True):
            self.state["history"].append({
                "budget": budget.label, "level": level, "generation": cursor["generation"], "digest": arch.digest,
                "top1": top1, "predicted_ms": self.latency.predict_ms(arch), "split": list(arch.split),
                "weights": tag})
        pool = {p["digest"]: p for p in self.state["parents"]}
        for arch in population:
            entry = self.state["evaluations"][self._cache_key(arch, tag)]
            pool[arch.digest] = {"digest": arch.digest, **entry}
        ranked = sorted(pool.values(), key=lambda p: (-p["top1"], p["predicted_ms"], p["digest"]))
        self.state["parents"] = ranked[: self.cfg.parents]
        cursor["generation"] += 1
        if cursor["generation"] < self.cfg.generations:
            parents = [Arch.from_dict(p["arch"]) for p in self.state["parents"]]
            kids = self.children(level, budget, parents)
            # An exhausted neighbourhood still keeps the population alive with fresh samples.
            if not kids:
                kids = self.initial_population(level, budget, self._level2_splits())
            self.state["population"] = [a.to_dict() for a in kids]
            if not kids:
                cursor["generation"] = self.cfg.generations
        if cursor["generation"] >= self.cfg.generations:
            self._end_level(budget, level, cursor)

    def _end_level(self, budget: Budget, level: int, cursor: dict[str, int]) -> None:
        best = self.state["parents"][0]
        if level == 1:
            chosen = self._level1_choice(budget, best)
            best = chosen[0]
            self.state["split"] = list(Arch.from_dict(best["arch"]).split)
            self.state["level1_best"] = best["arch"]
            self.state["level1_others"] = [e["arch"] for e in chosen[1:]]
            self.state.setdefault("level1", {})[budget.label] = {
                "split": self.state["split"], "top1": best["top1"], "predicted_ms": best["predicted_ms"],
                "weights": best["weights"], "arch": best["arch"],
                **({"finetuned_top1": best["finetuned_top1"]} if "finetuned_top1" in best else {}),
                **({"splits": [list(Arch.from_dict(e["arch"]).split) for e in chosen]} if len(chosen) > 1 else {})}
            cursor.update(level=2, generation=0)
        else:
            self.state["results"][budget.label] = self._pick_winner(budget, self.weights_tag(level))
            self.state["split"] = self.cfg.fixed_split
            self.state["level1_best"] = None
            self.state["level1_others"] = []
            cursor.update(budget=cursor["budget"] + 1, level=1 if self.cfg.fixed_split is None else 2, generation=0)
            if cursor["budget"] >= len(self.budgets):
                self.state["done"] = True
        self.state["population"] = None
        self.state["parents"] = []

    def candidates(self, budget: Budget, weights: str) -> list[dict[str, Any]]:
        """The budget's own candidates scored with `weights`, most accurate first: the winner's pool."""
        evaluations = self.state["evaluations"]
        entries = [{"digest": key.split(":", 1)[1], **evaluations[key]} for key in self._pool(budget)
                   if key.startswith(f"{weights}:") and key in evaluations]
        return sorted((e for e in entries if self.feasible(Arch.from_dict(e["arch"]), budget)),
                      key=lambda e: (-e["top1"], e["predicted_ms"], e["digest"]))

    def _pick_winner(self, budget: Budget, weights: str) -> dict[str, Any]:
        """The most accurate candidate of this budget whose measurement meets the budget.

        Candidates are measured in order of accuracy (a measurement is kept per arch and reused);
        the first whose budgeted statistic's upper bound is within the budget, less the margin, wins.
        When all of the `winner_candidates` most accurate are rejected, the rest of the pool is taken
        in the same order, limited to those the latency table, corrected by the clock's ratio to it
        over the rejected, puts within the limit (`table_corrected_candidates`).
        """
        rejected: list[dict[str, Any]] = []
        first = self._winner_order(budget, weights)
        limit_ms = budget.limit_ms(self.cfg.latency_margin)
        tried = {e["digest"] for e in first}
        remaining = [e for e in self.candidates(budget, weights) if e["digest"] not in tried]
        finetuning = bool(self.cfg.finetune_top) and self.finetuned_fn is not None

        def announce(ratio: float, candidates: int) -> None:
            if self.ctx.is_main:
                console.print(f"{budget}: all {len(rejected)} most accurate candidates measured over {limit_ms:.4f} "
                              f"ms; the clock read {ratio:.3f}x the latency table's predictions for them. Measuring "
                              f"the {candidates} most accurate of the other {len(remaining)} that the table, "
                              f"multiplied by {ratio:.3f}, puts within the limit")

        def attempt(entry: dict[str, Any]) -> dict[str, Any] | None:
            return self._try_candidate(entry, budget, weights, rejected)

        if finetuning:
            winner, second_pass = finetuned_winner_by_measurement(
                first, remaining, attempt, rejected, limit_ms, self.cfg.winner_candidates, self.cfg.finetune_top,
                lambda e: self._finetuned_top1(Arch.from_dict(e["arch"]), weights), self.cfg.finetune_spread,
                announce)
        else:
            winner, second_pass = pick_by_measurement(first, remaining, attempt, rejected, limit_ms,
                                                      self.cfg.winner_candidates, announce)
        if winner is not None:
            return winner
        return {"budget_ms": budget.ms, "budget": budget.label, "stat": budget.stat, "digest": None,
                "rejected_over_budget": rejected, **({"second_pass": second_pass} if second_pass else {}),
                "error": f"none of the {len(rejected)} candidates measured (the most accurate, then those the "
                         f"latency table corrected by the clock put within the limit) was within {budget} less "
                         f"the {100 * self.cfg.latency_margin:g} % margin"}

    def _try_candidate(self, entry: dict[str, Any], budget: Budget, weights: str,
                       rejected: list[dict[str, Any]]) -> dict[str, Any] | None:
        """`entry`'s winner record when its measurement meets the budget less the margin; otherwise None,
        and `entry` is added to `rejected`."""
        arch = Arch.from_dict(entry["arch"])
        attempts, timing = self._measured(arch, budget)
        verdict = candidate_verdict(timing, budget, self.cfg.latency_margin)
        if len(attempts) > 1:
            verdict["attempts"] = [latency_record(t, budget) for t in attempts]
        if not verdict["within_budget"]:
            rejected.append({"digest": arch.digest, "top1": entry["top1"], "predicted_ms": entry["predicted_ms"],
                             "measured_ms": timing.median_ms, **verdict})
            return None
        if self.quantized_fn is not None:
            entry = {**entry, "int8_top1": self._int8_top1(arch, weights)}
        return {**entry, "measured_ms": timing.median_ms, "budget_ms": budget.ms, "budget": budget.label,
                "stat": budget.stat, "latency": {**latency_record(timing, budget), **verdict,
                                                 "margin": self.cfg.latency_margin},
                "rejected_over_budget": rejected}

    def _measured(self, arch: Arch, budget: Budget) -> tuple[list[Timing], Timing]:
        """Every timing of `arch` behind the winner decision and the one that decides, kept in the state: an
        arch is measured (and re-timed, when contradicted) once, under the first budget that asks, and reused
        by the others.

        A median over the limit while the latency table predicts the arch within it is a contradiction
        between two readings of one graph, as a change in the host's load makes; the arch is then timed
        again after a pause (`timed_candidate`), and the rounds of all its timings together decide.
        """
        measured = self.state.setdefault("measured", {})
        retimed = self.state.setdefault("measured_attempts", {})
        if arch.digest not in measured:
            predicted_ms = self.latency.predict_ms(arch)
            limit_ms = budget.limit_ms(self.cfg.latency_margin)

            def before_retime(timing: Timing, pause_s: float) -> None:
                if self.ctx.is_main:
                    console.print(f"candidate {arch.digest[:8]} measured {budget.bound_ms(timing):.4f} ms (95 % "
                                  f"bound), over {limit_ms:.4f} ms ({budget} less the margin), which the latency "
                                  f"table predicts it within ({predicted_ms:.4f} ms); timing it again in "
                                  f"{pause_s:g} s, in case the host's load changed")

            attempts, decided = timed_candidate(lambda: self.measure_fn(arch), predicted_ms, budget,
                                                self.cfg.latency_margin, before_retime, self.sleep)
            measured[arch.digest] = decided.to_dict()
            if len(attempts) > 1:
                retimed[arch.digest] = [t.to_dict() for t in attempts]
            self._save()
        decided = Timing.from_dict(measured[arch.digest])
        return [Timing.from_dict(t) for t in retimed.get(arch.digest, [measured[arch.digest]])], decided

    def _level1_choice(self, budget: Budget, best: dict[str, Any]) -> list[dict[str, Any]]:
        """The level-1 candidates whose splits level 2 searches, the first of them the split that leads:
        `level2_splits` of level 1's most accurate candidates of distinct splits (`best`, the most accurate,
        first), or under `finetune_splits` K the K most accurate of them fine-tuned and put first by that
        score (`reranked_by_finetuning`; each score is kept, as the winner's fine-tunes are)."""
        weights = self.weights_tag(1)
        level1 = {key for key, level in self._pool(budget).items() if level == 1}
        by_split: dict[tuple[int, ...], dict[str, Any]] = {}
        for entry in self.candidates(budget, weights):  # most accurate first
            if f"{weights}:{entry['digest']}" in level1:
                by_split.setdefault(Arch.from_dict(entry["arch"]).split, entry)
        ranked = list(by_split.values())
        if self.cfg.finetune_splits and self.finetuned_fn is not None:
            ranked = reranked_by_finetuning(ranked, self.cfg.finetune_splits,
                                            lambda e: self._finetuned_top1(Arch.from_dict(e["arch"]), weights))
        elif ranked and ranked[0]["digest"] != best["digest"]:  # level 1's parents are its most accurate
            ranked = [best, *(e for e in ranked if e["digest"] != best["digest"])]
        return ranked[: self.cfg.level2_splits] or [best]

    def _level2_splits(self) -> list[tuple[int, ...]] | None:
        """The splits level 2 draws its archs from: the leading split and, under `level2_splits`, the others
        level 1 chose (None before level 1 has chosen, or with no split at all)."""
        if not self.state["split"]:
            return None
        others = [tuple(Arch.from_dict(a).split) for a in self.state.get("level1_others", [])]
        return [tuple(self.state["split"]), *others]

    def _winner_order(self, budget: Budget, weights: str) -> list[dict[str, Any]]:
        """The candidates in the order they are measured: by float32 fitness, except that under
        `quant_eval` K the K most accurate are scored quantized and lead, by int8 accuracy. (Under
        `finetune_top` they are measured in this order too, and fine-tuned once they meet the budget:
        `finetuned_winner_by_measurement`.)"""
        candidates = self.candidates(budget, weights)
        pool = candidates[: self.cfg.winner_candidates]
        k = min(self.cfg.quant_eval, len(pool)) if self.quantized_fn is not None else 0
        if k == 0:
            return pool
        head = [{**e, "int8_top1": self._int8_top1(Arch.from_dict(e["arch"]), weights)} for e in pool[:k]]
        head.sort(key=lambda e: (-e["int8_top1"], -e["top1"], e["digest"]))
        return head + pool[k:]

    def _finetuned_top1(self, arch: Arch, weights: str) -> float:
        """The top-1 of an arch fine-tuned from `weights`, kept in the state (a resumed search does not
        fine-tune a candidate again)."""
        assert self.finetuned_fn is not None
        return self._kept_score("finetuned", arch, weights, self.finetuned_fn,
                                f"fine-tuning candidate {arch.digest[:8]} for {self.cfg.finetune_steps} steps "
                                f"from the {weights} weights")

    def _int8_top1(self, arch: Arch, weights: str) -> float:
        """The int8 accuracy of an arch under `weights`, scored once and kept in the state."""
        assert self.quantized_fn is not None
        return self._kept_score("quantized", arch, weights, self.quantized_fn)

    def _kept_score(self, kind: str, arch: Arch, weights: str, score: Callable[[Arch, str], float],
                    announce: str = "") -> float:
        """A second score of an arch (`kind`: quantized, finetuned), computed once and saved in the state
        at once, so that a resumed search reads it instead of computing it again."""
        scores = self.state.setdefault(kind, {})
        key = self._cache_key(arch, weights)
        if key not in scores:
            if announce and self.ctx.is_main:
                console.print(announce)
            scores[key] = score(arch, weights)
            self._save()
        return scores[key]

    # outputs ---------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        from glit_deploy.search.pareto import pareto_front, plot_pareto

        summary = {"space": self.space.name, "target": self.latency.key["target"],
                   "precision": self.latency.key.get("precision", "fp32"),
                   "batch_size": self.latency.key["batch_size"], "budgets": self.state["results"],
                   "level1": self.state.get("level1", {}), "evaluated": self.state["evaluated"],
                   "cache_hits": self.cache_hits, "seconds": self.state["seconds"],
                   "config": self.state["config"]}
        if self.ctx.is_main:
            points = [{"digest": k.split(":", 1)[1], **v} for k, v in self.state["evaluations"].items()]
            front = pareto_front(points)
            atomic_write_json(self.dir / "pareto.json", {"front": front, "points": len(points)})
            plot_pareto(points, front, self.state["results"], self.dir / "pareto.png")
            atomic_write_json(self.dir / "history.json", self.state["history"])
            for label, result in self.state["results"].items():
                if result.get("digest"):
                    Arch.from_dict(result["arch"]).save(self.dir / f"best-{label}.json", space=self.space.name,
                                                        **{k: v for k, v in result.items() if k != "arch"})
            atomic_write_json(self.dir / "summary.json", summary)
        return summary




def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, disable=not enabled)


def _rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def load_summary(run: RunDir) -> dict[str, Any]:
    path = run.path / "search" / "summary.json"
    if not path.exists():
        raise RunError(f"{run.path} has no finished search (no search/summary.json)")
    return json.loads(Path(path).read_text())
