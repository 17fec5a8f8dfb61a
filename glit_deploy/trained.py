"""A retrained standalone model in the run directory: the contract between retrain and export.

Layout:
    runs/NAME/retrain/LABEL/model.safetensors   final weights (the EMA weights when EMA was on)
    runs/NAME/retrain/LABEL/model.json          arch, space, data description, validation top-1
    runs/NAME/retrain/LABEL/ckpt/, metrics.jsonl, curves.png   training state and curves
    run.json "deploy_model": LABEL              the model `glit export` takes by default
LABEL is the budget label of a search winner (e.g. `5ms`), `arch-<digest[:8]>`, or `inherited-<budget>` for a
search winner with its inherited supernet weights (BN recalibrated, not retrained; `glit pipeline` saves it
to compare with the retrained model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from glit_deploy.atomic_io import atomic_write, atomic_write_json
from glit_deploy.checkpoint import load_model_weights, load_weights
from glit_deploy.errors import CheckpointError, RunError
from glit_deploy.rundir import RunDir
from glit_deploy.space import Arch, SearchSpace

MODEL_FILE = "model.safetensors"
INFO_FILE = "model.json"


@dataclass
class TrainedModelInfo:
    """What a deployable model needs besides its weights."""

    label: str
    arch: Arch
    space: SearchSpace
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    data: str  # the data spec it was trained on
    val_top1: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # epochs, init, recipe, ...

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def search_budget(self) -> str:
        """The label the search chose this arch under: the model's own (a winner retrained under its budget's
        label), or the winner's for a model of that arch saved under another label (its inherited weights)."""
        return self.extra.get("search_budget", self.label)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["arch"] = self.arch.to_dict()
        data["space"] = self.space.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainedModelInfo:
        data = dict(data)
        space = SearchSpace.from_dict(data.pop("space"))
        arch = space.validate(Arch.from_dict(data.pop("arch")), source="model.json")
        return cls(arch=arch, space=space, mean=tuple(data.pop("mean")), std=tuple(data.pop("std")), **data)


def retrain_dir(run: RunDir, label: str) -> Path:
    return run.path / "retrain" / label


def save_trained_model(run: RunDir, model: torch.nn.Module, info: TrainedModelInfo, make_default: bool = True
                       ) -> Path:
    """Write the final weights and model.json atomically; optionally make it the run's deploy model."""
    stage = retrain_dir(run, info.label)
    stage.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(stage / MODEL_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"label": info.label}))
    atomic_write_json(stage / INFO_FILE, info.to_dict())
    if make_default:
        run.update_meta(deploy_model=info.label)
    return stage


def trained_labels(run: RunDir) -> list[str]:
    root = run.path / "retrain"
    return sorted(p.name for p in root.iterdir() if (p / INFO_FILE).exists()) if root.is_dir() else []


def load_trained_info(run: RunDir, label: str | None = None) -> TrainedModelInfo:
    label = label or run.load_meta().get("deploy_model")
    if label is None:
        raise RunError(f"{run.path} holds no retrained model: run `glit retrain` first")
    path = retrain_dir(run, label) / INFO_FILE
    if not path.exists():
        known = ", ".join(trained_labels(run)) or "none"
        raise RunError(f"{run.path} has no retrained model '{label}' (retrained: {known})")
    try:
        return TrainedModelInfo.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc})") from None


def load_trained_model(run: RunDir, label: str | None = None) -> tuple[torch.nn.Module, TrainedModelInfo]:
    """The retrained GLiT in eval mode on the CPU, with its info."""
    from glit_deploy.nn import GLiT

    info = load_trained_info(run, label)
    weights_path = retrain_dir(run, info.label) / MODEL_FILE
    model = GLiT(info.arch, info.space, info.num_classes)
    load_model_weights(model, load_weights(weights_path), weights_path)
    return model.eval(), info


def float32_top1(model: torch.nn.Module, loader: Any, device: str | torch.device = "cpu") -> float:
    """Top-1 (percent) of `model` over `loader` in float32, without autocast even on a GPU: the accuracy of the
    weights as they are saved and exported."""
    from glit_deploy.train import evaluate

    device = torch.device(device)
    model = model.to(device).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=False):
            return model(x)

    return evaluate(forward, loader, device)


def keep_best_model(run: RunDir, candidates: dict[str, str], batch_size: int = 256, device: str = "cpu"
                    ) -> dict[str, Any]:
    """Score each candidate (a name -> its label) by the validation top-1 of its saved weights, and make the best
    the run's deploy model; a tie keeps the earlier candidate. Every candidate is scored the same way: the run's
    validation split with the evaluation transform, in float32 (`float32_top1`)."""
    from glit_deploy.data import load_run_data, make_loader

    if not candidates:
        raise RunError("no candidate models to choose from")
    bundle = load_run_data(run, run.space().image_size)
    loader = make_loader(bundle.val, batch_size, shuffle=False)
    scores: dict[str, dict[str, Any]] = {}
    for name, label in candidates.items():
        model, info = load_trained_model(run, label)
        if info.class_names != bundle.class_names:
            raise RunError(f"model '{label}' was trained on other classes than {run.path}'s dataset")
        scores[name] = {"label": label, "val_top1": float32_top1(model, loader, device)}
    kept = max(scores, key=lambda name: scores[name]["val_top1"])  # max keeps the first of equals
    run.update_meta(deploy_model=scores[kept]["label"])
    return {"kept": kept, "label": scores[kept]["label"], "val_top1": scores[kept]["val_top1"],
            "val_images": len(bundle.val), "candidates": scores}
