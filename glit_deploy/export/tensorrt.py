"""TensorRT engines from ONNX, with the TensorRT >= 10 named-tensor API (imported lazily).

TensorRT 10 removed the binding-index API (use tensor names), `build_engine` (use
`build_serialized_network`) and implicit batch; TensorRT 11 builds strongly typed networks only,
so precision comes from the ONNX model itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from glit_deploy.errors import GlitError
from glit_deploy.runtimes import import_tensorrt, require_cuda

WORKSPACE_BYTES = 1 << 30


def _network_flags(trt: Any) -> int:
    major = int(trt.__version__.split(".")[0])
    if major >= 11:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # explicit batch is the only mode from TensorRT 10 on


def build_engine(onnx_model: bytes, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 profile: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None,
                 timing_cache: bytes | None = None) -> bytes:
    """Build a serialized engine (plan). `shapes` fixes input shapes; `profile` gives (min, opt, max)."""
    trt = import_tensorrt()
    require_cuda("building a TensorRT engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GlitError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if timing_cache is not None:
        config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False)
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
    return bytes(plan)


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
        self._out: dict[str, torch.Tensor] = {}

    def infer(self, feeds: Mapping[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        for name in self.inputs:
            x = feeds[name].contiguous()
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
