"""Deployment targets: a runtime on a device, and how to time a module on it.

| name       | runtime                                    | timing                                  |
|------------|--------------------------------------------|-----------------------------------------|
| ort-cpu    | onnxruntime, CPUExecutionProvider          | host clock around session.run           |
| ort-cuda   | onnxruntime-gpu, CUDAExecutionProvider     | IO binding (inputs/outputs on the GPU)   |
| ort-trt    | onnxruntime-gpu, TensorrtExecutionProvider | IO binding                               |
| torch-cpu  | PyTorch eager, inference mode              | host clock                               |
| torch-cuda | PyTorch eager on CUDA                      | CUDA events                              |
| trt        | a TensorRT engine built from the ONNX      | CUDA events around execute_async_v3      |

onnxruntime and TensorRT targets time the deployable ONNX graph of a module at the target's
precision (`glit_deploy.quant.deployable_graph`: `export.onnx.deployable_onnx`, quantized for int8;
the graph `glit export` writes), or an ONNX file as it is (`measure_file`). Every timing follows
`glit_deploy.latency.measure`: what the clock reads, estimated from the rounds the host left
undisturbed. A target whose runtime is missing fails with one line naming what to install; it is
never replaced by another.
"""

from __future__ import annotations

import os
import platform
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from glit_deploy.errors import GlitError
from glit_deploy.latency.measure import DECISION, Protocol, Runner, Timing, time_interleaved, time_runs
from glit_deploy.quant import DEFAULT_RECIPE, QuantRecipe, check_precision, deployable_graph, host_recipe
from glit_deploy.runtimes import (
    INSTALL_HINT,
    RuntimeUnavailable,
    cpu_name,
    gpu_name,
    import_onnxruntime,
    import_tensorrt,
    ort_session,
    require_cuda,
)

TARGETS = ("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda", "trt")
# The precisions each target deploys at. int8 on onnxruntime-CPU is the QDQ graph of
# `glit_deploy.quant` (uint8 activations); TensorRT, and onnxruntime's TensorRT provider, which goes
# through TensorRT's parser, build int8 from a symmetric int8 QDQ graph of the same operators
# (`export.tensorrt.tensorrt_int8_recipe`, explicit quantization), and fp16 from the float32 graph.
TARGET_PRECISIONS: dict[str, tuple[str, ...]] = {
    "ort-cpu": ("fp32", "int8"), "ort-cuda": ("fp32",), "ort-trt": ("fp32", "fp16", "int8"),
    "torch-cpu": ("fp32",), "torch-cuda": ("fp32",), "trt": ("fp32", "fp16", "int8"),
}


def default_threads() -> int:
    """Half the cores this process may use: with every core busy, one preempted runtime thread (the
    OS, a progress bar, a neighbour) stalls a whole parallel operator and latency jumps by 2x."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


class Target(ABC):
    """Measures the latency of a module on one runtime and device."""

    name: str
    device_kind: str = "cpu"

    def __init__(self, threads: int | None = None, precision: str = "fp32",
                 recipe: QuantRecipe = DEFAULT_RECIPE) -> None:
        self.threads = threads or default_threads()
        self.precision = precision
        self.recipe = recipe  # how an int8 graph is quantized (part of what a table measured)
        self.measurements = 0  # how many modules this target has timed (a cache hit times none)

    @property
    def label(self) -> str:
        """The target with its precision, as file names and reports show it: `ort-cpu`, `ort-cpu-int8`."""
        return self.name if self.precision == "fp32" else f"{self.name}-{self.precision}"

    @abstractmethod
    def check(self) -> None:
        """Raise RuntimeUnavailable when the runtime or the device is missing."""

    @abstractmethod
    def _runner(self, module: nn.Module, example: Tensor, calibration: np.ndarray | None) -> Runner:
        """A zero-argument callable running one inference, and an optional per-run timer."""

    def runtime_versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def device(self) -> str:
        return gpu_name() if self.device_kind == "cuda" else cpu_name()

    def fingerprint(self) -> dict[str, Any]:
        """What a latency table depends on besides the model: the cache key's target part."""
        key = {"target": self.name, "device": self.device(), "machine": platform.machine(),
               "threads": self.threads, "versions": self.runtime_versions()}
        if self.precision != "fp32":
            key["precision"] = self.precision
            if self.precision == "int8":
                key["quantization"] = self.recipe.to_dict()
        return key

    def graph(self, module: nn.Module, example: Tensor, calibration: np.ndarray | None = None) -> bytes:
        """The graph this target deploys for `module`: float32, or int8 calibrated on `calibration`
        (random inputs when None, which gives the same speed: only for timing)."""
        precision = "int8" if self.precision == "int8" else "fp32"  # fp16 is the engine builder's business
        return deployable_graph(module, example, precision, calibration, self.recipe)

    def runner(self, module: nn.Module, example: Tensor, calibration: np.ndarray | None = None) -> Runner:
        """A ready-to-time inference of `module` on this target (built once, timed many times)."""
        self.check()
        return self._runner(module.eval(), example, calibration)

    def measure(self, module: nn.Module, example: Tensor, protocol: Protocol = DECISION,
                calibration: np.ndarray | None = None) -> Timing:
        """Time `module` (as this target deploys it, at its precision) on `example`."""
        run, timer = self.runner(module, example, calibration)
        with torch.inference_mode():
            timing = time_runs(run, protocol, timer)
        self.measurements += 1
        return timing

    def measure_side_by_side(self, modules: dict[str, nn.Module], example: Tensor,
                             protocol: Protocol = DECISION) -> dict[str, Timing]:
        """Time several modules interleaved round by round (`time_interleaved`), so that a stretch of
        other load falls on all of them rather than on one."""
        runners = {name: self.runner(module, example) for name, module in modules.items()}
        with torch.inference_mode():
            timings = time_interleaved(runners, protocol)
        self.measurements += len(modules)
        return timings

    def file_runner(self, path: Path, batch_size: int) -> Runner:
        """A ready-to-time inference of an ONNX file as it is, at `batch_size`."""
        raise GlitError(f"target {self.name} times PyTorch modules, not ONNX files: time the file on an "
                        "onnxruntime or TensorRT target (ort-cpu, ort-cuda, ort-trt, trt)")

    def check_file_precision(self, path: Path) -> None:
        """A file is timed as it is: refuse one whose precision is not the target's (an int8 budget
        met by a float32 file, or the reverse, would be a measurement of another graph)."""
        found = onnx_precision(path)
        expected = "int8" if self.precision == "int8" else "fp32"
        if found != expected:
            raise GlitError(f"{path} is a {found} graph, but target {self.label} deploys {expected} graphs: "
                            f"time it with --precision {found}")

    def flush(self) -> None:  # noqa: B027 (most targets keep nothing between measurements)
        """Persist what the target learnt while timing (TensorRT: its shared timing cache)."""

    def measure_file(self, path: Path, batch_size: int, protocol: Protocol = DECISION) -> Timing:
        """Time the ONNX file at `path` as it is (the deployed file), with random inputs of `batch_size`."""
        if not Path(path).is_file():
            raise GlitError(f"{path} does not exist")
        self.check()
        self.check_file_precision(Path(path))
        run, timer = self.file_runner(Path(path), batch_size)
        timing = time_runs(run, protocol, timer)
        self.measurements += 1
        return timing


class TorchTarget(Target):
    def __init__(self, device_kind: str, threads: int | None = None) -> None:
        super().__init__(threads, "fp32")
        self.device_kind = device_kind
        self.name = f"torch-{device_kind}"

    def check(self) -> None:
        if self.device_kind == "cuda":
            require_cuda(f"target {self.name}")

    def _runner(self, module: nn.Module, example: Tensor, calibration: np.ndarray | None) -> Runner:
        torch.set_num_threads(self.threads)
        device = torch.device(self.device_kind)
        module = module.to(device)
        x = example.to(device)

        def run() -> None:
            module(x)

        return run, cuda_event_timer if self.device_kind == "cuda" else None


def cuda_event_timer(run: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class OrtTarget(Target):
    PROVIDERS: ClassVar[dict[str, str]] = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-trt": "TensorrtExecutionProvider"}

    def __init__(self, name: str, threads: int | None = None, precision: str = "fp32",
                 recipe: QuantRecipe = DEFAULT_RECIPE) -> None:
        super().__init__(threads, precision, recipe)
        self.name = name
        self.provider = self.PROVIDERS[name]
        self.device_kind = "cpu" if name == "ort-cpu" else "cuda"

    def check(self) -> None:
        ort = import_onnxruntime()
        if self.provider not in ort.get_available_providers():
            raise RuntimeUnavailable(
                f"target {self.name} needs onnxruntime's {self.provider}, which this onnxruntime "
                f"{ort.__version__} lacks: {INSTALL_HINT[self.provider]}")

    def runtime_versions(self) -> dict[str, str]:
        return {"onnxruntime": import_onnxruntime().__version__, "torch": torch.__version__}

    def provider_options(self) -> dict[str, Any]:
        """onnxruntime's TensorRT provider builds fp16 or int8 (from the QDQ graph) only when told to."""
        if self.provider != "TensorrtExecutionProvider":
            return {}
        return {"trt_fp16_enable": self.precision in ("fp16", "int8"), "trt_int8_enable": self.precision == "int8"}

    def _runner(self, module: nn.Module, example: Tensor, calibration: np.ndarray | None) -> Runner:
        session = ort_session(self.graph(module, example, calibration), self.provider, self.threads,
                              self.provider_options())
        return self._session_runner(session, example.cpu().numpy())

    def file_runner(self, path: Path, batch_size: int) -> Runner:
        session = ort_session(path, self.provider, self.threads, self.provider_options())
        return self._session_runner(session, file_input(session, batch_size, path))

    def _session_runner(self, session: Any, x: np.ndarray) -> Runner:
        name = session.get_inputs()[0].name
        if self.device_kind == "cpu":
            feed = {name: x}

            def run() -> None:
                session.run(None, feed)

            return run, None
        # GPU: inputs and outputs stay on the device, so no host copy is timed.
        ort = import_onnxruntime()
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda", 0)

        def run_bound() -> None:
            session.run_with_iobinding(binding)

        return run_bound, None


def file_input(session: Any, batch_size: int, path: Path) -> np.ndarray:
    """Random input for an ONNX file's single input: its static dims, `batch_size` for the first."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise GlitError(f"{path} has {len(inputs)} inputs; a latency measurement feeds models with one image input")
    shape = list(inputs[0].shape)
    dims = [batch_size, *shape[1:]]
    if any(not isinstance(d, int) for d in dims):
        raise GlitError(f"{path}: input '{inputs[0].name}' has shape {shape}; only the batch axis may be dynamic")
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(inputs[0].type)
    if dtype is None:
        raise GlitError(f"{path}: input '{inputs[0].name}' is {inputs[0].type}; expected a float image tensor")
    if isinstance(shape[0], int) and shape[0] != batch_size:
        raise GlitError(f"{path} has a fixed batch size of {shape[0]}, not {batch_size}")
    return np.random.default_rng(0).standard_normal(dims).astype(dtype)


class TensorRTTarget(Target):
    """Engines built with one TensorRT builder and one timing cache shared by every engine this target
    builds (a table builds about 250), kept in the latency cache per TensorRT version and GPU."""

    name = "trt"
    device_kind = "cuda"

    def __init__(self, threads: int | None = None, precision: str = "fp32",
                 recipe: QuantRecipe = DEFAULT_RECIPE) -> None:
        super().__init__(threads, precision, recipe)
        self._builder: Any = None

    def check(self) -> None:
        import_tensorrt()
        require_cuda("target trt")

    def runtime_versions(self) -> dict[str, str]:
        return {"tensorrt": import_tensorrt().__version__, "torch": torch.__version__}

    def _runner(self, module: nn.Module, example: Tensor, calibration: np.ndarray | None) -> Runner:
        # the float32 graph: the engine builder makes the precision's graph (`tensorrt_graph`)
        return self._engine_runner(deployable_graph(module, example), tuple(example.shape), calibration)

    def file_runner(self, path: Path, batch_size: int) -> Runner:
        return self._engine_runner(path.read_bytes(), _onnx_input_shape(path, batch_size), None)

    def _engine_runner(self, model: bytes, shape: tuple[int, ...], calibration: np.ndarray | None) -> Runner:
        from glit_deploy.export.tensorrt import (
            EngineBuilder,
            SharedTimingCache,
            TensorRTRunner,
            build_engine,
            timing_cache_path,
        )
        from glit_deploy.latency.table import cache_dir

        if self._builder is None:
            self._builder = EngineBuilder(SharedTimingCache(timing_cache_path(cache_dir())))
        engine = build_engine(model, shapes={"input": shape}, precision=self.precision, calibration=calibration,
                              builder=self._builder)
        runner = TensorRTRunner(engine)
        x = torch.randn(*shape, device="cuda")
        stream = torch.cuda.Stream()

        def run() -> None:
            runner.infer({"input": x}, stream)

        def timer(fn: Callable[[], None]) -> float:
            with torch.cuda.stream(stream):
                return cuda_event_timer(fn)

        return run, timer

    def flush(self) -> None:
        if self._builder is not None:
            self._builder.timing_cache.save()


def _onnx_input_shape(path: Path, batch_size: int) -> tuple[int, ...]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    shape = [batch_size, *(d.dim_value for d in dims[1:])]
    if any(d <= 0 for d in shape):
        raise GlitError(f"{path}: only the batch axis of the input may be dynamic")
    return tuple(shape)


def onnx_precision(path: Path | bytes) -> str:
    """`int8` for a graph with QuantizeLinear/DequantizeLinear nodes, `fp16` for a float16 input,
    else `fp32`: what a file is, read from the file."""
    import onnx

    model = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger"}:
        return "int8"
    if model.graph.input and model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"


def get_target(name: str, threads: int | None = None, precision: str = "fp32") -> Target:
    if name not in TARGETS:
        raise GlitError(f"unknown target '{name}' (targets: {', '.join(TARGETS)})")
    check_precision(precision, TARGET_PRECISIONS[name], f"target {name}")
    if name == "torch-cpu":
        return TorchTarget("cpu", threads)
    if name == "torch-cuda":
        return TorchTarget("cuda", threads)
    recipe = host_recipe() if name == "ort-cpu" else DEFAULT_RECIPE  # 7-bit weights where u8 x s8 saturates
    if precision == "int8" and name in ("trt", "ort-trt"):
        from glit_deploy.export.tensorrt import tensorrt_int8_recipe

        recipe = tensorrt_int8_recipe()
    if name in OrtTarget.PROVIDERS:
        return OrtTarget(name, threads, precision, recipe)
    return TensorRTTarget(threads, precision, recipe)


def default_target_name() -> str:
    return "ort-cuda" if torch.cuda.is_available() else "ort-cpu"

