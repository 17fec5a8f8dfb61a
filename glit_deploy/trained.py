"""A retrained standalone model in the run directory: the contract between retrain and export.

Layout:
    runs/NAME/retrain/LABEL/model.safetensors   final weights (the EMA weights when EMA was on)
    runs/NAME/retrain/LABEL/model.json          arch, space, data description, validation top-1
    runs/NAME/retrain/LABEL/ckpt/, metrics.jsonl, curves.png   training state and curves
    run.json "deploy_model": LABEL              the model `glit export` takes by default
LABEL is the budget label of a search winner (e.g. `5ms`) or `arch-<digest[:8]>`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from glit_deploy.checkpoint import load_model_weights, load_weights
from glit_deploy.errors import CheckpointError, RunError
from glit_deploy.rundir import RunDir, atomic_write, atomic_write_json
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
