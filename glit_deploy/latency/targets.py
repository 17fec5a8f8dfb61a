"""Deployment targets: a runtime on a device, and how to time a module on it.

| name       | runtime                                    | timing                                  |
|------------|--------------------------------------------|-----------------------------------------|
| ort-cpu    | onnxruntime, CPUExecutionProvider          | host clock around session.run           |
| ort-cuda   | onnxruntime-gpu, CUDAExecutionProvider     | IO binding (inputs/outputs on the GPU)   |
| ort-trt    | onnxruntime-gpu, TensorrtExecutionProvider | IO binding                               |
| torch-cpu  | PyTorch eager, inference mode              | host clock                               |
| torch-cuda | PyTorch eager on CUDA                      | CUDA events                              |
| trt        | a TensorRT engine built from the ONNX      | CUDA events around execute_async_v3      |

onnxruntime and TensorRT targets time the deployable ONNX graph of a module
(`glit_deploy.export.onnx.deployable_onnx`, the graph `glit export` writes), or an ONNX file as it
is (`measure_file`). Every timing follows `glit_deploy.latency.measure`: what the clock reads,
estimated from the rounds the host left undisturbed. A target whose runtime is missing fails with
one line naming what to install; it is never replaced by another.
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
from glit_deploy.export.onnx import deployable_onnx
from glit_deploy.latency.measure import DECISION, Protocol, Runner, Timing, time_runs
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


def default_threads() -> int:
    """Half the cores this process may use: with every core busy, one preempted runtime thread (the
    OS, a progress bar, a neighbour) stalls a whole parallel operator and latency jumps by 2x."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


class Target(ABC):
    """Measures the latency of a module on one runtime and device."""

    name: str
    device_kind: str = "cpu"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or default_threads()
        self.measurements = 0  # how many modules this target has timed (a cache hit times none)

    @abstractmethod
    def check(self) -> None:
        """Raise RuntimeUnavailable when the runtime or the device is missing."""

    @abstractmethod
    def _runner(self, module: nn.Module, example: Tensor) -> Runner:
        """A zero-argument callable running one inference, and an optional per-run timer."""

    def runtime_versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def device(self) -> str:
        return gpu_name() if self.device_kind == "cuda" else cpu_name()

    def fingerprint(self) -> dict[str, Any]:
        """What a latency table depends on besides the model: the cache key's target part."""
        return {"target": self.name, "device": self.device(), "machine": platform.machine(),
                "threads": self.threads, "versions": self.runtime_versions()}

    def runner(self, module: nn.Module, example: Tensor) -> Runner:
        """A ready-to-time inference of `module` on this target (built once, timed many times)."""
        self.check()
        return self._runner(module.eval(), example)

    def measure(self, module: nn.Module, example: Tensor, protocol: Protocol = DECISION) -> Timing:
        """Time `module` (as this target deploys it) on `example`."""
        run, timer = self.runner(module, example)
        with torch.inference_mode():
            timing = time_runs(run, protocol, timer)
        self.measurements += 1
        return timing

    def file_runner(self, path: Path, batch_size: int) -> Runner:
        """A ready-to-time inference of an ONNX file as it is, at `batch_size`."""
        raise GlitError(f"target {self.name} times PyTorch modules, not ONNX files: time the file on an "
                        "onnxruntime or TensorRT target (ort-cpu, ort-cuda, ort-trt, trt)")

    def measure_file(self, path: Path, batch_size: int, protocol: Protocol = DECISION) -> Timing:
        """Time the ONNX file at `path` as it is (the deployed file), with random inputs of `batch_size`."""
        if not Path(path).is_file():
            raise GlitError(f"{path} does not exist")
        self.check()
        run, timer = self.file_runner(Path(path), batch_size)
        timing = time_runs(run, protocol, timer)
        self.measurements += 1
        return timing


class TorchTarget(Target):
    def __init__(self, device_kind: str, threads: int | None = None) -> None:
        super().__init__(threads)
        self.device_kind = device_kind
        self.name = f"torch-{device_kind}"

    def check(self) -> None:
        if self.device_kind == "cuda":
            require_cuda(f"target {self.name}")

    def _runner(self, module: nn.Module, example: Tensor) -> Runner:
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

    def __init__(self, name: str, threads: int | None = None) -> None:
        super().__init__(threads)
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

    def _runner(self, module: nn.Module, example: Tensor) -> Runner:
        return self._session_runner(ort_session(deployable_onnx(module, example), self.provider, self.threads),
                                    example.cpu().numpy())

    def file_runner(self, path: Path, batch_size: int) -> Runner:
        session = ort_session(path, self.provider, self.threads)
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
    name = "trt"
    device_kind = "cuda"

    def check(self) -> None:
        import_tensorrt()
        require_cuda("target trt")

    def runtime_versions(self) -> dict[str, str]:
        return {"tensorrt": import_tensorrt().__version__, "torch": torch.__version__}

    def _runner(self, module: nn.Module, example: Tensor) -> Runner:
        return self._engine_runner(deployable_onnx(module, example), tuple(example.shape))

    def file_runner(self, path: Path, batch_size: int) -> Runner:
        return self._engine_runner(path.read_bytes(), _onnx_input_shape(path, batch_size))

    def _engine_runner(self, model: bytes, shape: tuple[int, ...]) -> Runner:
        from glit_deploy.export.tensorrt import TensorRTRunner, build_engine

        engine = build_engine(model, shapes={"input": shape})
        runner = TensorRTRunner(engine)
        x = torch.randn(*shape, device="cuda")
        stream = torch.cuda.Stream()

        def run() -> None:
            runner.infer({"input": x}, stream)

        def timer(fn: Callable[[], None]) -> float:
            with torch.cuda.stream(stream):
                return cuda_event_timer(fn)

        return run, timer


def _onnx_input_shape(path: Path, batch_size: int) -> tuple[int, ...]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    shape = [batch_size, *(d.dim_value for d in dims[1:])]
    if any(d <= 0 for d in shape):
        raise GlitError(f"{path}: only the batch axis of the input may be dynamic")
    return tuple(shape)


def get_target(name: str, threads: int | None = None) -> Target:
    if name == "torch-cpu":
        return TorchTarget("cpu", threads)
    if name == "torch-cuda":
        return TorchTarget("cuda", threads)
    if name in OrtTarget.PROVIDERS:
        return OrtTarget(name, threads)
    if name == "trt":
        return TensorRTTarget(threads)
    raise GlitError(f"unknown target '{name}' (targets: {', '.join(TARGETS)})")


def default_target_name() -> str:
    return "ort-cuda" if torch.cuda.is_available() else "ort-cpu"

