"""The TensorRT path: the graph each precision builds from, the shared timing cache's guard, profile
checks and engine options. TensorRT is not installed on CI, so the tests without it check what is
plain Python and ONNX (they build no engine); the engine tests need TensorRT and a GPU, and skip
without them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from glit_deploy.errors import GlitError
from glit_deploy.export.tensorrt import (
    EngineOptions,
    SharedTimingCache,
    check_tensorrt_qdq,
    outside_profile_message,
    shape_in_profile,
    tensorrt_graph,
    timing_cache_name,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt_gpu = pytest.mark.skipif(not HAS_TENSORRT or not torch.cuda.is_available(),
                                        reason="needs TensorRT and an NVIDIA GPU")


@pytest.fixture(scope="module")
def digits_model() -> tuple[torch.nn.Module, bytes, torch.Tensor]:
    """An untrained digits GLiT with attention and locality in every block, and its float32 ONNX."""
    from glit_deploy.export.onnx import export_onnx
    from glit_deploy.export.rewrite import prepare_for_export
    from glit_deploy.nn import GLiT
    from glit_deploy.space import get_space

    torch.manual_seed(0)
    space = get_space("digits")
    model = GLiT(space.with_split([1] * space.depth), space, 10).eval()
    x = torch.randn(8, 3, 8, 8)
    return model, export_onnx(prepare_for_export(model)[0], x[:1]), x


# --- the graph TensorRT builds for a precision ---------------------------------------------------------

def test_int8_graph_is_symmetric_int8_qdq_with_float_biases(digits_model: Any) -> None:
    import onnx
    from onnx import numpy_helper

    model, fp32, x = digits_model
    graph = tensorrt_graph(fp32, "int8")
    check_tensorrt_qdq(graph)
    assert tensorrt_graph(graph, "int8") == graph  # a buildable Q/DQ graph is taken as it is
    proto = onnx.load_from_string(graph).graph
    initializers = {t.name: t for t in proto.initializer}
    qdq = [n for n in proto.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {n.op_type for n in qdq} == {"QuantizeLinear", "DequantizeLinear"}
    assert any(n.input[0] in initializers for n in qdq if n.op_type == "DequantizeLinear")  # int8 weights
    for node in qdq:
        zero_point = initializers[node.input[2]]
        assert zero_point.data_type == onnx.TensorProto.INT8
        assert not numpy_helper.to_array(zero_point).any()
    matmuls = [n for n in proto.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    producers = {o: n.op_type for n in proto.node for o in n.output}
    assert all(producers.get(i) == "DequantizeLinear" for n in matmuls for i in n.input[:2])  # all quantized
    # The graph is the model: run as the ONNX operators define it (no graph optimisation, so onnxruntime does not
    # fuse the Q/DQ pairs into its int8 kernels, whose u8 x s8 products saturate on x86 CPUs without VNNI), it is
    # close to float32 (random calibration, random weights).
    import onnxruntime as ort

    with torch.no_grad():
        reference = model(x).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()


def test_onnxruntime_cpu_int8_graph_is_refused_with_the_reason(digits_model: Any) -> None:
    from glit_deploy.quant import quantize_onnx, random_calibration

    _, fp32, _ = digits_model
    cpu_graph = quantize_onnx(fp32, random_calibration((1, 3, 8, 8)))  # uint8 activations, int32 biases
    with pytest.raises(GlitError, match="only symmetric int8 Q/DQ") as err:
        check_tensorrt_qdq(cpu_graph)
    assert "UINT8" in str(err.value) or "INT32" in str(err.value)
    with pytest.raises(GlitError, match="only symmetric int8 Q/DQ"):
        tensorrt_graph(cpu_graph, "int8")  # a Q/DQ graph is taken as it is only when TensorRT can build it
    with pytest.raises(GlitError, match="already quantized: a TensorRT fp16 engine is built from the float32"):
        tensorrt_graph(cpu_graph, "fp16")


def test_fp32_graph_is_the_export_and_precisions_are_checked(digits_model: Any) -> None:
    _, fp32, _ = digits_model
    assert tensorrt_graph(fp32, "fp32") == fp32
    with pytest.raises(GlitError, match="unknown precision 'bf16' for TensorRT"):
        tensorrt_graph(fp32, "bf16")


# --- engine options, profiles, timing cache ------------------------------------------------------------

def test_engine_options_precision() -> None:
    assert EngineOptions().precision == "fp32"
    assert EngineOptions(fp16=True).precision == "fp16"  # the CLI's --fp16
    int8 = EngineOptions(precision="int8").thresholds()
    assert int8.min_agreement == 0.97 and int8.max_abs_diff == float("inf")
    assert EngineOptions(precision="fp16", min_agreement=0.5).thresholds().min_agreement == 0.5
    with pytest.raises(GlitError, match="unknown precision 'fp8' for TensorRT"):
        EngineOptions(precision="fp8")
    with pytest.raises(GlitError, match="--fp16 contradicts precision int8"):
        EngineOptions(precision="int8", fp16=True)


def test_a_shape_outside_the_profile_is_named_with_the_range() -> None:
    profile = [(1, 3, 8, 8), (8, 3, 8, 8), (16, 3, 8, 8)]
    assert shape_in_profile((1, 3, 8, 8), profile) and shape_in_profile((16, 3, 8, 8), profile)
    assert not shape_in_profile((17, 3, 8, 8), profile)
    assert not shape_in_profile((4, 3, 16, 16), profile)
    assert not shape_in_profile((4, 3, 8), profile)
    message = outside_profile_message("input", (17, 3, 8, 8), profile)
    assert "(17, 3, 8, 8)" in message and "(1, 3, 8, 8) to (16, 3, 8, 8)" in message
    assert "batch 17; this engine takes 1..16" in message and "--max-batch" in message


def test_timing_cache_names_separate_versions_and_gpus() -> None:
    h100 = timing_cache_name("10.13.3", "NVIDIA H100 80GB HBM3", (9, 0))
    assert h100 == "trt-10.13.3-nvidia-h100-80gb-hbm3-sm90.timing-cache"
    assert timing_cache_name("11.1.0", "NVIDIA H100 80GB HBM3", (9, 0)) != h100
    assert timing_cache_name("10.13.3", "NVIDIA A10G", (8, 6)) != h100
    assert "/" not in timing_cache_name("10.0.1", "GPU/../x", (8, 0))


class _TimingCacheConfig:
    """Stands for the timing-cache part of IBuilderConfig as TensorRT documents it, nothing more:
    create_timing_cache gives None for a blob it cannot read, set_timing_cache(ignore_mismatch=False)
    gives False for a cache from a device with other properties. It builds nothing."""

    def __init__(self, readable: bool = True, same_device: bool = True) -> None:
        self.readable, self.same_device, self.attached = readable, same_device, None

    def create_timing_cache(self, blob: bytes) -> Any:
        if blob and not self.readable:
            return None
        return _Cache(bytes(blob))

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # never accept another GPU's timings
        if cache.blob and not self.same_device:
            return False
        self.attached = cache
        return True


class _Cache:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def serialize(self) -> bytes:
        return self.blob or b"fresh"


@pytest.mark.parametrize("config, why", [(_TimingCacheConfig(readable=False), "another TensorRT version"),
                                         (_TimingCacheConfig(same_device=False), "GPU with other properties")])
def test_an_unusable_timing_cache_starts_afresh_with_a_warning(tmp_path: Path, config: Any, why: str) -> None:
    path = tmp_path / "trt.timing-cache"
    path.write_bytes(b"timings from elsewhere")
    warnings: list[str] = []
    cache = SharedTimingCache(path, warn=warnings.append)
    cache.attach(config)
    assert cache.started_fresh and len(warnings) == 1 and why in warnings[0] and str(path) in warnings[0]
    assert config.attached.blob == b""  # the build goes on with an empty cache
    second = _TimingCacheConfig()
    cache.attach(second)  # every later build shares the same cache object
    assert second.attached is config.attached and len(warnings) == 1
    cache.save()
    assert path.read_bytes() == b"fresh"  # the unusable file is replaced


def test_a_usable_timing_cache_is_loaded_and_saved(tmp_path: Path) -> None:
    path = tmp_path / "trt.timing-cache"
    warnings: list[str] = []
    with SharedTimingCache(path, warn=warnings.append) as cache:
        cache.save()
        assert not path.exists()  # nothing built, nothing written
        config = _TimingCacheConfig()
        cache.attach(config)
    assert path.read_bytes() == b"fresh" and not warnings
    again = SharedTimingCache(path, warn=warnings.append)
    config = _TimingCacheConfig()
    again.attach(config)
    assert config.attached.blob == b"fresh" and not again.started_fresh and not warnings


# --- engines (TensorRT and a GPU) ----------------------------------------------------------------------

@needs_tensorrt_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_of_each_precision_share_one_timing_cache(digits_model: Any, tmp_path: Path, precision: str
                                                          ) -> None:
    from glit_deploy.export.tensorrt import EngineBuilder, TensorRTRunner, build_engine, timing_cache_path

    model, fp32, x = digits_model
    path = timing_cache_path(tmp_path)
    with SharedTimingCache(path) as cache:
        builder = EngineBuilder(cache)
        profile = {"input": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))}
        plan = build_engine(fp32, profile=profile, precision=precision, builder=builder)
        build_engine(fp32, shapes={"input": (2, 3, 8, 8)}, precision=precision, builder=builder)
    assert builder.engines == 2 and path.stat().st_size > 0 and not cache.started_fresh
    runner = TensorRTRunner(plan)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = runner.infer({"input": x.cuda()}, stream)["output"]
    stream.synchronize()
    with torch.no_grad():
        reference = model(x).numpy()
    limit = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.05 * np.abs(reference).max()}[precision]
    assert np.abs(got.float().cpu().numpy() - reference).max() < limit
    with pytest.raises(GlitError, match=r"\(9, 3, 8, 8\) is outside the TensorRT engine's profile"):
        runner.infer({"input": torch.randn(9, 3, 8, 8, device="cuda")}, stream)
