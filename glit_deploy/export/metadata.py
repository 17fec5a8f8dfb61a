"""What a deployed ONNX model carries about itself: the contract between export, predict and serve.

Stored as ONNX metadata_props (string key -> string value), so that a model file alone is enough to
preprocess images and name classes: onnxruntime exposes them as
`session.get_modelmeta().custom_metadata_map`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glit_deploy.errors import GlitError

PREFIX = "glit."
FORMAT_VERSION = "1"
INPUT_NAME = "input"  # float32 [batch, 3, H, W], normalised with mean/std
OUTPUT_NAME = "output"  # float32 [batch, num_classes] logits


@dataclass(frozen=True)
class ModelMetadata:
    arch: dict[str, Any]  # Arch.to_dict()
    space: dict[str, Any]  # SearchSpace.to_dict()
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    label: str = ""  # the retrained model's label in its run directory
    val_top1: float | None = None
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    precision: str = "fp32"  # int8: a QDQ graph quantized by glit_deploy.quant (still float32 in and out)
    quantization: dict[str, Any] | None = None  # int8: the recipe and the calibration images

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_props(self) -> dict[str, str]:
        values = {
            "format": FORMAT_VERSION, "arch": json.dumps(self.arch, sort_keys=True),
            "space": json.dumps(self.space, sort_keys=True), "image_size": str(self.image_size),
            "input_shape": json.dumps(list(self.input_shape)), "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)), "class_names": json.dumps(list(self.class_names)),
            "label": self.label, "val_top1": "" if self.val_top1 is None else repr(self.val_top1),
            "input_name": self.input_name, "output_name": self.output_name, "precision": self.precision,
        }
        if self.quantization is not None:
            values["quantization"] = json.dumps(self.quantization, sort_keys=True)
        return {PREFIX + k: v for k, v in values.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMetadata:
        values = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not values:
            raise GlitError(f"{source} carries no glit metadata: export it with `glit export`")
        if values.get("format") != FORMAT_VERSION:
            raise GlitError(f"{source} has glit metadata format {values.get('format')}, expected {FORMAT_VERSION}")
        try:
            return cls(arch=json.loads(values["arch"]), space=json.loads(values["space"]),
                       image_size=int(values["image_size"]), mean=tuple(json.loads(values["mean"])),
                       std=tuple(json.loads(values["std"])), class_names=tuple(json.loads(values["class_names"])),
                       label=values.get("label", ""),
                       val_top1=float(values["val_top1"]) if values.get("val_top1") else None,
                       input_name=values.get("input_name", INPUT_NAME),
                       output_name=values.get("output_name", OUTPUT_NAME),
                       precision=values.get("precision", "fp32"),
                       quantization=json.loads(values["quantization"]) if values.get("quantization") else None)
        except (KeyError, ValueError, TypeError) as exc:
            raise GlitError(f"{source} has corrupt glit metadata ({exc!r})") from None

    @classmethod
    def from_trained(cls, info: Any) -> ModelMetadata:
        """From a `glit_deploy.trained.TrainedModelInfo`."""
        return cls(arch=info.arch.to_dict(), space=info.space.to_dict(), image_size=info.image_size,
                   mean=tuple(info.mean), std=tuple(info.std), class_names=tuple(info.class_names),
                   label=info.label, val_top1=info.val_top1)


def attach_metadata(model: Any, meta: ModelMetadata) -> Any:
    """Set the glit metadata_props on an `onnx.ModelProto` (replacing older glit entries)."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def read_metadata(path: str | Path) -> ModelMetadata:
    """The glit metadata of an ONNX file, read without loading its weights."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise GlitError(f"model {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not ONNX
        raise GlitError(f"{path} is not a readable ONNX model ({exc.__class__.__name__})") from None
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, source=str(path))


def session_metadata(session: Any, source: str = "model") -> ModelMetadata:
    """The glit metadata of an onnxruntime InferenceSession."""
    return ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map), source=source)
