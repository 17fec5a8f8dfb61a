"""`glit pipeline`: every stage in one run directory, each resumable, finished stages never redone.

Stages: supernet -> latency -> search -> retrain -> export (ONNX + parity) -> bench. run.json's
`pipeline` entry records the options and the finished stages; a stage killed half-way continues
from its own checkpoint (supernet and retraining epochs, search generations, the latency cache).

The retrain stage ends with a choice: the retrained winner or the winner with its inherited supernet
weights (BN recalibrated as the search scored it), whichever scores higher on the validation split,
becomes the model that is exported; run.json's `pipeline.model_choice` records both scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from glit_deploy.errors import RunError
from glit_deploy.rundir import RunDir

console = Console(stderr=True)
STAGES = ("supernet", "latency", "search", "retrain", "export", "bench")


@dataclass
class PipelineConfig:
    data: str = "digits"
    space: str = ""  # default: digits for the built-in data, cifar for cifar10:DIR, glit-tiny otherwise
    target: str = ""  # default: ort-cuda with a GPU, else ort-cpu
    precision: str = "fp32"  # the target's precision: the table, the budget, the export (int8: behind its gate)
    quant_eval: int = 0  # int8: candidates also scored quantized before the winner is chosen
    latency_budget: str = "auto"
    latency_margin: float = 0.03  # the share a winner's measured bound stays under the budget (see glit search)
    batch_size: int = 1  # the batch size latency is measured and budgeted at
    threads: int = 0  # runtime threads for latency (0: the target's default)
    supernet_epochs: int = 20
    supernet_batch_size: int = 32
    supernet_lr: float = 2e-3
    population: int = 12
    generations: int = 3
    parents: int = 4
    children: int = 6  # mutations and crossovers per generation, each
    retrain_epochs: int = 10
    retrain_init: str = "supernet"
    retrain_batch_size: int = 32
    retrain_lr: float = 5e-4
    calibration_models: int = 10
    holdout_models: int = 20
    bench_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    seed: int = 0
    device: str = "auto"

    def resolved(self) -> PipelineConfig:
        from glit_deploy.latency.targets import default_target_name

        space = self.space or ("digits" if self.data == "digits" else "cifar" if self.data.startswith("cifar10:")
                               else "glit-tiny")
        return PipelineConfig(**{**asdict(self), "space": space, "target": self.target or default_target_name()})


@dataclass
class PipelineResult:
    run: Path
    stages_run: list[str]
    stages_skipped: list[str]
    summary: dict[str, Any]


def run_pipeline(run: RunDir, cfg: PipelineConfig, on_stage: Callable[[str, str], None] | None = None
                 ) -> PipelineResult:
    """Run (or continue) every stage; `on_stage(stage, status)` reports progress to the caller."""
    cfg = cfg.resolved()
    _target(cfg)  # an unknown target, or a precision it does not deploy, fails before any training
    if cfg.quant_eval and cfg.precision != "int8":
        raise RunError("--quant-eval scores candidates quantized: it needs --precision int8")
    state = _load_state(run, cfg)
    done: list[str] = state["done"]
    ran, skipped = [], []
    for stage in STAGES:
        if stage in done:
            skipped.append(stage)
            if on_stage:
                on_stage(stage, "done earlier")
            continue
        if on_stage:
            on_stage(stage, "running")
        started = time.perf_counter()
        outcome = STAGE_FUNCTIONS[stage](run, cfg)
        if outcome is not None:
            state[STAGE_RECORDS[stage]] = outcome
        done.append(stage)
        state.setdefault("seconds", {})[stage] = time.perf_counter() - started
        run.update_meta(pipeline=state)
        ran.append(stage)
        if on_stage:
            on_stage(stage, f"finished in {state['seconds'][stage]:.0f} s")
    return PipelineResult(run.path, ran, skipped, pipeline_summary(run, cfg))


# The first stage each option changes. An option changed on an existing run redoes that stage and every one
# after it, unless that is the supernet: retraining it is a new run.
OPTION_STAGES = {
    **dict.fromkeys(("data", "space", "supernet_epochs", "supernet_batch_size", "supernet_lr", "seed", "device"),
                    "supernet"),
    **dict.fromkeys(("target", "precision", "batch_size", "threads", "calibration_models", "holdout_models"),
                    "latency"),
    **dict.fromkeys(("latency_budget", "latency_margin", "population", "generations", "parents", "children",
                     "quant_eval"), "search"),
    **dict.fromkeys(("retrain_epochs", "retrain_init", "retrain_batch_size", "retrain_lr"), "retrain"),
    "bench_batch_sizes": "bench",
}
# The folders of a run that a stage writes (bench writes into export/).
STAGE_FOLDERS = {"latency": "latency", "search": "search", "retrain": "retrain", "export": "export"}


def _load_state(run: RunDir, cfg: PipelineConfig) -> dict[str, Any]:
    options = asdict(cfg)
    if run.exists():
        state = run.load_meta().get("pipeline")
        if state is None and (run.supernet / "latest.json").exists():
            raise RunError(f"{run.path} holds a run that `glit pipeline` did not start; use another --run")
        if state is not None:
            # options added since a run started count as their defaults (what that run used)
            recorded = {**asdict(PipelineConfig()), **state["options"]}
            if recorded != options:
                return _redo_after_changed_options(run, state, recorded, options)
            return state
    run.path.mkdir(parents=True, exist_ok=True)
    state = {"options": options, "done": []}
    run.update_meta(pipeline=state)
    return state


def _redo_after_changed_options(run: RunDir, state: dict[str, Any], recorded: dict[str, Any],
                                options: dict[str, Any]) -> dict[str, Any]:
    """The state of a run rerun with other options: the stages those options change, and every later one,
    are redone; what they wrote before moves to RUN/replaced/N/, so nothing is lost. Options that would
    train the supernet again are refused (a new run)."""
    changed = sorted(k for k in options if recorded.get(k) != options[k])
    first = min((STAGES.index(OPTION_STAGES[k]) for k in changed), default=len(STAGES))
    if first == 0:
        supernet = [k for k in changed if OPTION_STAGES[k] == "supernet"]
        raise RunError(f"{run.path} was started by `glit pipeline` with other options ({', '.join(changed)}); "
                       f"{', '.join(supernet)} would train the supernet again: rerun with the same "
                       f"{'option' if len(supernet) == 1 else 'options'} or use another --run")
    redo = STAGES[first:]
    folders = [STAGE_FOLDERS[stage] for stage in redo
               if stage in STAGE_FOLDERS and (run.path / STAGE_FOLDERS[stage]).exists()]
    replaced = None
    if folders:
        root = run.path / "replaced"
        replaced = root / str(1 + max((int(p.name) for p in root.glob("*") if p.name.isdigit()), default=0))
        replaced.mkdir(parents=True)
        for folder in folders:
            (run.path / folder).rename(replaced / folder)
    state = {**state, "options": options, "done": [stage for stage in state["done"] if stage not in redo]}
    for stage in redo:
        state.pop(STAGE_RECORDS.get(stage, ""), None)
        state.get("seconds", {}).pop(stage, None)
    state.setdefault("replaced", []).append({"changed": {k: [recorded.get(k), options[k]] for k in changed},
                                             "redone": list(redo), "folder": str(replaced) if replaced else None})
    run.update_meta(pipeline=state)
    console.print(f"options changed since this run's last pipeline ({', '.join(changed)}): redoing "
                  f"{', '.join(redo)}" + (f"; what they wrote before is in {replaced}" if replaced else ""))
    return state


# stages ----------------------------------------------------------------------------------------
def _supernet(run: RunDir, cfg: PipelineConfig) -> None:
    from glit_deploy.space import get_space
    from glit_deploy.train import TrainConfig, train_supernet

    train_cfg = TrainConfig(epochs=cfg.supernet_epochs, batch_size=cfg.supernet_batch_size, lr=cfg.supernet_lr,
                            sandwich=True, seed=cfg.seed, eval_every=cfg.supernet_epochs)
    train_supernet(run, get_space(cfg.space), cfg.data, train_cfg, resume=(run.supernet / "latest.json").exists(),
                   device=cfg.device)


def _target(cfg: PipelineConfig) -> Any:
    from glit_deploy.latency.targets import get_target

    return get_target(cfg.target, cfg.threads or None, cfg.precision)


def _latency(run: RunDir, cfg: PipelineConfig) -> None:
    from glit_deploy.search.runner import run_latency_model

    model = run_latency_model(run, _target(cfg), cfg.batch_size, calibration_models=cfg.calibration_models,
                              holdout_models=cfg.holdout_models)
    if model.report is not None:
        console.print(f"latency model on {_target(cfg).label}: {model.report.mape:.1f} % mean error on "
                      f"{model.report.models} held-out models (measurement noise {model.report.noise:.1f} %)")


def _search_config(cfg: PipelineConfig) -> Any:
    from glit_deploy.search import SearchConfig

    return SearchConfig(population=cfg.population, generations=cfg.generations, parents=cfg.parents,
                        mutations=cfg.children, crossovers=cfg.children, seed=cfg.seed, quant_eval=cfg.quant_eval,
                        latency_margin=cfg.latency_margin)


def _search(run: RunDir, cfg: PipelineConfig) -> None:
    from glit_deploy.search import Budget
    from glit_deploy.search.runner import search

    budget: Budget | str = cfg.latency_budget if cfg.latency_budget == "auto" else Budget.parse(cfg.latency_budget)
    summary = search(run, [budget], _target(cfg), cfg.batch_size, _search_config(cfg), resume=True,
                     calibration_models=cfg.calibration_models, holdout_models=cfg.holdout_models, device=cfg.device)
    (label, result), = summary["budgets"].items()
    if not result.get("digest"):
        raise RunError(f"the search found no arch within {label}: {result.get('error')}")


def _winner_label(run: RunDir) -> str:
    from glit_deploy.search.evolution import load_summary

    labels = [label for label, r in load_summary(run)["budgets"].items() if r.get("digest")]
    if len(labels) != 1:
        raise RunError(f"{run.path}'s search has {len(labels)} winners; the pipeline expects one")
    return labels[0]


def _retrain(run: RunDir, cfg: PipelineConfig) -> dict[str, Any]:
    """Retrain the winner, then keep the better of it and the winner with inherited weights (the choice)."""
    from glit_deploy.retrain import RetrainConfig, resolve_retrain_arch, retrain, save_inherited_model
    from glit_deploy.trained import keep_best_model

    arch, label = resolve_retrain_arch(run, None, _winner_label(run))
    # At 8x8 px RandAugment, erasing and Mixup/CutMix destroy more than they regularise, and the
    # supernet's weights are already good: fine-tune them gently. Larger images get the DeiT recipe.
    tiny = run.space().image_size < 32
    recipe = dict(rand_augment="none", reprob=0.0, mixup=0.0, cutmix=0.0, lr=min(cfg.retrain_lr, 2e-4)) if tiny \
        else {"lr": cfg.retrain_lr}
    retrain_cfg = RetrainConfig(epochs=cfg.retrain_epochs, batch_size=cfg.retrain_batch_size,
                                warmup_epochs=min(2, cfg.retrain_epochs - 1), init=cfg.retrain_init, seed=cfg.seed,
                                **recipe)
    retrained = retrain(run, arch, label, retrain_cfg, resume=True, device=cfg.device)
    search_cfg = _search_config(cfg)
    device = _eval_device(cfg)
    inherited = save_inherited_model(run, arch, f"inherited-{label}", search_cfg.batch_size, search_cfg.calib_batches,
                                     search_budget=label, device=device)
    choice = keep_best_model(run, {"retrained": retrained.label, "inherited": inherited.label}, device=device)
    scores = {name: c["val_top1"] for name, c in choice["candidates"].items()}
    console.print(f"validation top-1 on {choice['val_images']} images: retrained {scores['retrained']:.2f} %, "
                  f"inherited supernet weights {scores['inherited']:.2f} %; exporting the {choice['kept']} model "
                  f"'{choice['label']}'")
    return choice


def _eval_device(cfg: PipelineConfig) -> str:
    import torch

    return "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"


def _export(run: RunDir, cfg: PipelineConfig) -> None:
    from glit_deploy.export import export_onnx

    export_onnx(run)


def _bench(run: RunDir, cfg: PipelineConfig) -> None:
    from glit_deploy.export import bench_formats

    bench_formats(run, cfg.bench_batch_sizes, threads=cfg.threads or None)


STAGE_FUNCTIONS: dict[str, Callable[[RunDir, PipelineConfig], dict[str, Any] | None]] = {
    "supernet": _supernet, "latency": _latency, "search": _search, "retrain": _retrain, "export": _export,
    "bench": _bench,
}
# Where run.json's pipeline entry keeps what a stage returns.
STAGE_RECORDS = {"retrain": "model_choice"}


def pipeline_summary(run: RunDir, cfg: PipelineConfig) -> dict[str, Any]:
    """What the user wants at the end: accuracy, measured latency against the budget, files, next command."""
    import json

    from glit_deploy.search.evolution import load_summary
    from glit_deploy.trained import load_trained_info

    search = load_summary(run)
    label = _winner_label(run)
    winner = search["budgets"][label]
    info = load_trained_info(run, label)
    choice = run.load_meta().get("pipeline", {}).get("model_choice", {})
    scores = {name: c["val_top1"] for name, c in choice.get("candidates", {}).items()}
    export_dir = run.path / "export"
    model_json = export_dir / "model.json"
    export_info = json.loads(model_json.read_text()) if model_json.exists() else {}
    files = [p for p in (run.path / "search" / "pareto.png", run.path / "retrain" / label / "curves.png",
                         run.path / "retrain" / choice.get("label", label) / "model.safetensors",
                         export_dir / "model.onnx", model_json, export_dir / "bench.csv") if p.exists()]
    return {"target": search["target"], "precision": search.get("precision", "fp32"),
            "batch_size": search["batch_size"], "budget": label, "int8_gate": export_info.get("gate"),
            "budget_ms": winner["budget_ms"], "measured_ms": winner["measured_ms"],
            "predicted_ms": winner["predicted_ms"], "search_val_top1": winner["top1"],
            "retrained_val_top1": scores.get("retrained", info.val_top1), "inherited_val_top1": scores.get("inherited"),
            "kept": choice.get("kept", "retrained"), "deployed_model": choice.get("label", label),
            "deployed_val_top1": choice.get("val_top1", info.val_top1), "val_images": choice.get("val_images"),
            "arch_digest": info.arch.digest, "params": winner.get("params"),
            "macs": winner.get("macs"), "parity": export_info.get("parity"),
            "deployed_latency": export_info.get("latency"), "files": [str(p) for p in files],
            "serve_command": f"glit serve --model {export_dir / 'model.onnx'}"}
