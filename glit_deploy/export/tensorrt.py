"""TensorRT engines from ONNX, with the TensorRT >= 10 named-tensor API (imported lazily).

TensorRT 10 removed the binding-index API (use tensor names), `build_engine` (use
`build_serialized_network`) and implicit batch; TensorRT 11 builds strongly typed networks only
(its NetworkDefinitionCreationFlag.STRONGLY_TYPED is deprecated and ignored) and removed the
precision builder flags (BuilderFlag.FP16, INT8, OBEY/PREFER_PRECISION_CONSTRAINTS).

Precision therefore comes from the ONNX graph, on 10 and 11 alike: every network here is strongly
typed (the STRONGLY_TYPED flag on 10, the only mode on 11), and `tensorrt_graph` is the one
definition of the graph TensorRT builds for a precision:
- fp32: the float32 ONNX. TF32 is switched off (TensorRT allows it by default), so the engine
  matches onnxruntime.
- fp16: the ONNX converted to float16 by onnxruntime's converter, except LayerNormalization and
  Softmax, which stay float32 with casts around them; inputs and outputs stay float32.
- int8: explicit quantization, the float32 ONNX with QuantizeLinear/DequantizeLinear pairs from
  `glit_deploy.quant.quantize_onnx` (onnxruntime's static QDQ quantizer) with a TensorRT recipe:
  int8 activations and weights, both symmetric, because TensorRT's parser accepts only zero points
  of 0 (onnx-tensorrt docs/operators.md: QuantizeLinear "y_zero_point must be 0"). What is not
  quantized runs in float32.
Builder flags, for the record: a weakly typed TensorRT 10 network needs BuilderFlag.FP16 to run
float16 kernels and BuilderFlag.INT8 to build its Q/DQ layers in int8 (both deprecated in 10.12,
removed in 11); a strongly typed network must not set them (the builder rejects it as an API usage
error), so none is set here.

A latency table builds about 250 engines (every block configuration, then the calibration and
held-out models): `EngineBuilder` keeps one TensorRT builder and one `SharedTimingCache` for all of
them, so a layer shape timed once is not timed again, and the cache file survives to the next table.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glit_deploy.errors import GlitError
from glit_deploy.runtimes import import_onnxruntime, import_tensorrt, require_cuda

WORKSPACE_BYTES = 1 << 30
ENGINE_FILE = "model.engine"
ENGINE_INFO = "model.engine.json"
PRECISION_ONNX_FILES = {"fp16": "model.fp16.onnx", "int8": "model.trt-int8.onnx"}  # the graph an engine was built from
TIMING_CACHE_FILE = "trt-timing.cache"
FLOAT32_OPS = ("LayerNormalization", "Softmax")  # kept in float32 in fp16 engines
PRECISIONS = ("fp32", "fp16", "int8")
SAVE_EVERY_S = 60.0  # a table's shared cache is written at most this often (and when it is closed)

ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
Warn = Callable[[str], None]


def tensorrt_major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def check_precision(precision: str) -> str:
    from glit_deploy.quant import check_precision as check

    return check(precision, PRECISIONS, "TensorRT")


def _network_flags(trt: Any) -> int:
    if tensorrt_major(trt) >= 11:
        return 0  # always strongly typed; the deprecated flag is ignored
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _warn(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text.assemble(("warning:", "yellow"), f" {message}"), soft_wrap=True)


# --- the graph TensorRT builds for a precision -------------------------------------------------------

def tensorrt_graph(model: bytes, precision: str, calibration: np.ndarray | None = None) -> bytes:
    """The ONNX graph a `precision` engine is built from, given the float32 graph `model`.

    int8: quantized with `calibration` (float32 inputs, first axis the samples); None calibrates on
    random inputs, which is enough to time the graph (speed depends on which tensors are quantized,
    not on the scales) but never to judge its accuracy. A `model` that is already a Q/DQ graph is
    taken as it is for int8 when TensorRT can build it (see check_tensorrt_qdq)."""
    check_precision(precision)
    if _quantized(model):
        if precision != "int8":
            raise GlitError(f"the ONNX model is already quantized: a TensorRT {precision} engine is built from the "
                            f"float32 export")
        check_tensorrt_qdq(model)
        return model
    if precision == "fp32":
        return model
    if precision == "fp16":
        return fp16_onnx(model)
    from glit_deploy.quant import quantize_onnx, random_calibration

    if calibration is None:
        calibration = random_calibration(_input_shape(model))
    graph = quantize_onnx(model, calibration, tensorrt_int8_recipe())
    check_tensorrt_qdq(graph)
    return graph


def tensorrt_int8_recipe() -> Any:
    """glit_deploy.quant's recipe (same operators, per-channel weights, calibration method) with what
    TensorRT needs: signed int8 activations and weights, symmetric (zero points 0), as onnxruntime's
    quantize_static docs recommend for TensorRT ("symmetric QInt8 for both activations and weights
    when targeting GPU/TRT"); and biases left in float32 (QuantizeBias False), since onnxruntime
    would quantize them to int32, a DequantizeLinear input type TensorRT's parser does not take
    (INT8, FP8, INT4 only)."""
    from glit_deploy.quant import DEFAULT_RECIPE

    return replace(DEFAULT_RECIPE, activation_type="QInt8", weight_type="QInt8",
                   extra_options={**DEFAULT_RECIPE.extra_options, "ActivationSymmetric": True,
                                  "WeightSymmetric": True, "QuantizeBias": False})


def check_tensorrt_qdq(model: bytes) -> None:
    """Raise GlitError unless every Q/DQ pair of `model` is one TensorRT can build: a constant zero
    point, of type int8, all zeros (TensorRT quantizes symmetrically; a uint8 or non-zero zero point
    fails its ONNX parser, or, without a zero point, would change the ONNX meaning to uint8)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model).graph
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    bad: list[str] = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            quantized = node.input[0] if node.op_type == "DequantizeLinear" else None
            if quantized in constants and constants[quantized].data_type == onnx.TensorProto.INT8:
                continue  # int8 weights dequantized with the default zero point 0
            bad.append(f"{label} has no zero point (uint8 by the ONNX definition)")
        elif zero_point not in constants:
            bad.append(f"{label}: zero point '{zero_point}' is computed, not a constant")
        elif constants[zero_point].data_type != onnx.TensorProto.INT8:
            kind = onnx.TensorProto.DataType.Name(constants[zero_point].data_type)
            bad.append(f"{label}: zero point of type {kind}, not INT8")
        elif np.any(numpy_helper.to_array(constants[zero_point]) != 0):
            bad.append(f"{label}: non-zero zero point (asymmetric quantization)")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise GlitError("TensorRT builds only symmetric int8 Q/DQ graphs (zero points int8 and 0): "
                        + "; ".join(bad[:3]) + more)


def _quantized(model: bytes) -> bool:
    import onnx

    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv")
               for n in onnx.load_from_string(model).graph.node)


def _input_shape(model: bytes) -> tuple[int, ...]:
    """The first input's shape with batch 1 (the other axes must be static)."""
    import onnx

    graph = onnx.load_from_string(model).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if any(d <= 0 for d in dims[1:]):
        raise GlitError(f"input '{graph.input[0].name}' has shape {dims}: only the batch axis may be dynamic")
    return (1, *dims[1:])


def fp16_onnx(model: bytes) -> bytes:
    """The float16 version of a float32 ONNX model, with FLOAT32_OPS and the inputs/outputs in float32."""
    import onnx

    import_onnxruntime()  # the converter ships with onnxruntime: one clear line when it is missing
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True,
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FLOAT32_OPS])
    _topological_sort(converted.graph)  # the converter appends its input casts after their consumers
    return converted.SerializeToString()


def _topological_sort(graph: Any) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise GlitError("the float16 ONNX graph has a cycle or a dangling input")
        for node in ready:
            available.update(node.output)
        ordered += ready
        pending = [n for n in pending if not any(n is r for r in ready)]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


# --- building: one builder and one timing cache for many engines ---------------------------------------

def timing_cache_name(tensorrt_version: str, gpu: str, capability: tuple[int, int]) -> str:
    """A cache file per TensorRT version and GPU, so machines sharing a cache directory do not keep
    replacing each other's cache (the guard in SharedTimingCache still covers any mismatch)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-").lower() or "gpu"
    return f"trt-{tensorrt_version}-{slug}-sm{capability[0]}{capability[1]}.timing-cache"


def timing_cache_path(directory: Path) -> Path:
    """The timing cache file in `directory` for the TensorRT and GPU of this process."""
    trt = import_tensorrt()
    require_cuda("a TensorRT timing cache")
    return Path(directory) / timing_cache_name(trt.__version__, torch.cuda.get_device_name(),
                                               torch.cuda.get_device_capability())


class SharedTimingCache:
    """One TensorRT timing cache shared by every engine built through it, kept in the file `path`.

    While building, TensorRT times the candidate kernels of every layer; the cache keeps those
    timings, so a layer met again (same type, shapes, precision) is not timed again. One
    ITimingCache object is attached to every build's config: TensorRT documents it as shareable by
    several builders and adds each build's timings to it.

    A cache file TensorRT cannot use starts an empty cache, with a warning, and is replaced at the
    next save: `create_timing_cache` returns None (or raises) for a blob it cannot read (another
    TensorRT version, a damaged file), and `set_timing_cache(..., ignore_mismatch=False)` returns
    False for a cache made on a device with other properties. ignore_mismatch=True would accept such
    a cache, and timings from another GPU can make a build fail inside TensorRT (NVIDIA/TensorRT#2144).
    Polygraphy also loads with ignore_mismatch=False, and merges caches with `combine`, which skips
    a cache from another TensorRT version and returns False.
    """

    def __init__(self, path: Path | None = None, warn: Warn | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.warn = warn or _warn
        self.started_fresh = False  # True when a cache file existed but could not be used
        self._cache: Any = None
        self._last_save = time.monotonic()

    def _load(self, config: Any) -> Any:
        blob = b""
        if self.path is not None and self.path.exists():
            try:
                blob = self.path.read_bytes()
            except OSError as exc:
                self._fresh(f"could not read the TensorRT timing cache {self.path} ({exc})")
        if blob:
            try:
                cache = config.create_timing_cache(blob)
            except Exception as exc:  # the bindings raise for some blobs instead of returning None
                cache = None
                self._fresh(f"TensorRT could not read the timing cache {self.path} ({exc.__class__.__name__}: "
                            f"{exc}): it was written by another TensorRT version or is damaged")
            else:
                if cache is None:
                    self._fresh(f"TensorRT could not read the timing cache {self.path}: it was written by another "
                                f"TensorRT version or is damaged")
            if cache is not None:
                return cache
        return config.create_timing_cache(b"")

    def _fresh(self, why: str) -> None:
        self.started_fresh = True
        self.warn(f"{why}; starting an empty timing cache (it replaces the file when saved)")

    def attach(self, config: Any) -> None:
        """Use (and grow) this cache in the build `config` describes."""
        if self._cache is None:
            cache = self._load(config)
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                self._fresh(f"the TensorRT timing cache {self.path} was made on a GPU with other properties")
                cache = config.create_timing_cache(b"")
                if not config.set_timing_cache(cache, ignore_mismatch=False):
                    raise GlitError("TensorRT refused an empty timing cache (see its log above)")
            self._cache = cache
        elif not config.set_timing_cache(self._cache, ignore_mismatch=False):
            raise GlitError("TensorRT refused the timing cache it built in this process (see its log above)")

    def serialized(self) -> bytes:
        """The cache as bytes (empty before the first build)."""
        return b"" if self._cache is None else bytes(memoryview(self._cache.serialize()))

    def save(self) -> None:
        """Write the cache to `path` atomically (nothing without a path or before the first build)."""
        from glit_deploy.atomic_io import atomic_write

        self._last_save = time.monotonic()
        if self.path is None or self._cache is None:
            return
        blob = self.serialized()
        atomic_write(self.path, lambda tmp: tmp.write_bytes(blob))

    def save_now_and_then(self, every_s: float = SAVE_EVERY_S) -> None:
        """Save when the last save is more than `every_s` old: a table of ~250 builds loses at most
        a minute of timings when killed, without writing a growing file 300 times."""
        if time.monotonic() - self._last_save >= every_s:
            self.save()

    def __enter__(self) -> SharedTimingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.save()


class EngineBuilder:
    """Builds TensorRT plans with one builder and one SharedTimingCache (creating a TensorRT builder
    loads its kernel library, which takes seconds: a table should pay that once, not per engine)."""

    def __init__(self, timing_cache: SharedTimingCache | None = None) -> None:
        trt = import_tensorrt()
        require_cuda("building a TensorRT engine")
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.timing_cache = timing_cache if timing_cache is not None else SharedTimingCache()
        self.engines = 0
        self.build_seconds = 0.0  # parse + build, summed over this builder's engines

    def build(self, graph: bytes, shapes: Mapping[str, tuple[int, ...]] | None = None,
              profile: Mapping[str, ShapeRange] | None = None) -> bytes:
        """A serialized engine (plan) of `graph`, an ONNX model already at its precision (see
        `tensorrt_graph`). `shapes` fixes input shapes; `profile` gives (min, opt, max)."""
        trt = self.trt
        started = time.perf_counter()
        network = self.builder.create_network(_network_flags(trt))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(graph):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise GlitError(f"TensorRT could not parse the ONNX model: {errors}")
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        config.clear_flag(trt.BuilderFlag.TF32)  # float32 means float32: parity with onnxruntime
        self.timing_cache.attach(config)
        ranges = dict(profile or {})
        for name, shape in (shapes or {}).items():
            ranges[name] = (tuple(shape), tuple(shape), tuple(shape))
        if ranges:
            opt_profile = self.builder.create_optimization_profile()
            for name, (lo, opt, hi) in ranges.items():
                opt_profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(opt_profile)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise GlitError("TensorRT failed to build the engine (see its log above)")
        self.engines += 1
        self.build_seconds += time.perf_counter() - started
        self.timing_cache.save_now_and_then()
        return bytes(memoryview(plan))


def build_engine(onnx_model: bytes, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 profile: Mapping[str, ShapeRange] | None = None, precision: str = "fp32",
                 calibration: np.ndarray | None = None, builder: EngineBuilder | None = None) -> bytes:
    """A plan of the float32 ONNX `onnx_model` at `precision` (see `tensorrt_graph`). Pass one
    `builder` (EngineBuilder with a SharedTimingCache) to every engine of a table."""
    graph = tensorrt_graph(onnx_model, precision, calibration)
    return (builder or EngineBuilder()).build(graph, shapes, profile)


def shape_in_profile(shape: tuple[int, ...], profile: list[tuple[int, ...]]) -> bool:
    """Whether `shape` lies within an optimization profile's [min, opt, max] range, axis by axis."""
    lo, _opt, hi = profile
    return len(shape) == len(lo) == len(hi) and all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True))


def outside_profile_message(name: str, shape: tuple[int, ...], profile: list[tuple[int, ...]]) -> str:
    lo, _opt, hi = profile
    batch = f" (batch {shape[0]}; this engine takes {lo[0]}..{hi[0]})" if shape and lo and hi else ""
    return (f"input '{name}' of shape {tuple(shape)} is outside the TensorRT engine's profile, "
            f"{tuple(lo)} to {tuple(hi)}{batch}: split the batch, or build the engine again with a larger "
            f"--max-batch")


class TensorRTRunner:
    """Runs a plan on CUDA tensors by tensor name (execute_async_v3)."""

    def __init__(self, plan: bytes) -> None:
        trt = import_tensorrt()
        self._trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise GlitError("TensorRT could not deserialize the engine (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._in: dict[str, torch.Tensor] = {}
        self._out: dict[str, torch.Tensor] = {}

    def input_dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))

    def profile_range(self, name: str, profile: int = 0) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.engine.get_tensor_profile_shape(name, profile)]

    def infer(self, feeds: Mapping[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        for name in self.inputs:
            x = feeds[name].to(self.input_dtype(name)).contiguous()
            self._in[name] = x  # keep a converted copy alive while the engine may still read it
            # Checked here first so the user sees one line, not TensorRT's error log; TensorRT's own
            # answer is checked too (False for any shape it refuses).
            profile = self.profile_range(name)
            if not shape_in_profile(tuple(x.shape), profile) or not self.context.set_input_shape(name, tuple(x.shape)):
                raise GlitError(outside_profile_message(name, tuple(x.shape), profile))
            self.context.set_tensor_address(name, x.data_ptr())
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = self._out.get(name)
            if out is None or tuple(out.shape) != shape:
                dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
                out = self._out[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise GlitError("TensorRT execution failed")
        return dict(self._out)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool, trt.int8: torch.int8}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


# --- `glit export --format trt`: an engine for a run's exported ONNX -----------------------------------

@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp32"
    max_batch: int = 32
    opt_batch: int = 0  # 0: min(8, max_batch)
    max_abs_diff: float | None = None  # None: the precision's default
    min_agreement: float | None = None
    calibration_images: int = 64  # int8: training images the activation ranges are calibrated on
    max_top1_drop: float = 0.5  # int8 gate: validation top-1 points the engine may lose against float32
    fp16: InitVar[bool] = False  # the CLI's --fp16: the same as precision="fp16"

    def __post_init__(self, fp16: bool) -> None:
        check_precision(self.precision)
        if fp16 and self.precision not in ("fp32", "fp16"):
            raise GlitError(f"--fp16 contradicts precision {self.precision}")
        if fp16:
            object.__setattr__(self, "precision", "fp16")

    def thresholds(self) -> Any:
        from glit_deploy.export.parity import Thresholds

        # Against onnxruntime float32: fp32 kernels differ in summation order only; fp16 rounds
        # activations to 11 significant bits, so logits move by ~1e-2 and a near-tie may flip; int8
        # logits are not comparable value by value (issue 13: parity does not apply): the int8
        # export gate holds the top-1 agreement (97 %) and the top-1 drop (max_top1_drop) instead.
        default = {"fp32": Thresholds(1e-3, 1.0), "fp16": Thresholds(5e-2, 0.99),
                   "int8": Thresholds(math.inf, 0.97)}[self.precision]
        return Thresholds(default.max_abs_diff if self.max_abs_diff is None else self.max_abs_diff,
                          default.min_agreement if self.min_agreement is None else self.min_agreement)


PRECISION_MODES = {
    "fp32": "float32 ONNX, TF32 off",
    "fp16": "strongly typed float16 ONNX, LayerNormalization/Softmax float32",
    "int8": "explicit quantization: symmetric int8 Q/DQ ONNX (onnxruntime.quantization), the rest float32",
}


def build_run_engine(run: Any, options: EngineOptions, report: Callable[[str], None] | None = None,
                     label: str | None = None) -> dict[str, Any]:
    """Build export/model.engine from the run's export/model.onnx; check parity; write the sidecar."""
    from glit_deploy.atomic_io import atomic_write, atomic_write_json
    from glit_deploy.export.onnx_export import ONNX_FILE, REJECTED_DIR, ensure_onnx, export_dir, sha256_file
    from glit_deploy.export.parity import ParityError, compare_logits, ort_runner, session_logits, validation_images
    from glit_deploy.runtimes import ort_session

    # Fail first, with one line, where TensorRT, the GPU or onnxruntime (parity, fp16/int8 graphs) is missing.
    trt = import_tensorrt()
    require_cuda("building a TensorRT engine")
    ort = import_onnxruntime()
    if options.max_batch < 1:
        raise GlitError("--max-batch must be at least 1")
    report = report or (lambda _msg: None)
    exported = ensure_onnx(run, label, report)
    out = export_dir(run)
    # an int8 ONNX export (onnxruntime-CPU's QDQ graph) keeps the float32 graph it came from: engines of
    # every precision are built from, and checked against, the float32 graph
    source_file = (exported.sidecar.get("fp32") or {}).get("file", ONNX_FILE)
    onnx_model = (out / source_file).read_bytes()
    meta = exported.sidecar["metadata"]
    input_name, output_name = meta["input_name"], meta["output_name"]
    chw = (3, meta["image_size"], meta["image_size"])
    opt_batch = options.opt_batch or min(8, options.max_batch)
    profile = {input_name: ((1, *chw), (min(opt_batch, options.max_batch), *chw), (options.max_batch, *chw))}
    data = exported.sidecar["source"].get("data") or _data_spec(run, label)

    calibration, dataset = None, None
    files: dict[str, Any] = {}
    if options.precision == "int8":
        from glit_deploy.data import load_data
        from glit_deploy.quant import calibration_images

        report(f"calibrating int8 on {options.calibration_images} training images")
        dataset = load_data(data, meta["image_size"], skip_bad_images=True, report=False)
        calibration = calibration_images(dataset.calib, options.calibration_images)
        files["calibration"] = {"images": len(calibration), "split": "train", "recipe":
                                tensorrt_int8_recipe().to_dict()}
    if options.precision != "fp32":
        report(f"the {options.precision} graph: {PRECISION_MODES[options.precision]}")
    graph = tensorrt_graph(onnx_model, options.precision, calibration)
    if options.precision in PRECISION_ONNX_FILES:
        name = PRECISION_ONNX_FILES[options.precision]
        atomic_write(out / name, lambda tmp: tmp.write_bytes(graph))
        files[f"{options.precision}_onnx"] = {"file": name, "sha256": hashlib.sha256(graph).hexdigest()}

    report(f"building a TensorRT {trt.__version__} {options.precision} engine (batch 1..{options.max_batch})")
    with SharedTimingCache(out / TIMING_CACHE_FILE) as cache:
        builder = EngineBuilder(cache)
        plan = builder.build(graph, profile=profile)

    report("parity against onnxruntime")
    runner = TensorRTRunner(plan)
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() \
        else "CPUExecutionProvider"
    session = ort_session(onnx_model, provider)
    images = validation_images(data, meta["image_size"], exported.sidecar["options"]["parity_images"])
    reference = session_logits(ort_runner(session), images, options.max_batch)
    stream = torch.cuda.Stream()

    def run_trt(batch: Any) -> Any:
        with torch.cuda.stream(stream):
            result = runner.infer({input_name: torch.from_numpy(batch).cuda()}, stream)[output_name]
        stream.synchronize()
        return result.float().cpu().numpy()

    candidate = session_logits(run_trt, images, options.max_batch)
    parity = compare_logits(reference, candidate, options.thresholds(),
                            f"TensorRT {trt.__version__} {options.precision} vs onnxruntime {ort.__version__} "
                            f"{provider} (float32)")
    passed = parity.passed
    if dataset is not None:
        from glit_deploy.quant import AccuracyGate

        # The int8 export gate (glit_deploy.quant.AccuracyGate) on the parity images, the first
        # validation images (see validation_images), and their labels.
        labels = np.array([int(dataset.val[i][1]) for i in range(len(images))])
        gate = AccuracyGate(max_drop=options.max_top1_drop, min_agreement=options.thresholds().min_agreement)
        files["gate"] = gate.judge(reference.argmax(1), candidate.argmax(1), labels)
        passed = passed and files["gate"]["passed"]
    major, minor = torch.cuda.get_device_capability()
    sidecar = {
        "status": "ok" if passed else "failed",
        "file": ENGINE_FILE,
        "sha256": hashlib.sha256(plan).hexdigest(),
        "bytes": len(plan),
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "cuda": torch.version.cuda,
        "precision": options.precision,
        "precision_mode": PRECISION_MODES[options.precision],
        "profile": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in
                    profile.items()},
        "io": {name: {"dtype": str(runner.engine.get_tensor_dtype(name)),
                      "shape": list(runner.engine.get_tensor_shape(name))} for name in runner.inputs + runner.outputs},
        "onnx": {"file": source_file, "sha256": sha256_file(out / source_file)},
        **files,
        "timing_cache": TIMING_CACHE_FILE,
        "timing_cache_started_fresh": cache.started_fresh,
        "build_seconds": round(builder.build_seconds, 1),
        "parity": parity.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    target = out if passed else out / REJECTED_DIR
    atomic_write(target / ENGINE_FILE, lambda tmp: tmp.write_bytes(plan))  # the plan exactly as built
    atomic_write_json(target / ENGINE_INFO, sidecar)
    if not passed:
        reasons = ([] if parity.passed else [parity.failure()]) + files.get("gate", {}).get("failures", [])
        why = "; ".join(reasons)
        raise ParityError(f"TensorRT {options.precision} engine check failed: {why}. The engine was not installed; "
                          f"it is kept for inspection in {target / ENGINE_FILE}")
    run.record_command("export", {"format": "trt", "precision": options.precision, "max_batch": options.max_batch,
                                  "sha256": sidecar["sha256"]})
    return sidecar


def _data_spec(run: Any, label: str | None) -> str:
    from glit_deploy.trained import load_trained_info

    return load_trained_info(run, label).data


def load_engine_info(export_dir: Path) -> dict[str, Any] | None:
    """The sidecar of a good engine in `export_dir`, or None."""
    path = export_dir / ENGINE_INFO
    if not path.exists() or not (export_dir / ENGINE_FILE).exists():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return info if info.get("status") == "ok" else None
