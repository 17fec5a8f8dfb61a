"""`glit export --format triton`: a Triton Inference Server model repository under export/triton/.

    export/triton/glit_onnx/config.pbtxt     backend "onnxruntime"
    export/triton/glit_onnx/labels.txt       class names (Triton's classification extension)
    export/triton/glit_onnx/1/model.onnx
    export/triton/glit_trt/...               platform "tensorrt_plan", 1/model.plan (when an engine exists)

Dims in config.pbtxt leave out the batch dimension: Triton adds it (max_batch_size > 0) and
batches requests itself (dynamic_batching).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glit_deploy.errors import GlitError
from glit_deploy.rundir import RunDir

TRITON_DIR = "triton"
ONNX_MODEL = "glit_onnx"
TRT_MODEL = "glit_trt"
LABELS_FILE = "labels.txt"
QUEUE_DELAY_US = 500  # how long Triton may hold a request to batch it with others
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "DataType.FLOAT": "TYPE_FP32",
                "DataType.HALF": "TYPE_FP16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton's TYPE_*
    dims: tuple[int, ...]  # without the batch dimension


def config_pbtxt(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int,
                 backend: str | None = None, platform: str | None = None, label_file: str | None = None) -> str:
    """A model configuration in protobuf text format (Triton's model_config.proto)."""
    preferred = sorted({b for b in (1, 4, 8, 16, 32, 64) if b <= max_batch_size} | {max_batch_size})

    def tensor(spec: TensorSpec, labels: str | None = None) -> str:
        extra = f'\n    label_filename: "{labels}"' if labels else ""
        return (f'  {{\n    name: "{spec.name}"\n    data_type: {spec.dtype}\n'
                f'    dims: [ {", ".join(map(str, spec.dims))} ]{extra}\n  }}')

    lines = [f'name: "{name}"']
    if backend:
        lines.append(f'backend: "{backend}"')
    if platform:
        lines.append(f'platform: "{platform}"')
    lines += [
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(tensor(s) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(tensor(s, label_file) for s in outputs) + "\n]",
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}",
        'version_policy: { latest: { num_versions: 1 } }',
    ]
    return "\n".join(lines) + "\n"


def onnx_tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file, without their (dynamic) batch dimension."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def specs(values: Any) -> list[TensorSpec]:
        result = []
        for v in values:
            if v.name in initializers:
                continue
            elem = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            if not dims or dims[0] != -1:
                raise GlitError(f"{path}: tensor '{v.name}' has no dynamic batch dimension, which Triton's "
                                "batching needs: export it again")
            if elem not in TRITON_TYPES:
                raise GlitError(f"{path}: tensor '{v.name}' has type {elem}, which this exporter does not map")
            result.append(TensorSpec(v.name, TRITON_TYPES[elem], tuple(dims[1:])))
        return result

    return specs(model.graph.input), specs(model.graph.output)


def _write_model(model_dir: Path, source: Path, file_name: str, labels: str, config: str) -> None:
    """One Triton model: version 1 holding the model file, its labels and config.pbtxt."""
    (model_dir / "1").mkdir(parents=True)
    shutil.copyfile(source, model_dir / "1" / file_name)
    (model_dir / LABELS_FILE).write_text(labels)
    (model_dir / "config.pbtxt").write_text(config)


def write_triton_repository(run: RunDir, max_batch: int = 32, label: str | None = None,
                            report: Any = None) -> dict[str, Any]:
    """Write (replace) export/triton/ from the run's exported ONNX model and, if built, its TensorRT engine."""
    from glit_deploy.export.onnx_export import ONNX_FILE, ensure_onnx, export_dir
    from glit_deploy.export.tensorrt import ENGINE_FILE, load_engine_info

    if max_batch < 1:
        raise GlitError("--max-batch must be at least 1")
    exported = ensure_onnx(run, label, report)
    out = export_dir(run)
    staging = out / f".{TRITON_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    class_names = exported.sidecar["metadata"]["class_names"]
    labels = "".join(f"{name}\n" for name in class_names)
    inputs, outputs = onnx_tensor_specs(out / ONNX_FILE)
    models = {}

    _write_model(staging / ONNX_MODEL, out / ONNX_FILE, "model.onnx", labels,
                 config_pbtxt(ONNX_MODEL, inputs, outputs, max_batch, backend="onnxruntime", label_file=LABELS_FILE))
    models[ONNX_MODEL] = {"backend": "onnxruntime", "max_batch_size": max_batch,
                          "source_sha256": exported.sidecar["sha256"]}

    engine = load_engine_info(out)
    # an engine is built from the float32 graph (kept as model.fp32.onnx next to an int8 export)
    engine_source = (exported.sidecar.get("fp32") or {}).get("sha256", exported.sidecar["sha256"])
    if engine is not None and engine["onnx"]["sha256"] == engine_source:
        engine_max = engine["profile"][inputs[0].name]["max"][0]
        trt_inputs = [TensorSpec(s.name, TRITON_TYPES.get(engine["io"][s.name]["dtype"], s.dtype), s.dims)
                      for s in inputs]
        trt_outputs = [TensorSpec(s.name, TRITON_TYPES.get(engine["io"][s.name]["dtype"], s.dtype), s.dims)
                       for s in outputs]
        # An engine serves at most its profile's max batch, so Triton must not batch beyond it.
        _write_model(staging / TRT_MODEL, out / ENGINE_FILE, "model.plan", labels,
                     config_pbtxt(TRT_MODEL, trt_inputs, trt_outputs, engine_max, platform="tensorrt_plan",
                                  label_file=LABELS_FILE))
        models[TRT_MODEL] = {"platform": "tensorrt_plan", "max_batch_size": engine_max,
                             "tensorrt": engine["tensorrt"], "gpu": engine["gpu"], "precision": engine["precision"]}

    # Swap the finished repository in: the old one is removed only once the new one is complete.
    target = out / TRITON_DIR
    old = out / f".{TRITON_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    run.record_command("export", {"format": "triton", "max_batch": max_batch, "models": sorted(models)})
    return {"path": str(target), "models": models}

