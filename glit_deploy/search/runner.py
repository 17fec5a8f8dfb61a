"""Wires the search to a run directory: the supernet, the dataset, the latency model and the target."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from glit_deploy import distributed
from glit_deploy.checkpoint import load_checkpoint
from glit_deploy.data import make_loader
from glit_deploy.errors import GlitError, RunError
from glit_deploy.latency.budget import Budget, decision_protocol
from glit_deploy.latency.measure import TABLE, Protocol, Timing
from glit_deploy.latency.table import LatencyModel, check_host, console, measure_arch, profile_latency, table_key
from glit_deploy.latency.targets import Target
from glit_deploy.nn import Supernet
from glit_deploy.nn.supernet import recalibrate_bn
from glit_deploy.quant import calibration_images, graph_predictions
from glit_deploy.rundir import RunDir
from glit_deploy.search.evolution import EvolutionarySearch, SearchConfig
from glit_deploy.search.fitness import finetuned_top1
from glit_deploy.space import Arch
from glit_deploy.train import TrainConfig, calibration_batches, evaluate_subnet, load_supernet, train_stage


def latency_table_path(run: RunDir, target_label: str, batch_size: int) -> Path:
    """The run's copy of a latency table; `target_label` carries the precision (`ort-cpu-int8`)."""
    return run.path / "latency" / f"{target_label}-b{batch_size}.json"


def run_latency_model(run: RunDir, target: Target, batch_size: int, protocol: Protocol | None = None,
                      calibration_models: int = 10, holdout_models: int = 20, use_cache: bool = True
                      ) -> LatencyModel:
    """The run's latency model for a target (from the shared cache when it was measured before)."""
    meta = run.load_meta()
    space = run.space()
    num_classes = meta["data"]["num_classes"]
    model = profile_latency(space, num_classes, target, batch_size, protocol, calibration_models, holdout_models,
                            use_cache=use_cache)
    model.save(latency_table_path(run, target.label, batch_size))
    return model


def resume_latency_model(run: RunDir, target: Target, batch_size: int, protocol: Protocol) -> LatencyModel:
    """The table a search started with: the run's own copy, whatever the shared cache holds now.

    Refuses, with what changed, when the target, its threads, the runtime versions, the batch size or
    the protocol are not what the table was measured with.
    """
    path = latency_table_path(run, target.label, batch_size)
    if not path.exists():
        raise RunError(f"the search in {run.path} cannot be resumed: its latency table {path} is missing")
    model = LatencyModel.load(path)
    changed = _changed_settings(model, run, target, batch_size, protocol)
    if changed:
        raise RunError(f"the search in {run.path} was measured with other latency settings ({'; '.join(changed)}): "
                       "resume it with the settings it started with, or start a new search in another run directory")
    return model


def given_latency_model(run: RunDir, path: Path, target: Target, batch_size: int, protocol: Protocol
                        ) -> LatencyModel:
    """A table the user names (`glit search --latency-table`), used as it is instead of the cache, so
    that two searches on one table differ only in what the user changed. It must have been measured
    with this search's settings; it is checked against this host like a cached table (`check_host`),
    but only warned about when off: the user chose it, and every winner is measured here anyway. The
    run keeps a copy, which a resumed search reads."""
    model = LatencyModel.load(Path(path))
    changed = _changed_settings(model, run, target, batch_size, protocol)
    if changed:
        raise RunError(f"the latency table {path} was measured with other settings ({'; '.join(changed)}): "
                       "search with the settings it was measured with, or without --latency-table")
    check = check_host(model, run.space(), run.load_meta()["data"]["num_classes"], target)
    if not check["agrees"]:
        console.print(f"[yellow]warning: the latency table {path} reads {check['ratio']:.2f}x on this host: it may "
                      "describe another machine; it is used as given, and every winner is measured here[/yellow]")
    model.host_check = check
    own = latency_table_path(run, target.label, batch_size)
    if own.resolve() != Path(path).resolve():
        model.save(own)
    return model


def _changed_settings(model: LatencyModel, run: RunDir, target: Target, batch_size: int, protocol: Protocol
                      ) -> list[str]:
    """What differs between a table's key and this search's, by dotted name (`threads: 1 -> 2`)."""
    key = table_key(target, run.space(), batch_size, run.load_meta()["data"]["num_classes"], protocol)
    measured = _flat(model.key)
    return [f"{k}: {measured.get(k)} -> {v}" for k, v in _flat(key).items() if measured.get(k) != v]


def _flat(key: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted names (protocol.min_rounds, versions.onnxruntime): what changed, by name."""
    flat: dict[str, Any] = {}
    for k, v in key.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def resolve_budgets(budgets: list[Budget | float | str], latency: LatencyModel, space: Any) -> list[Budget]:
    """Budgets as `Budget`s: a number is a median budget in ms, and `auto` a median budget in the
    middle of the range the space spans on the target (predicted)."""
    lo, hi = latency.block_range_ms(space, True), latency.block_range_ms(space, False)
    return sorted({Budget(round(lo + 0.5 * (hi - lo), 4)) if b == "auto" else
                   b if isinstance(b, Budget) else Budget(float(b)) for b in budgets})


def search(run: RunDir, budgets: list[Budget | float | str], target: Target, batch_size: int, cfg: SearchConfig,
           resume: bool = False, level2_epochs: int = 0, protocol: Protocol | None = None,
           calibration_models: int = 10, holdout_models: int = 20, device: str = "auto",
           latency_table: Path | None = None) -> dict[str, Any]:
    """Search under each budget (a `Budget`, or `auto`); returns the summary written to search/summary.json.

    The latency table is the cache's (measured when missing or stale), or `latency_table` as given."""
    ctx = distributed.setup(device)
    try:
        return _search(run, budgets, target, batch_size, cfg, resume, level2_epochs, protocol or TABLE,
                       calibration_models, holdout_models, ctx, latency_table)
    finally:
        distributed.teardown(ctx)


def _search(run: RunDir, budgets: list[Budget | float | str], target: Target, batch_size: int, cfg: SearchConfig,
            resume: bool, level2_epochs: int, protocol: Protocol, calibration_models: int,
            holdout_models: int, ctx: distributed.DistContext, latency_table: Path | None) -> dict[str, Any]:
    supernet, bundle = load_supernet(run, ctx.device, update_record=ctx.is_main)
    space = supernet.space
    if cfg.fixed_split is not None:
        space.validate(space.with_split(cfg.fixed_split), source="--fixed-split")
    if cfg.level2_splits > 1 and level2_epochs:
        raise GlitError("--level2-epochs trains the supernet on one split before level 2; --level2-splits "
                        "searches several: use one of them")
    target.check()
    state_path = run.path / "search" / "state.json"

    def table() -> LatencyModel:
        if resume and state_path.exists():
            latency = resume_latency_model(run, target, batch_size, protocol)
            if latency_table is not None and LatencyModel.load(Path(latency_table)).to_dict() != latency.to_dict():
                raise RunError(f"--latency-table {latency_table} is not the table the search in {run.path} started "
                               "with: a resumed search keeps its table (leave --latency-table out)")
        elif latency_table is not None:
            latency = given_latency_model(run, latency_table, target, batch_size, protocol)
        else:
            latency = run_latency_model(run, target, batch_size, protocol, calibration_models, holdout_models)
        run.record_command("search", {"budgets": [b.label if isinstance(b, Budget) else b for b in budgets],
                                      "target": target.name, "precision": target.precision,
                                      "batch_size": batch_size, "resume": resume,
                                      "level2_epochs": level2_epochs,
                                      "latency_table": str(latency_table) if latency_table else None, **cfg.__dict__})
        return latency

    latency = distributed.decided_on_main(ctx, table)
    resolved = resolve_budgets(budgets, latency, space)
    val_loader = make_loader(bundle.val, cfg.batch_size, shuffle=False)
    weights = {"current": supernet}

    def evaluate(archs: list[Arch]) -> list[float]:
        # Under torchrun every rank evaluates its share of the population, then all share the scores.
        mine = {i: evaluate_subnet(weights["current"], a, bundle, cfg.batch_size, cfg.calib_batches, ctx.device,
                                   val_loader=val_loader)
                for i, a in enumerate(archs) if i % ctx.world_size == ctx.rank}
        if ctx.enabled:
            gathered: list[dict[int, float]] = [{} for _ in range(ctx.world_size)]
            dist.all_gather_object(gathered, mine)
            for part in gathered:
                mine.update(part)
        return [mine[i] for i in range(len(archs))]

    winner_protocol = decision_protocol(resolved)
    # An int8 winner is timed as export will write it: quantized, calibrated on training images.
    calibration = calibration_images(bundle.calib) if target.precision == "int8" else None

    def measure(arch: Arch) -> Timing:
        # Rank 0 measures (one clock, one process on the target); every rank takes its reading.
        return distributed.decided_on_main(
            ctx, lambda: measure_arch(arch, space, supernet.num_classes, target, batch_size, winner_protocol,
                                      calibration))

    def quantized_top1(arch: Arch, tag: str) -> float:
        # The weights of `tag` are the current ones whenever the winner of that level is chosen.
        return distributed.decided_on_main(
            ctx, lambda: int8_subnet_top1(weights["current"], arch, bundle, cfg, calibration, target, ctx.device))

    def finetuned(arch: Arch, tag: str) -> float:
        # Rank 0 fine-tunes (one process, the same batches for every candidate); every rank takes the score.
        return distributed.decided_on_main(
            ctx, lambda: finetuned_top1(weights["current"], arch, bundle, cfg.finetune_config(), cfg.batch_size,
                                        cfg.calib_batches, ctx.device, val_loader, progress=True)[cfg.finetune_steps])

    search_state: dict[str, Any] = {}

    def weights_tag(level: int) -> str:
        split = search_state["engine"].state.get("split")
        if level == 1 or level2_epochs == 0 or not split:
            return "supernet"
        return f"split{''.join(map(str, split))}-e{level2_epochs}"

    def before_level2(split: tuple[int, ...] | None) -> None:
        if level2_epochs == 0 or split is None:
            weights["current"] = supernet
            return
        weights["current"] = finetune_for_split(run, supernet, bundle, split, level2_epochs, ctx)

    engine = EvolutionarySearch(run, space, supernet.num_classes, latency, resolved, cfg, evaluate, measure, ctx,
                                weights_tag=weights_tag, before_level2=before_level2,
                                quantized=quantized_top1 if target.precision == "int8" else None,
                                finetuned=finetuned if cfg.finetune_top or cfg.finetune_splits else None)
    search_state["engine"] = engine
    if resume and engine.state_path.exists():
        state = json.loads(engine.state_path.read_text())
        if state.get("cursor", {}).get("level") == 2 and state.get("population") is not None and state.get("split"):
            before_level2(tuple(state["split"]))  # level 2 resumes on the fine-tuned weights
    return engine.run_search(resume)


def int8_subnet_top1(supernet: Supernet, arch: Arch, bundle: Any, cfg: SearchConfig, calibration: Any,
                     target: Target, device: Any) -> float:
    """Validation top-1 of an inherited-weight subnet deployed in int8: BatchNorm recalibrated as the
    float32 fitness does it, extracted, quantized as the target deploys it, run on onnxruntime."""
    import torch

    recalibrate_bn(supernet, calibration_batches(bundle, cfg.batch_size, cfg.calib_batches, device),
                   lambda x: supernet(x, arch))
    model = supernet.extract(arch).cpu().eval()
    example = torch.zeros(1, supernet.space.in_chans, supernet.space.image_size, supernet.space.image_size)
    graph = target.graph(model, example, calibration)
    predictions, labels = graph_predictions(graph, bundle.val, threads=target.threads)
    return 100.0 * float((predictions == labels).mean())


def finetune_for_split(run: RunDir, supernet: Supernet, bundle: Any, split: tuple[int, ...], epochs: int,
                       ctx: distributed.DistContext) -> Supernet:
    """Fine-tune the supernet on archs of one split (the paper trains a second supernet for level 2)."""
    stage = run.path / "search" / f"supernet-split-{''.join(map(str, split))}"
    base = load_checkpoint(run.supernet, with_state=True)
    cfg = TrainConfig.from_dict(base.state.get("config", {}))
    cfg = replace(cfg, epochs=epochs, warmup_epochs=0, lr=cfg.lr * 0.2, split=list(split), eval_every=epochs)
    finished = load_checkpoint(stage, with_state=False)
    if finished is None or finished.epoch + 1 < epochs:
        train_stage(stage, supernet.space, bundle, cfg, resume=True, ctx=ctx,
                    init_weights={k: v.clone() for k, v in supernet.state_dict().items()})
        finished = load_checkpoint(stage, with_state=False)
    tuned = Supernet(supernet.space, supernet.num_classes)
    tuned.load_state_dict(finished.weights)
    return tuned.to(ctx.device).eval()
