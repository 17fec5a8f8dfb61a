"""Precision of a deployed graph: float32, or int8 by onnxruntime's static QDQ quantization.

One definition of the int8 graph (`quantize_onnx`), which the latency targets time and `glit export
--precision int8` writes, so that the search and the export cannot disagree on what int8 means:

- `onnxruntime.quantization.quant_pre_process` (symbolic shape inference and graph optimisation),
- `quantize_static` in the QDQ format, per-channel int8 weights, uint8 activations (the format
  onnxruntime's CPU kernels are written for), MinMax calibration on images of the training split as
  the model sees them (`calibration_images`),
- 8-bit weights on CPUs with an int8 dot-product instruction (VNNI, AMX) and off x86, 7-bit weights
  (`reduce_range`) on x86 CPUs without one: there onnxruntime multiplies u8 by s8 with VPMADDUBSW,
  whose 16-bit sums saturate. Measured on the retrained CIFAR-10 winner on an AVX2-only host
  (BENCHMARKS.md §10): full range lost 1.50 points (91.0 % agreement), reduced range gained 0.04 (98.5 %),
- the operators in `QuantRecipe.op_types`: which ones pay was measured (BENCHMARKS.md §10).

Latency does not depend on the scales and zero points, only on which tensors are quantized: a block
of a latency table is calibrated on random inputs, a whole model on images. Accuracy is only ever
taken from a model calibrated on images.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from glit_deploy.errors import GlitError

PRECISIONS = ("fp32", "int8")
DEFAULT_CALIBRATION_IMAGES = 64
CALIBRATION_SEED = 0
# Measured (bench/int8_speed.py, BENCHMARKS.md §10): quantizing the matrix products (MatMul, Gemm:
# attention, the MLPs, the GLU's pointwise projections, the head) and the convolutions pays on GLiT;
# adding the data-movement ops (Reshape, Transpose, ...) changes nothing measurable but adds QDQ pairs.
DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Conv")


class QuantizationError(GlitError):
    """The model could not be quantized (unsupported graph, bad calibration data)."""


@dataclass(frozen=True)
class QuantRecipe:
    """What `quantize_onnx` does, recorded with every int8 file and every int8 latency table."""

    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    per_channel: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    calibrate_method: str = "MinMax"
    extra_options: dict[str, Any] = field(default_factory=dict)
    reduce_range: bool = False  # 7-bit weights: what x86 CPUs without VNNI need (see host_recipe)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["op_types"] = list(self.op_types)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantRecipe:
        return cls(**{**data, "op_types": tuple(data.get("op_types", DEFAULT_OP_TYPES))})


DEFAULT_RECIPE = QuantRecipe()  # 8-bit weights: for CPUs with an int8 dot product (VNNI, AMX) and GPUs


def saturates_u8s8(features: Sequence[str] | None = None) -> bool:
    """True on an x86 CPU without an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI, AMX): onnxruntime's
    u8 x s8 kernels use VPMADDUBSW there, whose 16-bit intermediate sums saturate on full-range weights."""
    import platform

    from glit_deploy.runtimes import cpu_features

    if features is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
            return False
        features = cpu_features()
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(features)


def host_recipe() -> QuantRecipe:
    """The int8 recipe for onnxruntime on this CPU: DEFAULT_RECIPE, with 7-bit weights where u8 x s8 saturates."""
    return replace(DEFAULT_RECIPE, reduce_range=True) if saturates_u8s8() else DEFAULT_RECIPE


def saturation_warning(quantization: dict[str, Any] | None, host: str) -> str | None:
    """Why an int8 file may lose accuracy on this CPU, or None: a file quantized with 8-bit weights (for a CPU
    with VNNI) run on an x86 CPU without VNNI saturates. `quantization`: the file's metadata."""
    if not quantization or not saturates_u8s8():
        return None
    recipe = quantization.get("recipe", {})
    if recipe.get("reduce_range") or recipe.get("weight_type", "QInt8") != "QInt8" \
            or recipe.get("activation_type", "QUInt8") != "QUInt8":
        return None
    made_on = quantization.get("host", "a CPU with an int8 dot product")
    return (f"this int8 model has 8-bit weights (quantized on {made_on}); this CPU ({host}) has no VNNI, so "
            "onnxruntime's int8 products can saturate and its accuracy can drop (1.5 points measured on a CIFAR-10 "
            "model): export it again on this machine (glit export --precision int8 quantizes with 7-bit weights "
            "here), or serve the float32 model")


def check_precision(precision: str, allowed: Sequence[str] = PRECISIONS, what: str = "") -> str:
    if precision not in allowed:
        where = f" for {what}" if what else ""
        raise GlitError(f"unknown precision '{precision}'{where} (precisions: {', '.join(allowed)})")
    return precision


class _ArrayReader:
    """onnxruntime's CalibrationDataReader protocol over an array of inputs, a few at a time."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int) -> None:
        self.input_name, self.inputs, self.batch_size = input_name, inputs, batch_size
        self._iter: Iterator[np.ndarray] | None = None

    def _batches(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.inputs), self.batch_size):
            yield np.ascontiguousarray(self.inputs[start:start + self.batch_size], dtype=np.float32)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iter = None


def quantize_onnx(model: bytes, calibration: np.ndarray, recipe: QuantRecipe | None = None,
                  batch_size: int = 16) -> bytes:
    """A float32 ONNX graph (one float input) -> its int8 QDQ graph, calibrated on `calibration`
    (float32 inputs as the model takes them, first axis the samples); `recipe` defaults to `host_recipe()`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim < 2 or len(calibration) == 0:
        raise QuantizationError(f"calibration needs at least one input sample, got an array of shape "
                                f"{calibration.shape}")
    if not np.isfinite(calibration).all():
        raise QuantizationError("calibration inputs hold NaN or infinite values")
    recipe = recipe or host_recipe()
    proto = onnx.load_from_string(model)
    input_name = proto.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="glit-quant-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(proto, str(prepared), skip_symbolic_shape=False)
            quantize_static(str(prepared), str(quantized), _ArrayReader(input_name, calibration, batch_size),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(recipe.op_types),
                            per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                            activation_type=getattr(QuantType, recipe.activation_type),
                            weight_type=getattr(QuantType, recipe.weight_type),
                            calibrate_method=getattr(CalibrationMethod, recipe.calibrate_method),
                            extra_options=dict(recipe.extra_options))
        except GlitError:
            raise
        except Exception as exc:  # onnxruntime's quantizer raises many kinds on graphs it cannot handle
            raise QuantizationError(f"onnxruntime could not quantize the model: {exc.__class__.__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        return quantized.read_bytes()


def random_calibration(example_shape: Sequence[int], samples: int = 8, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """Inputs for quantizing a graph only to time it (a latency-table block): the scales they give do
    not change the speed, only which tensors are quantized does."""
    shape = (samples, *tuple(example_shape)[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def calibration_images(dataset: Any, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED
                       ) -> np.ndarray:
    """`count` images of a dataset (a DataBundle's `calib`: training images, evaluation transform),
    drawn without replacement by `seed`, as the float32 NCHW array the model takes."""
    total = len(dataset)
    if total == 0:
        raise QuantizationError("the calibration split holds no images")
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))
    return np.stack([np.asarray(dataset[int(i)][0], dtype=np.float32) for i in picks])


def deployable_graph(model: Any, example: Any, precision: str = "fp32", calibration: np.ndarray | None = None,
                     recipe: QuantRecipe | None = None) -> bytes:
    """The deployed graph at a precision: `export.onnx.deployable_onnx`, quantized for int8 with
    `calibration` (random inputs when None: for timing only)."""
    from glit_deploy.export.onnx import deployable_onnx

    check_precision(precision)
    graph = deployable_onnx(model, example)
    if precision == "fp32":
        return graph
    if calibration is None:
        calibration = random_calibration(tuple(example.shape))
    return quantize_onnx(graph, calibration, recipe)


def graph_predictions(model: bytes | Path, dataset: Any, batch_size: int = 64, threads: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 class per image, label per image) of an ONNX graph on every image of `dataset`, on
    onnxruntime's CPU provider: how the int8 gate and `--quant-eval` score a graph."""
    from torch.utils.data import DataLoader

    from glit_deploy.runtimes import ort_session

    session = ort_session(model, threads=threads)
    name = session.get_inputs()[0].name
    predictions, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = session.run(None, {name: x.numpy().astype(np.float32)})[0]
        predictions.append(logits.argmax(-1))
        labels.append(np.asarray(y))
    if not predictions:
        raise QuantizationError("the validation split holds no images")
    return np.concatenate(predictions), np.concatenate(labels)


@dataclass(frozen=True)
class AccuracyGate:
    """What an int8 model must keep of its float32 model on the validation split (logit parity does
    not apply to int8): top-1 may drop at most `max_drop` points, and the two must agree on the
    top-1 class of at least `min_agreement` of the images."""

    max_drop: float = 0.5
    min_agreement: float = 0.97

    def judge(self, fp32_pred: np.ndarray, int8_pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        fp32_top1 = 100.0 * float((fp32_pred == labels).mean())
        int8_top1 = 100.0 * float((int8_pred == labels).mean())
        agreement = float((fp32_pred == int8_pred).mean())
        drop = fp32_top1 - int8_top1
        failures = []
        if drop > self.max_drop + 1e-9:
            failures.append(f"top-1 dropped {drop:.2f} points ({fp32_top1:.2f} % -> {int8_top1:.2f} %), "
                            f"more than {self.max_drop:g}")
        if agreement < self.min_agreement:
            failures.append(f"int8 agrees with float32 on {100 * agreement:.2f} % of the images, under "
                            f"{100 * self.min_agreement:g} %")
        return {"images": len(labels), "fp32_top1": round(fp32_top1, 4), "int8_top1": round(int8_top1, 4),
                "drop_points": round(drop, 4), "agreement": round(agreement, 6), "max_drop": self.max_drop,
                "min_agreement": self.min_agreement, "passed": not failures, "failures": failures}
