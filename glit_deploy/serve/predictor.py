"""One onnxruntime session of an exported model, with the metadata that preprocesses and names classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glit_deploy.errors import GlitError
from glit_deploy.export.metadata import ModelMetadata, session_metadata
from glit_deploy.images import DEFAULT_MAX_PIXELS, Normaliser, model_input, open_image
from glit_deploy.quant import saturation_warning
from glit_deploy.runtimes import PROVIDERS, RuntimeUnavailable, cpu_name, import_onnxruntime, ort_session

PROVIDER_CHOICES = ("auto", *PROVIDERS)


def resolve_model_path(model: Path | None, run: Path | None) -> Path:
    """`--model PATH.onnx` or `--run runs/NAME` (its export/model.onnx): exactly one of them."""
    if (model is None) == (run is None):
        raise GlitError("give exactly one of --model PATH.onnx or --run runs/NAME")
    if run is not None:
        path = Path(run) / "export" / "model.onnx"
        if not path.exists():
            raise GlitError(f"{path} does not exist: run `glit export --run {run} --format onnx` first")
        return path
    assert model is not None
    if not model.is_file():
        raise GlitError(f"model {model} does not exist")
    return model


@dataclass(frozen=True)
class Prediction:
    """Top-k of one image: class names, class indices and softmax probabilities, best first."""

    classes: list[str]
    indices: list[int]
    probabilities: list[float]

    def to_list(self) -> list[dict[str, Any]]:
        return [{"class": c, "index": i, "probability": p}
                for c, i, p in zip(self.classes, self.indices, self.probabilities, strict=True)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class Predictor:
    """An exported model ready to run: session, metadata, preprocessing, top-k."""

    def __init__(self, session: Any, meta: ModelMetadata, source: str = "model", note: str = "") -> None:
        self.session = session
        self.note = note  # e.g. why `auto` ended up on the CPU
        self.meta = meta
        self.source = source
        self.normaliser = Normaliser(meta.mean, meta.std)
        inputs = {i.name for i in session.get_inputs()}
        if meta.input_name not in inputs:
            raise GlitError(f"{source} has no input '{meta.input_name}' (inputs: {', '.join(sorted(inputs))})")
        classes = session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != meta.num_classes:
            raise GlitError(f"{source} outputs {classes} classes but its metadata names {meta.num_classes}")

    @classmethod
    def load(cls, path: Path, provider: str = "auto", threads: int | None = None) -> Predictor:
        """Load `path` on `provider` (auto: CUDA when this onnxruntime offers it and it loads, else CPU)."""
        if provider not in PROVIDER_CHOICES:
            raise GlitError(f"unknown provider '{provider}': use one of {', '.join(PROVIDER_CHOICES)}")
        source, note = str(path), ""
        if provider == "auto":
            session = None
            if PROVIDERS["cuda"] in import_onnxruntime().get_available_providers():
                try:
                    session = ort_session(source, PROVIDERS["cuda"], threads)
                except RuntimeUnavailable as exc:  # onnxruntime-gpu on a machine without a usable GPU
                    note = f"CUDA unusable, running on the CPU: {exc}"
            session = session or ort_session(source, PROVIDERS["cpu"], threads)
        else:
            session = ort_session(source, PROVIDERS[provider], threads)
        meta = session_metadata(session, source=source)
        if meta.precision == "int8" and PROVIDERS["cpu"] in session.get_providers()[:1]:
            warning = saturation_warning(meta.quantization, cpu_name())
            note = "; ".join(filter(None, [note, warning]))
        return cls(session, meta, source=source, note=note)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    def image_to_input(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Encoded image bytes -> the float32 [3, H, W] model input (raises ImageRejected)."""
        return self.opened_to_input(open_image(data, max_pixels))

    def opened_to_input(self, image: Any) -> np.ndarray:
        """An image from `open_image` (header checked, not decoded yet) -> the model input, through the
        same decoding and preprocessing as evaluation during training (`glit_deploy.images.model_input`)."""
        return model_input(image, self.image_size, self.normaliser)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> float32 [N, classes]."""
        return self.session.run([self.meta.output_name], {self.meta.input_name: batch})[0]

    def top_k(self, logits: np.ndarray, k: int) -> list[Prediction]:
        probabilities = softmax(logits)
        k = max(1, min(k, probabilities.shape[1]))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        names = self.meta.class_names
        return [Prediction([names[i] for i in row], [int(i) for i in row],
                           [float(probabilities[n, i]) for i in row]) for n, row in enumerate(order)]

    def warm_up(self) -> None:
        """One inference, so the first real request does not pay for lazy initialisation."""
        size = self.image_size
        self.logits(np.zeros((1, 3, size, size), dtype=np.float32))
