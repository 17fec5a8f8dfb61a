"""Evidence, batch 2 (the retraining part): the archs batch 1 found, retrained from scratch with several seeds.

Batch 1 (`bench/evidence_cifar.py`) scored archs on one `cifar` supernet with inherited weights and wrote
them into one JSON. This batch retrains them as standalone models with the same recipe as
`bench/cifar_pipeline.py` (`glit_deploy.retrain.retrain`, the code behind `glit retrain --init scratch`:
AdamW lr 1e-3, batch 128, warm-up min(5, max(E // 5, 1)) epochs then cosine, the DeiT augmentations, EMA)
and publishes each one as an ONNX file. The jobs, each (role, name, arch, seed):

    evolution       the evolutionary search's winner             seeds 0, 1, 2   evolution-s0 ..
    random-search   the random search's winner (same N evals)     seeds 0, 1, 2   random-search-s0 ..
    all-global      the best all-global (DeiT-like) arch          seeds 0, 1, 2   all-global-s0 ..
    random          each of the 3 unranked random archs           seed 0          random-1-s0 ..
    ranking         each arch of the ranking set, short schedule  seed 0          ranking-01-s0 ..

(`--epochs`, default 10, for every role but ranking, which gets `--ranking-epochs`, default 5.) Each job
trains in its own run directory, OUT/retrain-runs/NAME, which holds a copy of the supernet run's run.json
and nothing else (from scratch, no supernet weights are needed), under the label NAME. It resumes from its
last finished epoch when rerun. A finished job is exported with `export_run_onnx` (the code behind
`glit export --format onnx`: BatchNorm folding, onnx full check, parity with PyTorch on 1,024 validation
images, the file timed on the run's target), and the exported file is copied to MODELS/NAME.onnx (not
when over 5 MB), timed again independently there (ort-cpu, 1 thread, batch 1) and described in
MODELS/NAME.json. A job whose NAME.json exists is done and skipped, so every command below can be rerun
after an interruption. A job directory holding another arch or another recipe is refused, not mixed.

Each job holds a lock while it runs (OUT/retrain-runs/.NAME.lock); a process finding a job locked skips it,
so processes side by side never train the same job, even with overlapping filters.

    # the job table with each job's status (not started / epoch k of E / trained / done)
    nice -n 15 /work/main/.venv/bin/python bench/evidence_retrain.py --list
    # everything, one process (rerun the same command after an interruption)
    nice -n 15 /work/main/.venv/bin/python bench/evidence_retrain.py --threads 2
    # or two processes side by side on 2 cores, one thread each, disjoint jobs
    nice -n 15 /work/main/.venv/bin/python bench/evidence_retrain.py --roles evolution,random-search,random \\
        --threads 1 > /work/evidence/retrain-a.log 2>&1 &
    nice -n 15 /work/main/.venv/bin/python bench/evidence_retrain.py --roles all-global,ranking \\
        --threads 1 > /work/evidence/retrain-b.log 2>&1 &
    wait
    # single jobs
    nice -n 15 /work/main/.venv/bin/python bench/evidence_retrain.py --jobs evolution-s1,all-global-s1 --threads 1
    # as many jobs as are expected to finish by 09:55 (a job still training when a working session ends
    # loses its checkpoints with the machine): each job's time is estimated from the epochs already
    # published or trained by its role, and a job that would end later is not started
    nice -n 15 /work/main/.venv/bin/python bench/evidence_retrain.py --roles ranking --threads 1 --stop-by 09:55
    # the results: every model (bench/cnn_baseline.py's CNNs too), mean +- sd per role, the deltas,
    # Kendall's tau of the ranking set, and a plot of them
    nice -n 15 /work/main/.venv/bin/python bench/evidence_retrain.py --summary \\
        --json-out bench/evidence/cifar10-batch2.json --plot bench/evidence/cifar10-batch2.png

A small end-to-end check on the built-in digits space, on the JSON of batch 1's own digits check (its
docstring; about 50 s), then every job at 1 epoch, two processes side by side (2 min on 2 busy cores):

    nice -n 15 /work/main/.venv/bin/glit train-supernet --run /tmp/er2-digits --space digits --data digits \\
        --epochs 2 --threads 1
    GLIT_CACHE_DIR=/tmp/er-cache nice -n 15 /work/main/.venv/bin/python bench/evidence_cifar.py \\
        --supernet-run /tmp/er2-digits --budget 0.16ms --population 4 --generations 1 --parents 2 --children 2 \\
        --calib-batches 1 --out /tmp/er2-out --json-out /tmp/er2-out/evidence.json
    E="nice -n 15 /work/main/.venv/bin/python bench/evidence_retrain.py --batch1 /tmp/er2-out/evidence.json \\
        --supernet-run /tmp/er2-digits --out /tmp/er2-out --models-dir /tmp/er2-models --epochs 1 --ranking-epochs 1"
    $E --roles evolution,random-search,random --threads 1 > /tmp/er2-a.log 2>&1 &
    $E --roles all-global,ranking --threads 1 > /tmp/er2-b.log 2>&1 &
    wait; $E --summary --json-out /tmp/er2-out/summary.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from glit_deploy.atomic_io import atomic_write, atomic_write_json
from glit_deploy.errors import GlitError
from glit_deploy.export.onnx_export import OnnxOptions, export_run_onnx, sha256_file
from glit_deploy.latency.targets import get_target
from glit_deploy.nn.counting import arch_cost
from glit_deploy.retrain import RetrainConfig, load_metrics, retrain
from glit_deploy.rundir import RunDir
from glit_deploy.space import Arch, SearchSpace
from glit_deploy.trained import INFO_FILE, load_trained_info, retrain_dir

REPO = Path(__file__).resolve().parents[1]
ROLES = ("evolution", "random-search", "all-global", "random", "ranking")
# what --summary reports: this script's jobs, and the CNN baseline bench/cnn_baseline.py --train publishes beside them
REPORTED_ROLES = (*ROLES, "cnn")
WINNER_STEPS = {"evolution": "evolution", "random-search": "random", "all-global": "all-global"}  # role -> step
SEEDS = (0, 1, 2)
MAX_ONNX_BYTES = 5_000_000  # what the repository takes in bench/models
TIMING_TARGET, TIMING_THREADS, TIMING_BATCH = "ort-cpu", 1, 1
EXPORTED_BY = "glit export --format onnx (glit_deploy.export.onnx_export.export_run_onnx)"

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class RetrainEvidenceError(GlitError):
    """Inconsistent or missing inputs of this script (printed as one `error:` line, exit code 2)."""


@dataclass(frozen=True)
class Job:
    role: str
    name: str
    arch: Arch
    seed: int
    epochs: int
    source: str  # where batch 1 keeps the arch, e.g. "random.retrain_plan[2]"
    batch1: dict[str, Any] = field(default_factory=dict)  # batch 1's record of the arch (predicted_ms, bin, ...)


# batch 1 ----------------------------------------------------------------------------------------
def load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise RetrainEvidenceError(f"{path} does not exist ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RetrainEvidenceError(f"{path} is corrupt ({exc.msg})") from None


def inherited_scores(state: dict[str, Any]) -> dict[str, float]:
    """Batch 1's inherited-weight top-1 of every arch it scored, by digest (scoring is deterministic)."""
    scores: dict[str, float] = {}
    for name in WINNER_STEPS.values():
        winner = (state.get(name) or {}).get("winner") or {}
        if winner.get("digest") and winner.get("top1") is not None:
            scores[winner["digest"]] = winner["top1"]
    for name, keys in (("random", ("evaluations", "random_archs")), ("ranking", ("archs",))):
        for key in keys:
            for e in (state.get(name) or {}).get(key, []):
                if e.get("top1") is not None:
                    scores[e["digest"]] = e["top1"]
    return scores


def batch1_jobs(state: dict[str, Any], space: SearchSpace, epochs: int, ranking_epochs: int
                ) -> tuple[list[Job], list[str]]:
    """The jobs batch 1 makes possible so far, and a note for each part it does not have yet."""
    notes: list[str] = []
    keep = ("predicted_ms", "measured_ms", "params", "macs", "bin", "sampler")

    def arch_of(entry: dict[str, Any], source: str) -> Arch:
        return space.validate(Arch.from_dict(entry["arch"]), source=f"batch 1 {source}")

    winners: list[tuple[str, dict[str, Any]]] = []
    for role, step_name in WINNER_STEPS.items():
        step = state.get(step_name) or {}
        winner = step.get("winner") or {}
        if not step.get("done"):
            notes.append(f"{role}: batch 1 has not finished its '{step_name}' step yet")
        elif not winner.get("digest"):
            notes.append(f"{role}: batch 1's '{step_name}' step found no winner ({winner.get('error', 'no record')})")
        else:
            winners.append((role, winner))
    jobs = [Job(role, f"{role}-s{seed}", arch_of(w, f"{WINNER_STEPS[role]}.winner"), seed, epochs,
                f"{WINNER_STEPS[role]}.winner", {k: w[k] for k in keep if k in w})
            for seed in SEEDS for role, w in winners]

    plan = (state.get("random") or {}).get("retrain_plan", [])
    if not plan:
        notes.append("random: batch 1 has not drawn the random archs yet (its 'random' step)")
    for i, e in enumerate(plan, 1):
        source = f"random.retrain_plan[{i - 1}]"
        jobs.append(Job("random", f"random-{i}-s0", arch_of(e, source), 0, epochs, source,
                        {k: e[k] for k in keep if k in e}))
    plan = (state.get("ranking") or {}).get("plan", [])
    if not plan:
        notes.append("ranking: batch 1 has not drawn the ranking set yet (its 'ranking' step)")
    for i, e in enumerate(plan, 1):
        source = f"ranking.plan[{i - 1}]"
        jobs.append(Job("ranking", f"ranking-{i:02d}-s0", arch_of(e, source), 0, ranking_epochs, source,
                        {k: e[k] for k in keep if k in e}))
    return jobs, notes


def recipe(epochs: int, seed: int) -> RetrainConfig:
    """bench/cifar_pipeline.py's recipe."""
    return RetrainConfig(epochs=epochs, batch_size=128, lr=1e-3, init="scratch",
                         warmup_epochs=min(5, max(epochs // 5, 1)), seed=seed)


# job directories ---------------------------------------------------------------------------------
def runs_root(out: Path) -> Path:
    return out / "retrain-runs"


@contextlib.contextmanager
def job_lock(out: Path, name: str) -> Iterator[bool]:
    """Hold OUT/retrain-runs/.NAME.lock; yields False when another process holds it."""
    path = runs_root(out) / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def locked_elsewhere(out: Path, name: str) -> bool:
    if not (runs_root(out) / f".{name}.lock").exists():
        return False
    with job_lock(out, name) as held:
        return not held


def job_run(job: Job, out: Path, source: RunDir) -> RunDir:
    """OUT/retrain-runs/NAME with a copy of the supernet run's run.json (written once, atomically)."""
    run = RunDir(runs_root(out) / job.name)
    if run.exists():
        meta, src = run.load_meta(), source.load_meta()
        if meta.get("space") != src.get("space") or meta.get("data", {}).get("spec") != src["data"].get("spec"):
            raise RetrainEvidenceError(f"{run.path} was made from another supernet run (space or data differ "
                                       f"from {source.path}); move it away")
        return run
    run.path.mkdir(parents=True, exist_ok=True)
    tmp = run.path / ".run.json.copying"
    shutil.copy2(source.meta_path, tmp)
    tmp.replace(run.meta_path)
    return run


def saved_training(stage: Path) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(last finished epoch, recipe, arch) of a retraining in progress, from its latest checkpoint."""
    pointer = stage / "latest.json"
    if not pointer.exists():
        return None
    latest = json.loads(pointer.read_text())
    state = torch.load(stage / latest["dir"] / "state.pt", map_location="cpu", weights_only=True)
    return int(latest["epoch"]), state.get("config", {}), state.get("arch") or {}


def check_job_dir(job: Job, run: RunDir, cfg: RetrainConfig) -> None:
    """Refuse a job directory that holds another arch or another recipe (resume would take the saved one)."""
    stage = retrain_dir(run, job.name)
    if (stage / INFO_FILE).exists():
        info = load_trained_info(run, job.name)
        digest, saved = info.arch.digest, info.extra.get("recipe", {})
    elif (found := saved_training(stage)) is not None:
        _, saved, arch = found
        digest = Arch.from_dict(arch).digest if arch else job.arch.digest
    else:
        return
    if digest != job.arch.digest:
        raise RetrainEvidenceError(f"{stage} holds the retraining of arch {digest}, not of {job.arch.digest} "
                                   "(batch 1 changed?); move it away")
    if RetrainConfig.from_dict(saved) != cfg:
        changed = [k for k, v in asdict(cfg).items() if saved.get(k) != v]
        differ = ", ".join(f"{k} {saved.get(k)} there, {getattr(cfg, k)} asked" for k in changed)
        raise RetrainEvidenceError(f"{stage} was trained with another recipe ({differ}); move it away or use "
                                   "the same --epochs/--ranking-epochs")


def job_status(job: Job, out: Path, models_dir: Path) -> str:
    if (models_dir / f"{job.name}.json").exists():
        return "done"
    running = " (running elsewhere)" if locked_elsewhere(out, job.name) else ""
    stage = runs_root(out) / job.name / "retrain" / job.name
    if (stage / INFO_FILE).exists():
        return "trained, not published" + running
    try:
        found = saved_training(stage)
    except Exception as exc:  # a damaged checkpoint shows in the table; the job itself reports it properly
        return f"unreadable checkpoint ({exc.__class__.__name__})"
    if found is None:
        return "running elsewhere, in epoch 1" if running else "not started"
    epoch, saved, _ = found
    return f"epoch {epoch + 1} of {saved.get('epochs', '?')}" + running


# one job ----------------------------------------------------------------------------------------
def publish(job: Job, run: RunDir, info: Any, onnx_path: Path, sidecar: dict[str, Any], models_dir: Path,
            inherited: float | None, retrain_seconds: float) -> dict[str, Any]:
    """Copy the exported file to MODELS/NAME.onnx, time it there, write MODELS/NAME.json (last)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    size = onnx_path.stat().st_size
    published: Path | None = models_dir / f"{job.name}.onnx"
    if size > MAX_ONNX_BYTES:
        console.print(f"[yellow]warning: {onnx_path} is {size / 1e6:.2f} MB, over the {MAX_ONNX_BYTES / 1e6:g} MB "
                      f"limit of {models_dir}: not copied; timing the run's own file instead[/yellow]")
        published, timed = None, onnx_path
    else:
        tmp = models_dir / f".{job.name}.onnx.copying"
        shutil.copyfile(onnx_path, tmp)
        tmp.replace(published)
        timed = published
    sha = sha256_file(timed)
    if sha != sidecar.get("sha256"):
        raise RetrainEvidenceError(f"{timed} (sha256 {sha[:12]}) is not the file the export vouched for "
                                   f"({str(sidecar.get('sha256'))[:12]})")
    console.print(f"{job.name}: timing {timed} on {TIMING_TARGET} ({TIMING_THREADS} thread, batch {TIMING_BATCH})")
    timing = get_target(TIMING_TARGET, TIMING_THREADS).measure_file(timed, TIMING_BATCH)
    space = run.space()
    cost = arch_cost(space, job.arch, info.num_classes)
    history = load_metrics(retrain_dir(run, job.name))
    record = {
        "role": job.role, "name": job.name, "seed": job.seed, "arch": job.arch.to_dict(), "digest": job.arch.digest,
        "split": [b.global_heads for b in job.arch.blocks],
        "val_top1": info.val_top1, "val_top1_raw": info.extra.get("val_top1_raw"),
        "val_top1_ema": info.extra.get("val_top1_ema"), "weights": info.extra.get("weights"),
        "val_images": info.extra.get("val_images"), "data": info.data,
        "inherited_top1": inherited,
        "measured_ms": timing.median_ms, "ci_ms": [timing.ci_low_ms, timing.ci_high_ms],
        "p90_ms": timing.p90_ms, "p99_ms": timing.p99_ms,
        "timing": {"target": TIMING_TARGET, "threads": TIMING_THREADS, "batch_size": TIMING_BATCH,
                   "file": str(timed), **timing.to_dict()},
        "epochs": info.extra.get("epochs"), "recipe": info.extra.get("recipe"),
        "params": cost.params, "macs": cost.macs,
        "onnx_file": published.name if published else None, "onnx_bytes": size, "onnx_sha256": sha,
        "onnx_skipped": None if published else f"{size} bytes > {MAX_ONNX_BYTES}",
        "exported_by": EXPORTED_BY, "export": {k: sidecar.get(k) for k in ("parity", "latency", "opset", "created")},
        "batch1": {"source": job.source, **job.batch1},
        "run": str(run.path), "train_seconds": round(sum(h.get("epoch_seconds") or 0 for h in history), 1),
        "call_seconds": round(retrain_seconds, 1),
        "history": [{k: h.get(k) for k in ("epoch", "train_loss", "val_top1", "val_top1_ema", "epoch_seconds")}
                    for h in history],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(models_dir / f"{job.name}.json", record)
    return record


def run_job(job: Job, args: argparse.Namespace, source: RunDir, scores: dict[str, float]) -> dict[str, Any]:
    run = job_run(job, args.out, source)
    cfg = recipe(job.epochs, job.seed)
    check_job_dir(job, run, cfg)
    console.rule(f"{job.name}: {job.role}, seed {job.seed}, {job.epochs} epochs, arch {job.arch.digest}")
    started = time.perf_counter()
    info = retrain(run, job.arch, job.name, cfg, resume=True, device="cpu", allow_data_change=args.allow_data_change)
    retrain_seconds = time.perf_counter() - started
    console.print(f"{job.name}: exporting to ONNX (parity on up to {args.parity_images} validation images)")
    export = export_run_onnx(run, job.name, OnnxOptions(parity_images=args.parity_images), threads=args.threads,
                             report=lambda msg: console.print(f"  {msg}", markup=False, highlight=False))
    record = publish(job, run, info, export.path, export.sidecar, args.models_dir, scores.get(job.arch.digest),
                     retrain_seconds)
    console.print(f"[green]{job.name}: {record['val_top1']:.2f} % ({record['weights']} weights), "
                  f"{record['measured_ms']:.3f} ms -> {args.models_dir / (job.name + '.json')}[/green]")
    return record


# --stop-by ---------------------------------------------------------------------------------------
EXPORT_SECONDS = 180  # export, parity on 1,024 images and the file's timing, with room for a busy machine


def parse_stop_by(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """'HH:MM' (local time, its next occurrence: 00:25 given at 22:47 is tomorrow's) or an ISO date-time, which
    must lie in the future."""
    now = now or dt.datetime.now().astimezone()
    try:
        if len(text) <= 5 and ":" in text:
            hour, minute = (int(part) for part in text.split(":"))
            when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if when <= now:  # a clock time already passed today means the coming night's
                when += dt.timedelta(days=1)
        else:
            when = dt.datetime.fromisoformat(text)
            when = when if when.tzinfo else when.astimezone()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give HH:MM or an ISO date-time") from None
    if when <= now:
        raise argparse.ArgumentTypeError(f"{text} ({when:%Y-%m-%d %H:%M}) has passed")
    return when


def epoch_seconds_by_role(models_dir: Path, out: Path, jobs: list[Job]) -> dict[str, list[list[float]]]:
    """Epoch wall times seen so far, per role, as two lists: those of the published models (any host,
    any load) and those of the unpublished jobs' checkpoints here (this host's speed now)."""
    times: dict[str, list[list[float]]] = {}
    for path in sorted(models_dir.glob("*.json")):
        record = json.loads(path.read_text())
        seconds = [h["epoch_seconds"] for h in record.get("history") or [] if h.get("epoch_seconds")]
        times.setdefault(record.get("role", "?"), [[], []])[0].extend(seconds)
    for job in jobs:
        stage = runs_root(out) / job.name / "retrain" / job.name
        if not (models_dir / f"{job.name}.json").exists():  # a published job's epochs are counted above
            times.setdefault(job.role, [[], []])[1].extend(
                float(h["epoch_seconds"]) for h in load_metrics(stage) if h.get("epoch_seconds"))
    return times


def estimated_seconds(job: Job, out: Path, epoch_times: dict[str, list[list[float]]], given: float | None
                      ) -> float | None:
    """What the job still needs: its remaining epochs at `given` seconds an epoch when given (the user
    knows the machine's load now), else at its role's epoch time (the larger of the two medians, published
    and here: starting a job that cannot finish costs more than leaving a core idle); plus the export.
    None when nothing tells."""
    medians = [statistics.median(times) for times in epoch_times.get(job.role, []) if times]
    seconds = given if given is not None else max(medians) if medians else None
    if seconds is None:
        return None
    found = saved_training(runs_root(out) / job.name / "retrain" / job.name)
    done = found[0] + 1 if found is not None else 0
    return max(job.epochs - done, 0) * seconds + EXPORT_SECONDS


def fits_before(job: Job, args: argparse.Namespace, jobs: list[Job]) -> bool:
    """With --stop-by: whether the job is expected to finish in time (said either way)."""
    if args.stop_by is None:
        return True
    needed = estimated_seconds(job, args.out, epoch_seconds_by_role(args.models_dir, args.out, jobs),
                               args.epoch_minutes * 60 if args.epoch_minutes else None)
    if needed is None:
        console.print(f"[yellow]{job.name}: not started: no epoch of role {job.role} has been timed yet, so "
                      "its length is unknown (give --epoch-minutes)[/yellow]")
        return False
    now = dt.datetime.now().astimezone()
    end = now + dt.timedelta(seconds=needed)
    if end > args.stop_by:
        console.print(f"[yellow]{job.name}: not started: expected to take {needed / 60:.0f} min, to "
                      f"{end:%H:%M}, past --stop-by {args.stop_by:%Y-%m-%d %H:%M}[/yellow]")
        return False
    console.print(f"{job.name}: expected to take {needed / 60:.0f} min, to {end:%H:%M} "
                  f"(--stop-by {args.stop_by:%Y-%m-%d %H:%M})")
    return True



# summary ----------------------------------------------------------------------------------------
def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b (ties in either ranking handled), None when one ranking is all ties."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            ties_x += dx == 0
            ties_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    pairs = len(x) * (len(x) - 1) // 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return (concordant - discordant) / denominator if denominator else None


def kendall(x: list[float], y: list[float]) -> dict[str, Any]:
    own = kendall_tau_b(x, y)
    try:
        from scipy.stats import kendalltau
    except ImportError:
        return {"tau": own, "p_value": None, "method": "tau-b (own implementation; scipy not installed)"}
    result = kendalltau(x, y)
    tau, p = float(result.statistic), float(result.pvalue)
    return {"tau": None if math.isnan(tau) else tau, "p_value": None if math.isnan(p) else p,
            "method": "scipy.stats.kendalltau (tau-b)", "tau_own": own}


def role_stats(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) >= 2 else None, "values": values}


def arch_text(record: dict[str, Any]) -> str:
    """A GLiT arch as its global heads per block; a CNN as its family and size."""
    if record["role"] == "cnn":
        cnn = record["arch"]["cnn"]
        return f"{cnn['family']} (size {cnn['size']})"
    return " ".join(map(str, record["split"]))


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Retrained top-1 per role (every model a point, the mean a bar) and the ranking set's scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = [r for r in summary["models"] if r["role"] == "ranking" and r["inherited_top1"] is not None]
    # No ranking set retrained (a batch that only retrains its winners): the roles alone, no empty panel.
    fig, axes = plt.subplots(1, 2 if ranked else 1, figsize=(11 if ranked else 6, 4.2), squeeze=False)
    ax_roles = axes[0][0]
    shown = [role for role in REPORTED_ROLES if role != "ranking" and summary["roles"][role]["n"]]
    for x, role in enumerate(shown):
        stats = summary["roles"][role]
        ax_roles.bar(x, stats["mean"], color="0.85", edgecolor="0.5")
        ax_roles.scatter([x] * stats["n"], stats["values"], color="C0", zorder=3)
    ax_roles.set_xticks(range(len(shown)), shown, rotation=20)
    values = [v for role in shown for v in summary["roles"][role]["values"]]
    if values:
        ax_roles.set_ylim(min(values) - 3, max(values) + 2)
    ax_roles.set(ylabel="retrained top-1 (%)", title="retrained models (10 epochs), by role")
    if ranked:
        ax_rank = axes[0][1]
        ax_rank.scatter([r["inherited_top1"] for r in ranked], [r["val_top1"] for r in ranked], color="C1")
        tau = summary["kendall"]["tau"]
        ax_rank.set(xlabel="inherited-weight top-1 on the supernet (%)", ylabel="retrained top-1 (%)",
                    title=f"ranking set ({len(ranked)} archs, 5 epochs): Kendall tau "
                          + ("-" if tau is None else f"{tau:+.2f}"))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def time_files(files: dict[str, Path], seconds: float, reference: str) -> dict[str, Any]:
    """Named ONNX files timed on this host, all interleaved in one run (ort-cpu, 1 thread, batch 1), with each
    one's ratio to `reference`: the only figures that compare files at equal latency, since a file's own
    `measured_ms` was taken on the host and at the load of the session that published it."""
    import os

    from glit_deploy.latency.measure import Protocol, time_interleaved
    from glit_deploy.runtimes import cpu_name

    target = get_target(TIMING_TARGET, TIMING_THREADS)
    runners = {name: target.file_runner(path, TIMING_BATCH) for name, path in files.items()}
    load_before = os.getloadavg()[0]
    timings = time_interleaved(runners, Protocol(min_seconds=seconds, max_seconds=4 * seconds))
    base = timings.get(reference)
    out = {"host": cpu_name(), "load_before": load_before, "load_after": os.getloadavg()[0],
           "protocol_min_seconds": seconds, "reference": reference, "models": {}}
    for name, timing in timings.items():
        out["models"][name] = {**timing.to_dict(), "ratio": timing.median_ms / base.median_ms if base else None}
    return out


def remeasure(records: list[dict[str, Any]], models_dir: Path, seconds: float) -> dict[str, Any]:
    """Every published file of `models_dir` timed again here, interleaved; ratios to the evolution winner
    (seed 0)."""
    return time_files({r["name"]: models_dir / r["onnx_file"] for r in records}, seconds, "evolution-s0")


def fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def summarize(records: list[dict[str, Any]], jobs: list[Job], scores: dict[str, float], models_dir: Path,
              timing: dict[str, Any] | None = None) -> dict[str, Any]:
    order = {role: i for i, role in enumerate(REPORTED_ROLES)}
    records = sorted(records, key=lambda r: (order[r["role"]], r["name"]))
    for r in records:  # batch 1 may have scored an arch after its job was published
        if r.get("inherited_top1") is None:
            r["inherited_top1"] = scores.get(r["digest"])
    out = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"retrained models in {models_dir}: validation top-1 (kept weights), measured latency "
                        f"({TIMING_TARGET}, {TIMING_THREADS} thread, batch {TIMING_BATCH})")
    columns = ["role", "name", "seed", "epochs", "arch (global heads per block)", "inherited top-1",
               "retrained top-1", "measured when published"]
    if timing:
        columns += ["measured here, interleaved", "vs evolution-s0"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("role", "name", "arch (global heads per block)")
                         else "right")
    for r in records:
        row = [r["role"], r["name"], str(r["seed"]), str(r["epochs"]), arch_text(r),
               fmt(r["inherited_top1"], 2, " %"), fmt(r["val_top1"], 2, " %"),
               f"{fmt(r['measured_ms'], 3)} ms [{fmt(r['ci_ms'][0], 3)}, {fmt(r['ci_ms'][1], 3)}]"]
        if timing:
            here = timing["models"].get(r["name"], {})
            row += [f"{fmt(here.get('median_ms'), 3)} ms [{fmt(here.get('ci_low_ms'), 3)}, "
                    f"{fmt(here.get('ci_high_ms'), 3)}]", fmt(here.get("ratio"), 2, "x")]
        table.add_row(*row)
    out.print(table)

    roles = {role: role_stats([r["val_top1"] for r in records if r["role"] == role]) for role in REPORTED_ROLES}
    stats = Table(title="retrained top-1 per role (mean +- sample standard deviation)")
    for column in ("role", "over", "n", "mean", "sd", "values"):
        stats.add_column(column)
    for role, s in roles.items():
        over = "seeds" if role in (*WINNER_STEPS, "cnn") else "archs"
        values = " ".join(f"{v:.2f}" for v in s["values"]) or "-"
        stats.add_row(role, over, str(s["n"]), fmt(s["mean"], 2, " %"), fmt(s["sd"], 2), values)
    out.print(stats)

    deltas: dict[str, Any] = {}
    for other in ("random-search", "all-global", "random", "cnn"):
        a, b = roles["evolution"], roles[other]
        delta: dict[str, Any] = {"delta": None, "se": None, "n": [a["n"], b["n"]]}
        if a["n"] and b["n"]:
            delta["delta"] = a["mean"] - b["mean"]
            if a["sd"] is not None and b["sd"] is not None:
                delta["se"] = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
        deltas[f"evolution - {other}"] = delta
        se = f" (standard error {delta['se']:.2f})" if delta["se"] is not None else ""
        out.print(f"evolution - {other}, mean retrained top-1: "
                  + (f"{delta['delta']:+.2f} points{se}, n = {a['n']} vs {b['n']}" if delta["delta"] is not None
                     else f"- (n = {a['n']} vs {b['n']})"))

    ranked = [r for r in records if r["role"] == "ranking" and r["inherited_top1"] is not None]
    tau: dict[str, Any] = {"n": len(ranked), "tau": None}
    if len(ranked) >= 2:
        tau.update(kendall([r["inherited_top1"] for r in ranked], [r["val_top1"] for r in ranked]))
    tau["epochs"] = sorted({r["epochs"] for r in ranked})
    p = f", p = {tau['p_value']:.3g}" if tau.get("p_value") is not None else ""
    out.print("Kendall tau, inherited-weight top-1 (batch 1) vs retrained top-1, ranking set: "
              + (f"{tau['tau']:+.3f}{p} over {len(ranked)} archs ({tau['method']})" if tau["tau"] is not None
                 else f"- ({len(ranked)} ranking archs retrained; needs >= 2 with distinct scores)"))

    names = {r["name"] for r in records}
    pending = [j.name for j in jobs if j.name not in names]
    if jobs:
        out.print(f"published {len(jobs) - len(pending)} of the {len(jobs)} jobs batch 1 gives"
                  + (f"; pending: {', '.join(pending)}" if pending else ""))
    if timing:
        out.print(f"measured here: {timing['host']}, load average {timing['load_before']:.1f} -> "
                  f"{timing['load_after']:.1f}, every file interleaved in one run")
    return {"models": records, "roles": roles, "deltas": deltas, "kendall": tau, "pending": pending,
            "remeasured": timing}


# main -------------------------------------------------------------------------------------------
def parse_list(choices: tuple[str, ...] | None) -> Any:
    def parse(text: str) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in names if choices is not None and s not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or '(none)'}; choose from "
                                             f"{','.join(choices or ())}")
        return names
    return parse


def print_jobs(jobs: list[Job], notes: list[str], args: argparse.Namespace, scores: dict[str, float]) -> None:
    table = Table(title=f"batch-2 jobs from {args.batch1} (runs in {runs_root(args.out)}, models in {args.models_dir})")
    for column in ("name", "role", "seed", "epochs", "global heads per block", "digest", "inherited top-1", "status"):
        table.add_column(column)
    for job in jobs:
        table.add_row(job.name, job.role, str(job.seed), str(job.epochs),
                      " ".join(str(b.global_heads) for b in job.arch.blocks), job.arch.digest,
                      fmt(scores.get(job.arch.digest), 2, " %"), job_status(job, args.out, args.models_dir))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    for note in notes:
        console.print(f"[yellow]note: {note}[/yellow]")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch1", type=Path, default=REPO / "bench" / "evidence" / "cifar10-batch1.json",
                        help="the JSON bench/evidence_cifar.py wrote")
    parser.add_argument("--supernet-run", type=Path, default=REPO / "bench" / "evidence",
                        help="the run whose run.json (space, data) every job's run directory copies")
    parser.add_argument("--out", type=Path, default=Path("/work/evidence"), help="jobs train in OUT/retrain-runs/NAME")
    parser.add_argument("--models-dir", type=Path, default=REPO / "bench" / "models" / "cifar10",
                        help="where NAME.onnx and NAME.json are published")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every role but ranking")
    parser.add_argument("--ranking-epochs", type=int, default=5, help="epochs of the ranking set's archs")
    parser.add_argument("--roles", type=parse_list(ROLES), help=f"comma list of {','.join(ROLES)} (default: all)")
    parser.add_argument("--jobs", type=parse_list(None), help="comma list of job names (see --list), run in this order")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--parity-images", type=int, default=1024, help="images of the export's parity check")
    parser.add_argument("--stop-by", type=parse_stop_by, metavar="HH:MM",
                        help="start a job only if it is expected to finish by then (local time, or ISO)")
    parser.add_argument("--epoch-minutes", type=float,
                        help="with --stop-by: an epoch's length, instead of the epochs timed so far (which "
                             "include those of a starved machine)")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="go on with runs whose recorded dataset changed since (glit's --allow-data-change)")
    parser.add_argument("--list", action="store_true", help="print the jobs and their status, and exit")
    parser.add_argument("--summary", action="store_true", help="print the results of the published models, and exit")
    parser.add_argument("--json-out", type=Path, help="with --summary: write it all to this JSON")
    parser.add_argument("--remeasure", type=float, metavar="SECONDS",
                        help="with --summary: time every published file again here, interleaved, at least SECONDS")
    parser.add_argument("--plot", type=Path, help="with --summary: plot the roles and the ranking set to this PNG")
    args = parser.parse_args()
    args.out, args.models_dir = args.out.resolve(), args.models_dir.resolve()
    if args.epochs < 1 or args.ranking_epochs < 1:
        raise RetrainEvidenceError("--epochs and --ranking-epochs must be at least 1")

    state = load_json(args.batch1, "run bench/evidence_cifar.py first")
    source = RunDir(args.supernet_run.resolve())
    space = source.space()
    if state.get("settings", {}).get("space") not in (None, space.name):
        raise RetrainEvidenceError(f"{args.batch1} is about space '{state['settings']['space']}', "
                                   f"{source.path} about '{space.name}'")
    jobs, notes = batch1_jobs(state, space, args.epochs, args.ranking_epochs)
    scores = inherited_scores(state)
    if args.jobs:
        unknown = sorted(set(args.jobs) - {j.name for j in jobs})
        if unknown:
            raise RetrainEvidenceError(f"no job {', '.join(unknown)} (jobs: {', '.join(j.name for j in jobs)})")
    selected = [j for j in jobs if (not args.roles or j.role in args.roles) and (not args.jobs or j.name in args.jobs)]
    if args.jobs:  # in the order given: the first ones are the ones wanted most
        selected.sort(key=lambda j: args.jobs.index(j.name))

    if args.list:
        print_jobs(selected, notes, args, scores)
        return 0
    if args.summary:
        records = [json.loads(p.read_text()) for p in sorted(args.models_dir.glob("*.json"))]
        records = [r for r in records if r.get("role") in REPORTED_ROLES]
        timing = remeasure(records, args.models_dir, args.remeasure) if args.remeasure and records else None
        result = summarize(records, jobs, scores, args.models_dir, timing)
        if args.plot:
            plot_summary(result, args.plot)
            console.print(f"wrote {args.plot}")
        if args.json_out:
            atomic_write_json(args.json_out, {"about": "bench/evidence_retrain.py --summary",
                                              "batch1": str(args.batch1), "models_dir": str(args.models_dir),
                                              **result})
            console.print(f"wrote {args.json_out}")
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    for note in notes:
        console.print(f"[yellow]note: {note}[/yellow]")
    failed: list[str] = []
    for job in selected:
        if (args.models_dir / f"{job.name}.json").exists():
            console.print(f"{job.name}: done already ({args.models_dir / (job.name + '.json')})")
            continue
        with job_lock(args.out, job.name) as held:
            if not held:
                console.print(f"[yellow]{job.name}: another process is running it; skipped[/yellow]")
                continue
            if (args.models_dir / f"{job.name}.json").exists():  # finished by another process meanwhile
                continue
            if not fits_before(job, args, jobs):
                continue
            try:
                run_job(job, args, source, scores)
            except GlitError as exc:  # one job's failure (parity, a refused directory, ...) stops only that job
                console.print(f"[red]{job.name} failed:[/red] {exc}", highlight=False)
                failed.append(job.name)
    if failed:
        console.print(f"[red]{len(failed)} job(s) failed: {', '.join(failed)}[/red]")
        return 1
    return 0


def run_script(main: Callable[[], int]) -> None:
    """A bench script's entry point: a user's mistake (a GlitError) ends in one line and exit status 2."""
    try:
        sys.exit(main())
    except GlitError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    run_script(main)
