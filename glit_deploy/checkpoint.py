"""Checkpoints: weights as safetensors, training state as a weights-only torch file.

Layout under a stage folder (e.g. runs/NAME/supernet/):
    ckpt/epoch_0003/model.safetensors   weights (no pickled code)
    ckpt/epoch_0003/state.pt            optimizer, scheduler, counters (torch.load weights_only)
    latest.json                         {"epoch": 3, "dir": "ckpt/epoch_0003"}
A checkpoint folder is written under a temporary name and renamed, then latest.json is replaced
atomically: a killed process leaves the previous good checkpoint in place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from glit_deploy.atomic_io import atomic_write_json
from glit_deploy.errors import CheckpointError

KEEP_LAST = 2


@dataclass
class Checkpoint:
    epoch: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def save_checkpoint(stage_dir: Path, epoch: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    metadata: dict[str, str] | None = None) -> Path:
    ckpt_root = stage_dir / "ckpt"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"epoch_{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=ckpt_root))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"epoch": str(epoch), **(metadata or {})})
        torch.save({"epoch": epoch, **state}, tmp / "state.pt")
        if final.exists():  # left by a run killed before it updated latest.json: not referenced
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(stage_dir / "latest.json", {"epoch": epoch, "dir": str(final.relative_to(stage_dir))})
    for old in sorted(ckpt_root.glob("epoch_*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint_dir(stage_dir: Path) -> Path | None:
    pointer = stage_dir / "latest.json"
    if not pointer.exists():
        return None
    try:
        info = json.loads(pointer.read_text())
        path = stage_dir / info["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is corrupt ({exc})") from None
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path}, which does not exist")
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({exc})") from None


def load_checkpoint(stage_dir: Path, with_state: bool = True) -> Checkpoint | None:
    """The latest checkpoint of a stage, or None when it has none."""
    path = latest_checkpoint_dir(stage_dir)
    if path is None:
        return None
    weights = load_weights(path / "model.safetensors")
    state: dict[str, Any] = {}
    if with_state:
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} has no state.pt") from None
        except Exception as exc:  # torch raises many kinds for a damaged or foreign file
            raise CheckpointError(f"training state {path / 'state.pt'} is corrupt or unsafe ({exc})") from None
    epoch = int(state.get("epoch", _epoch_from_name(path)))
    return Checkpoint(epoch, weights, state)


def _epoch_from_name(path: Path) -> int:
    return int(path.name.split("_")[-1])


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path | str) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {source} does not fit this model: {first}") from None


def restore_training_state(checkpoint: Checkpoint, optimizer: Any, scheduler: Any, stage_dir: Path) -> int:
    """Load the optimizer and scheduler state of a checkpoint; returns the epoch to continue from."""
    try:
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        scheduler.load_state_dict(checkpoint.state["scheduler"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"training state in {stage_dir} does not fit this training ({exc})") from None
    return checkpoint.epoch + 1
