"""Parity checks: does the exported model compute what the trained PyTorch model computes?

Compared on real validation images of the run's dataset: the largest absolute difference of the
logits, and how often both pick the same top-1 class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from glit_deploy.errors import GlitError

PARITY_BATCH = 64


class ParityError(GlitError):
    """An exported model whose outputs differ from the reference beyond the thresholds."""


@dataclass(frozen=True)
class Thresholds:
    max_abs_diff: float = 1e-4
    min_agreement: float = 1.0  # fraction of images whose top-1 class must agree

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ParityResult:
    what: str  # e.g. "onnxruntime CPUExecutionProvider vs PyTorch eager"
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    disagreements: int
    thresholds: Thresholds

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff <= self.thresholds.max_abs_diff
                and self.top1_agreement >= self.thresholds.min_agreement)

    def describe(self) -> str:
        return (f"max |diff| {self.max_abs_diff:.3g} (limit {self.thresholds.max_abs_diff:.3g}), top-1 agreement "
                f"{100 * self.top1_agreement:.2f} % (limit {100 * self.thresholds.min_agreement:.2f} %, "
                f"{self.disagreements} of {self.images} images differ)")

    def failure(self) -> str:
        """What exceeded its threshold, and by how much."""
        parts = []
        t = self.thresholds
        if self.max_abs_diff > t.max_abs_diff:
            parts.append(f"max |diff| {self.max_abs_diff:.3g} exceeds {t.max_abs_diff:.3g} "
                         f"by {self.max_abs_diff - t.max_abs_diff:.3g} ({self.max_abs_diff / t.max_abs_diff:.3g}x)"
                         if t.max_abs_diff > 0 else f"max |diff| {self.max_abs_diff:.3g} exceeds 0")
        if self.top1_agreement < t.min_agreement:
            parts.append(f"top-1 agreement {100 * self.top1_agreement:.2f} % is below {100 * t.min_agreement:.2f} % "
                         f"({self.disagreements} of {self.images} images differ)")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "images": self.images, "max_abs_diff": self.max_abs_diff,
                "mean_abs_diff": self.mean_abs_diff, "top1_agreement": self.top1_agreement,
                "disagreements": self.disagreements, "thresholds": self.thresholds.to_dict(), "passed": self.passed}


def compare_logits(reference: np.ndarray, candidate: np.ndarray, thresholds: Thresholds, what: str) -> ParityResult:
    if reference.shape != candidate.shape:
        raise ParityError(f"{what}: output shape {candidate.shape} differs from the reference's {reference.shape}")
    reference = reference.astype(np.float64)
    diff = np.abs(reference - candidate.astype(np.float64))
    agree = reference.argmax(1) == candidate.argmax(1)
    # NaN anywhere must fail: max() of an array with NaN is NaN, and NaN <= limit is False.
    return ParityResult(what=what, images=len(reference), max_abs_diff=float(diff.max()),
                        mean_abs_diff=float(diff.mean()), top1_agreement=float(agree.mean()),
                        disagreements=int((~agree).sum()), thresholds=thresholds)


def validation_images(data: str, image_size: int, limit: int = 0) -> torch.Tensor:
    """The first `limit` (0: all) validation images of a dataset, normalised, as one float32 batch.

    Image files go through the dataset's evaluation path, i.e. glit_deploy.images (the decoding and
    preprocessing of `glit predict` and `glit serve`). Undecodable files are left out: parity needs real
    images, not every image."""
    from glit_deploy.data import load_data

    val = load_data(data, image_size, skip_bad_images=True, report=False).val
    count = len(val) if limit <= 0 else min(limit, len(val))
    if count == 0:
        raise GlitError(f"dataset '{data}' has no validation images to check parity on")
    return torch.stack([val[i][0] for i in range(count)]).float().contiguous()


@torch.inference_mode()
def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = PARITY_BATCH) -> np.ndarray:
    model = model.eval()
    return np.concatenate([model(images[i:i + batch_size]).float().numpy()
                           for i in range(0, len(images), batch_size)])


def session_logits(run: Callable[[np.ndarray], np.ndarray], images: torch.Tensor, batch_size: int = PARITY_BATCH
                   ) -> np.ndarray:
    """Logits from any runtime given as `run(batch) -> logits`, in batches (the last one smaller)."""
    x = images.numpy()
    return np.concatenate([np.asarray(run(x[i:i + batch_size]), dtype=np.float32)
                           for i in range(0, len(x), batch_size)])


def ort_runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: batch})[0]

    return run
