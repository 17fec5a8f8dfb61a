"""Runtime plumbing shared by latency measurement, export checks and serving.

onnxruntime and onnxruntime-gpu install the same import package, and onnxruntime silently falls
back to the CPU when a provider cannot load: every session here is checked for the providers that
were asked for, and a missing runtime is one clear error naming what to install.
"""

from __future__ import annotations

import os
from typing import Any

from glit_deploy.errors import GlitError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
INSTALL_HINT = {
    "CPUExecutionProvider": "pip install 'glit-deploy[cpu]'",
    "CUDAExecutionProvider": "pip install 'glit-deploy[gpu]' (onnxruntime-gpu, replacing onnxruntime) on a "
                             "machine with an NVIDIA GPU and CUDA",
    "TensorrtExecutionProvider": "pip install 'glit-deploy[gpu]' plus TensorRT's libraries on an NVIDIA GPU",
}


class RuntimeUnavailable(GlitError):
    """The runtime or device a target needs is not installed or not present."""


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailable("onnxruntime is not installed: pip install 'glit-deploy[cpu]' "
                                 "(or '[gpu]' for onnxruntime-gpu)") from None
    return onnxruntime


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise RuntimeUnavailable("TensorRT is not installed: pip install 'glit-deploy[gpu,trt]' (or '[cpu,trt]'; "
                                 "onnxruntime checks the engines) on a machine with an NVIDIA GPU") from None
    return tensorrt


def require_cuda(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailable(f"{what} needs an NVIDIA GPU with CUDA, and torch sees none")


def ort_session(model: bytes | str | os.PathLike, provider: str = "CPUExecutionProvider", threads: int | None = None,
                provider_options: dict[str, Any] | None = None) -> Any:
    """An InferenceSession on exactly `provider` (CPU as the fallback for unsupported nodes only)."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if provider not in available:
        raise RuntimeUnavailable(f"onnxruntime {ort.__version__} here offers {', '.join(available)}, not "
                                 f"{provider}: {INSTALL_HINT.get(provider, 'install a build that has it')}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    first: Any = (provider, provider_options) if provider_options else provider
    providers = [first] if provider == "CPUExecutionProvider" else [first, "CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        raise RuntimeUnavailable(f"onnxruntime could not create a {provider} session: {exc}") from None
    if session.get_providers()[0] != provider:
        raise RuntimeUnavailable(f"onnxruntime fell back to {session.get_providers()[0]} instead of {provider}: "
                                 f"{INSTALL_HINT.get(provider, '')}")
    return session


# The vector instruction sets the runtimes' kernels dispatch on. Two hosts with the same model name can expose
# different ones (a cloud VM without AVX-512 next to one with it), and a latency measured on one does not hold on
# the other: they are part of what names the device.
VECTOR_EXTENSIONS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "sve2")


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read()
    except OSError:  # not Linux: no model name, no flags
        return ""


def cpu_features(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The vector extensions of VECTOR_EXTENSIONS this CPU reports (from /proc/cpuinfo, or `cpuinfo`'s text)."""
    cpuinfo = _read_cpuinfo() if cpuinfo is None else cpuinfo
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in VECTOR_EXTENSIONS if f in flags)


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its vector extensions, e.g. 'AMD EPYC (avx, avx2, fma, f16c)': what names a
    CPU device wherever a latency is recorded (a latency table's cache key among them)."""
    cpuinfo = _read_cpuinfo() if cpuinfo is None else cpuinfo
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 None)
    if model is None:
        import platform

        model = platform.processor() or platform.machine()
    features = cpu_features(cpuinfo)
    return f"{model} ({', '.join(features)})" if features else model


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
