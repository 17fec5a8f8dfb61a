"""TensorRT engines from ONNX, with the TensorRT >= 10 named-tensor API (imported lazily).

TensorRT 10 removed the binding-index API (use tensor names), `build_engine` (use
`build_serialized_network`) and implicit batch; TensorRT 11 builds strongly typed networks only,
so precision comes from the ONNX model itself.

Precision:
- fp32: TF32 is switched off (TensorRT 10 allows it by default), so the engine matches onnxruntime.
- fp16 on TensorRT >= 11: the ONNX model is converted to float16 (onnxruntime's converter) except
  LayerNormalization and Softmax, which stay float32 with casts around them; inputs and outputs stay
  float32. The network is strongly typed, so those types are what runs.
- fp16 on TensorRT 10: the float32 ONNX, the FP16 builder flag, and precision constraints
  (obeyed) that keep the normalization and softmax layers in float32.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glit_deploy.errors import GlitError
from glit_deploy.runtimes import import_onnxruntime, import_tensorrt, require_cuda

WORKSPACE_BYTES = 1 << 30
ENGINE_FILE = "model.engine"
ENGINE_INFO = "model.engine.json"
FP16_ONNX_FILE = "model.fp16.onnx"
TIMING_CACHE_FILE = "trt-timing.cache"
FLOAT32_OPS = ("LayerNormalization", "Softmax")  # kept in float32 in fp16 engines
PRECISIONS = ("fp32", "fp16")

ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def tensorrt_major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def _network_flags(trt: Any) -> int:
    if tensorrt_major(trt) >= 11:
        # Always strongly typed from 11 on; the flag is accepted (and ignored) where it still exists.
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 1 << int(flag) if flag is not None else 0
    return 0  # explicit batch is the only mode from TensorRT 10 on; weakly typed so builder flags apply


def build_engine(onnx_model: bytes, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 profile: Mapping[str, ShapeRange] | None = None,
                 timing_cache: bytes | None = None) -> bytes:
    """Build a serialized engine (plan). `shapes` fixes input shapes; `profile` gives (min, opt, max)."""
    return build_engine_with_cache(onnx_model, shapes, profile, timing_cache)[0]


def build_engine_with_cache(onnx_model: bytes, shapes: Mapping[str, tuple[int, ...]] | None = None,
                            profile: Mapping[str, ShapeRange] | None = None, timing_cache: bytes | None = None,
                            precision: str = "fp32") -> tuple[bytes, bytes]:
    """Build a plan; return it with the serialized timing cache (the loaded one plus what this build timed)."""
    trt = import_tensorrt()
    require_cuda("building a TensorRT engine")
    if precision not in PRECISIONS:
        raise GlitError(f"unknown precision '{precision}' ({', '.join(PRECISIONS)})")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GlitError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)  # float32 means float32: parity with onnxruntime at 1e-4-ish
    if precision == "fp16" and tensorrt_major(trt) < 11:
        _fp16_with_float32_islands(trt, network, config)
    cache = config.create_timing_cache(timing_cache or b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")  # a cache from another TensorRT or GPU: start afresh
        config.set_timing_cache(cache, ignore_mismatch=False)
    ranges = dict(profile or {})
    for name, shape in (shapes or {}).items():
        ranges[name] = (shape, shape, shape)
    if ranges:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in ranges.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GlitError("TensorRT failed to build the engine (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _fp16_with_float32_islands(trt: Any, network: Any, config: Any) -> None:
    """TensorRT 10 (weakly typed): fp16 everywhere allowed, normalization and softmax pinned to float32."""
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    keep = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in keep:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def fp16_onnx(model: bytes) -> bytes:
    """The float16 version of a float32 ONNX model, with FLOAT32_OPS and the inputs/outputs in float32."""
    import onnx
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
            self.context.set_input_shape(name, tuple(x.shape))
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
    fp16: bool = False
    max_batch: int = 32
    opt_batch: int = 0  # 0: min(8, max_batch)
    max_abs_diff: float | None = None  # None: the precision's default
    min_agreement: float | None = None

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def thresholds(self) -> Any:
        from glit_deploy.export.parity import Thresholds

        # Against onnxruntime float32: fp32 kernels differ in summation order only; fp16 rounds
        # activations to 11 significant bits, so logits move by ~1e-2 and a near-tie may flip.
        default = Thresholds(1e-3, 1.0) if not self.fp16 else Thresholds(5e-2, 0.99)
        return Thresholds(default.max_abs_diff if self.max_abs_diff is None else self.max_abs_diff,
                          default.min_agreement if self.min_agreement is None else self.min_agreement)


def build_run_engine(run: Any, options: EngineOptions, report: Callable[[str], None] | None = None,
                     label: str | None = None) -> dict[str, Any]:
    """Build export/model.engine from the run's export/model.onnx; check parity; write the sidecar."""
    from glit_deploy.export.onnx_export import ONNX_FILE, REJECTED_DIR, ensure_onnx, export_dir, sha256_file
    from glit_deploy.export.parity import ParityError, compare_logits, ort_runner, session_logits, validation_images
    from glit_deploy.rundir import atomic_write, atomic_write_json
    from glit_deploy.runtimes import ort_session

    trt = import_tensorrt()  # fail first, with one line, where TensorRT or the GPU is missing
    require_cuda("building a TensorRT engine")
    if options.max_batch < 1:
        raise GlitError("--max-batch must be at least 1")
    report = report or (lambda _msg: None)
    exported = ensure_onnx(run, label, report)
    out = export_dir(run)
    onnx_model = (out / ONNX_FILE).read_bytes()
    meta = exported.sidecar["metadata"]
    input_name, output_name = meta["input_name"], meta["output_name"]
    chw = (3, meta["image_size"], meta["image_size"])
    opt_batch = options.opt_batch or min(8, options.max_batch)
    profile = {input_name: ((1, *chw), (min(opt_batch, options.max_batch), *chw), (options.max_batch, *chw))}

    built_from = onnx_model
    files: dict[str, Any] = {}
    if options.fp16 and tensorrt_major(trt) >= 11:
        report("converting the ONNX model to float16 (LayerNorm and softmax stay float32)")
        built_from = fp16_onnx(onnx_model)
        atomic_write(out / FP16_ONNX_FILE, lambda tmp: tmp.write_bytes(built_from))
        files["fp16_onnx"] = {"file": FP16_ONNX_FILE, "sha256": hashlib.sha256(built_from).hexdigest()}

    cache_path = out / TIMING_CACHE_FILE
    report(f"building a TensorRT {trt.__version__} {options.precision} engine (batch 1..{options.max_batch})")
    started = time.perf_counter()
    plan, cache = build_engine_with_cache(built_from, profile=profile,
                                          timing_cache=cache_path.read_bytes() if cache_path.exists() else None,
                                          precision=options.precision)
    build_seconds = time.perf_counter() - started
    atomic_write(cache_path, lambda tmp: tmp.write_bytes(cache))

    report("parity against onnxruntime")
    runner = TensorRTRunner(plan)
    ort = import_onnxruntime()
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() \
        else "CPUExecutionProvider"
    session = ort_session(onnx_model, provider)
    images = validation_images(exported.sidecar["source"].get("data") or _data_spec(run, label),
                               meta["image_size"], exported.sidecar["options"]["parity_images"])
    reference = session_logits(ort_runner(session), images, options.max_batch)
    stream = torch.cuda.Stream()

    def run_trt(batch: Any) -> Any:
        with torch.cuda.stream(stream):
            result = runner.infer({input_name: torch.from_numpy(batch).cuda()}, stream)[output_name]
        stream.synchronize()
        return result.float().cpu().numpy()

    parity = compare_logits(reference, session_logits(run_trt, images, options.max_batch), options.thresholds(),
                            f"TensorRT {trt.__version__} {options.precision} vs onnxruntime {ort.__version__} "
                            f"{provider} (float32)")
    major, minor = torch.cuda.get_device_capability()
    sidecar = {
        "status": "ok" if parity.passed else "failed",
        "file": ENGINE_FILE,
        "sha256": hashlib.sha256(plan).hexdigest(),
        "bytes": len(plan),
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "cuda": torch.version.cuda,
        "precision": options.precision,
        "precision_mode": ("strongly typed float16 ONNX, LayerNormalization/Softmax float32"
                           if options.fp16 and tensorrt_major(trt) >= 11 else
                           "FP16 flag + obeyed float32 constraints on normalization/softmax layers"
                           if options.fp16 else "float32, TF32 off"),
        "profile": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in
                    profile.items()},
        "io": {name: {"dtype": str(runner.engine.get_tensor_dtype(name)),
                      "shape": list(runner.engine.get_tensor_shape(name))} for name in runner.inputs + runner.outputs},
        "onnx": {"file": ONNX_FILE, "sha256": sha256_file(out / ONNX_FILE)},
        **files,
        "timing_cache": TIMING_CACHE_FILE,
        "build_seconds": round(build_seconds, 1),
        "parity": parity.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    target = out if parity.passed else out / REJECTED_DIR
    atomic_write(target / ENGINE_FILE, lambda tmp: tmp.write_bytes(plan))  # the plan exactly as built
    atomic_write_json(target / ENGINE_INFO, sidecar)
    if not parity.passed:
        raise ParityError(f"TensorRT parity check failed: {parity.failure()}. The engine was not installed; it is "
                          f"kept for inspection in {target / ENGINE_FILE}")
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
