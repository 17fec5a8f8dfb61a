"""`glit export --format onnx`: a run's retrained model -> export/model.onnx + export/model.json.

Steps: load the retrained model; rewrite a copy for export (BatchNorm folded, depthwise conv as
Conv2d; checked against the trained model); export with a dynamic batch axis; attach the glit
metadata; onnx's full check; parity against PyTorch on the dataset's real validation images; and,
with `optimize`, onnxruntime's transformer optimizer followed by a second parity check.

With `precision="int8"` the float32 graph that passed parity is quantized (`glit_deploy.quant`:
static QDQ, calibrated on training images), and, since logit parity does not apply to int8, held to
an accuracy gate on the whole validation split instead: top-1 drop and top-1 agreement with float32.

The file that passed is then written to export/staging/ and timed there, as it is, on the run's
target at its precision (`deployed_latency`): a file over the budget its arch was searched for fails too.

A model that fails a check never reaches export/model.onnx (where `glit serve` and Triton read it):
it is written to export/rejected/ with its model.json (status "failed") for inspection, and any
previously exported good model stays in place. Every file is written atomically; an export whose
inputs (weights, model info, options, library versions) are unchanged is reused, not redone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glit_deploy.atomic_io import atomic_write, atomic_write_json
from glit_deploy.errors import CheckpointError, GlitError
from glit_deploy.export.deployed_latency import (
    Deployment,
    LatencyBudgetError,
    over_budget_message,
    searched_precision,
    time_deployed_file,
)
from glit_deploy.export.metadata import ModelMetadata, attach_metadata, session_metadata
from glit_deploy.export.onnx import DEFAULT_EXPORTER, EXPORTERS, OPSET, check_onnx, deployable_onnx
from glit_deploy.export.parity import (
    ParityError,
    ParityResult,
    Thresholds,
    compare_logits,
    ort_runner,
    session_logits,
    torch_logits,
    validation_images,
)
from glit_deploy.export.rewrite import prepare_for_export
from glit_deploy.latency.budget import Budget
from glit_deploy.quant import (
    CALIBRATION_SEED,
    DEFAULT_CALIBRATION_IMAGES,
    AccuracyGate,
    calibration_images,
    check_precision,
    graph_predictions,
    host_recipe,
    quantize_onnx,
)
from glit_deploy.rundir import RunDir
from glit_deploy.runtimes import cpu_name, import_onnxruntime, ort_session
from glit_deploy.trained import MODEL_FILE, TrainedModelInfo, load_trained_info, load_trained_model, retrain_dir

ONNX_FILE = "model.onnx"
ONNX_INFO = "model.json"
OPTIMIZED_FILE = "model.optimized.onnx"
FP32_FILE = "model.fp32.onnx"  # an int8 export keeps the float32 graph it was quantized from, for comparison
REJECTED_DIR = "rejected"
STAGING_DIR = "staging"
PIPELINE_VERSION = 3  # bump when the pipeline changes what it writes: invalidates reuse (3: precision)
MIN_OPSET = 17  # LayerNormalization

Report = Callable[[str], None]


@dataclass(frozen=True)
class OnnxOptions:
    opset: int = OPSET
    exporter: str = DEFAULT_EXPORTER
    optimize: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    parity_images: int = 1024  # 0: every validation image
    inject_error: float = 0.0  # self-test of the parity check: shift one exported logit by this much
    check_latency: bool = True  # time the written file on the run's target and hold it to its search budget
    latency_budget: str | None = None  # hold the file to this budget (e.g. 5ms, p99:8ms) instead
    precision: str = ""  # fp32, or int8 (static QDQ quantization behind the accuracy gate); "": the search's
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES  # int8: training images the ranges are calibrated on
    gate: AccuracyGate = field(default_factory=AccuracyGate)  # int8: what it must keep of float32

    def validate(self) -> None:
        if self.precision:
            check_precision(self.precision, ("fp32", "int8"), "an ONNX export")
        if self.calibration_images < 1:
            raise GlitError("--calibration-images must be at least 1")
        if self.gate.max_drop < 0 or not 0.0 <= self.gate.min_agreement <= 1.0:
            raise GlitError("the int8 gate needs a non-negative top-1 drop and an agreement between 0 and 100 %")
        if self.opset < MIN_OPSET:
            raise GlitError(f"--opset {self.opset}: GLiT needs opset >= {MIN_OPSET} (LayerNormalization)")
        if self.exporter not in EXPORTERS:
            raise GlitError(f"unknown exporter '{self.exporter}' (exporters: {', '.join(EXPORTERS)})")
        if self.latency_budget is not None:
            Budget.parse(self.latency_budget)  # a bad budget fails before anything is exported
        if not 0.0 <= self.thresholds.min_agreement <= 1.0:
            raise GlitError("the top-1 agreement threshold must lie between 0 and 100 %")
        if self.thresholds.max_abs_diff < 0:
            raise GlitError("the max |diff| threshold must not be negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AccuracyGateError(GlitError):
    """The int8 model kept too little of the float32 model's accuracy."""


@dataclass
class OnnxExport:
    path: Path  # export/model.onnx
    sidecar: dict[str, Any]
    reused: bool = False

    @property
    def optimized_path(self) -> Path | None:
        opt = self.sidecar.get("optimized")
        return self.path.parent / opt["file"] if opt else None


def export_dir(run: RunDir) -> Path:
    return run.path / "export"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import onnx

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": import_onnxruntime().__version__}


def _export_key(info: TrainedModelInfo, weights: Path, options: OnnxOptions) -> str:
    """What the export depends on: the same key means the same model.onnx would be written again."""
    parts = {"pipeline": PIPELINE_VERSION, "weights": sha256_file(weights), "info": info.to_dict(),
             "options": options.to_dict(), "versions": _versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def load_export_info(run: RunDir) -> dict[str, Any]:
    """export/model.json of a good export, checked against the file it describes."""
    out = export_dir(run)
    info_path, model_path = out / ONNX_INFO, out / ONNX_FILE
    if not info_path.exists() or not model_path.exists():
        raise GlitError(f"{run.path} has no exported model: run `glit export --run {run.path} --format onnx` first")
    try:
        sidecar = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise GlitError(f"{info_path} is corrupt ({exc.msg}): export again") from None
    if sidecar.get("status") != "ok":
        raise GlitError(f"{model_path} is marked '{sidecar.get('status')}' in {info_path}: export again")
    return sidecar


def _reusable(run: RunDir, key: str) -> dict[str, Any] | None:
    try:
        sidecar = load_export_info(run)
    except GlitError:
        return None
    out = export_dir(run)
    if sidecar.get("key") != key or sha256_file(out / ONNX_FILE) != sidecar.get("sha256"):
        return None
    for extra in (sidecar.get("optimized"), sidecar.get("fp32")):
        if extra and (not (out / extra["file"]).exists() or sha256_file(out / extra["file"]) != extra["sha256"]):
            return None
    return sidecar


def _perturb(model: nn.Module, amount: float) -> str:
    """Shift the classifier's first bias by `amount`: logit 0 of every image moves by exactly that."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and head.bias is not None:
        with torch.no_grad():
            head.bias[0] += amount
        return f"head.bias[0] += {amount:g}"
    raise GlitError("--inject-error needs a model with a linear classifier head")


def optimize_onnx(model: bytes) -> tuple[bytes, dict[str, int]]:
    """onnxruntime's transformer optimizer (graph fusions such as SkipLayerNormalization, BiasGelu).

    GLiT's attention covers only the global heads' channels, so the Attention fusion does not match;
    LayerNorm, residual and GELU fusions do. On onnxruntime CPU the fused model measured slower
    (SkipLayerNormalization's CPU kernel), so it is an opt-in aimed at GPU execution providers.
    """
    import onnx

    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as exc:
        raise GlitError(f"onnxruntime's transformer optimizer cannot be imported ({exc})") from None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="glit-opt-") as tmp:
        src = Path(tmp) / "in.onnx"
        src.write_bytes(model)
        optimized = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        proto = optimized.model
    original = onnx.load_from_string(model)
    domains = {node.domain for node in proto.graph.node if node.domain not in ("", "ai.onnx")}
    imported = {o.domain for o in proto.opset_import}
    proto.opset_import.extend(onnx.helper.make_opsetid(d, 1) for d in sorted(domains - imported))  # contrib ops
    del proto.metadata_props[:]
    proto.metadata_props.extend(original.metadata_props)  # the optimizer does not promise to keep them
    return proto.SerializeToString(), fused


def export_run_onnx(run: RunDir, label: str | None = None, options: OnnxOptions | None = None, force: bool = False,
                    report: Report | None = None, threads: int | None = None) -> OnnxExport:
    """Export (or reuse) the run's retrained model as export/model.onnx; raise ParityError on a failed check."""
    import onnx

    options = options or OnnxOptions()
    options.validate()
    if not options.precision:  # what the search measured is what is exported
        options = replace(options, precision=searched_precision(run))
    report = report or (lambda _msg: None)
    info = load_trained_info(run, label)
    weights = retrain_dir(run, info.label) / MODEL_FILE
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing: retrain the model again")
    out = export_dir(run)
    key = _export_key(info, weights, options)
    if not force and (sidecar := _reusable(run, key)) is not None:
        return OnnxExport(out / ONNX_FILE, sidecar, reused=True)

    started = time.perf_counter()
    report(f"loading model '{info.label}' and {info.data} validation images")
    model, info = load_trained_model(run, info.label)
    images = validation_images(info.data, info.image_size, options.parity_images)
    reference = torch_logits(model, images)

    report("rewriting for export (BatchNorm folding)")
    deploy, applied = prepare_for_export(model)
    rewrite_check = compare_logits(reference, torch_logits(deploy, images), options.thresholds,
                                   "rewritten PyTorch model (BatchNorm folded) vs trained model")
    if not rewrite_check.passed:
        raise ParityError(f"the BatchNorm-folded model differs from the trained model: {rewrite_check.failure()}")
    injected = _perturb(model, options.inject_error) if options.inject_error else None

    report(f"exporting with the {options.exporter} exporter (opset {options.opset})")
    export_started = time.perf_counter()
    # The one deployable graph (the latency targets time the same): rewrite, exporter, opset, batch axis.
    proto = onnx.load_from_string(deployable_onnx(model, images[:1], options.exporter, options.opset))
    export_seconds = time.perf_counter() - export_started
    meta = ModelMetadata.from_trained(info)
    attach_metadata(proto, meta)
    proto.doc_string = f"GLiT '{info.label}' ({info.arch.digest}) exported by glit-deploy"
    model_bytes = proto.SerializeToString()

    report("onnx.checker (full check)")
    check_onnx(model_bytes)

    report(f"parity on {len(images)} validation images")
    ort = import_onnxruntime()
    what = f"onnxruntime {ort.__version__} CPUExecutionProvider vs PyTorch {torch.__version__} eager (float32)"
    session = ort_session(model_bytes, "CPUExecutionProvider", threads)
    parity = compare_logits(reference, session_logits(ort_runner(session), images), options.thresholds, what)
    if session_metadata(session) != meta:
        raise GlitError("the exported model's metadata does not read back as written")

    optimized = None
    if options.optimize:
        report("onnxruntime transformer optimizer")
        opt_bytes, fused = optimize_onnx(model_bytes)
        check_onnx(opt_bytes)
        opt_session = ort_session(opt_bytes, "CPUExecutionProvider", threads)
        opt_parity = compare_logits(reference, session_logits(ort_runner(opt_session), images), options.thresholds,
                                    "optimized " + what)
        optimized = (opt_bytes, fused, opt_parity)

    sidecar: dict[str, Any] = {
        "status": "ok",
        "file": ONNX_FILE,
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "bytes": len(model_bytes),
        "precision": "fp32",
        "opset": options.opset,
        "exporter": {"name": options.exporter, "call": f"torch.onnx.export(dynamo={options.exporter == 'dynamo'})",
                     "seconds": round(export_seconds, 3), **_versions()},
        "input": {"name": meta.input_name, "dtype": "float32", "shape": ["batch", *meta.input_shape]},
        "output": {"name": meta.output_name, "dtype": "float32", "shape": ["batch", meta.num_classes]},
        "optimisations": [*applied, "constant folding (exporter)"] + (
            ["onnxruntime transformer optimizer (model.optimized.onnx)"] if optimized else []),
        "checks": {"onnx_checker": "full_check passed", "rewrite": rewrite_check.to_dict()},
        "parity": parity.to_dict(),
        "source": {"run": str(run.path), "label": info.label, "data": info.data, "weights": str(weights),
                   "weights_sha256": sha256_file(weights), "val_top1": info.val_top1},
        "metadata": asdict(meta),
        "options": options.to_dict(),
        "key": key,
        "seconds": 0.0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if injected:
        sidecar["injected_error"] = injected
    if optimized:
        opt_bytes, fused, opt_parity = optimized
        sidecar["optimized"] = {"file": OPTIMIZED_FILE, "sha256": hashlib.sha256(opt_bytes).hexdigest(),
                                "bytes": len(opt_bytes), "fused_operators": fused, "parity": opt_parity.to_dict()}
    failed: list[ParityResult] = [p for p in (parity, optimized[2] if optimized else None) if p and not p.passed]
    if failed:
        sidecar["failure"] = "; ".join(f"{p.what}: {p.failure()}" for p in failed)
        _reject(out, model_bytes, optimized[0] if optimized else None, sidecar)
        raise ParityError(f"parity check failed: {sidecar['failure']}. The model was not exported; it is kept "
                          f"for inspection in {out / REJECTED_DIR / ONNX_FILE}")

    fp32_bytes = None
    if options.precision == "int8":
        if optimized:
            raise GlitError("--optimize rewrites the float32 graph for GPU providers; it does not combine with "
                            "--precision int8")
        fp32_bytes = model_bytes
        model_bytes = _quantize_and_gate(run, model_bytes, meta, info, options, sidecar, out, threads, report)

    staged = out / STAGING_DIR / ONNX_FILE
    atomic_write(staged, lambda tmp: tmp.write_bytes(model_bytes))
    if options.check_latency:
        deployment = Deployment.of_run(run, info.search_budget, options.precision)
        if options.latency_budget is not None:
            deployment = replace(deployment, budget=Budget.parse(options.latency_budget))
        report(f"timing the file on {deployment.target}, batch {deployment.batch_size}"
               + (f", against its budget {deployment.budget}" if deployment.budget else ""))
        sidecar["latency"] = time_deployed_file(staged, deployment, report)
        if sidecar["latency"].get("within_budget") is False:
            sidecar["failure"] = over_budget_message(sidecar["latency"])
            _reject(out, model_bytes, optimized[0] if optimized else None, sidecar)
            shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
            raise LatencyBudgetError(f"{sidecar['failure']}. The model was not exported; it is kept for inspection "
                                     f"in {out / REJECTED_DIR / ONNX_FILE}")
    sidecar["seconds"] = round(time.perf_counter() - started, 2)

    staged.replace(out / ONNX_FILE)  # the file that was timed is the file handed over
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
    if optimized:
        atomic_write(out / OPTIMIZED_FILE, lambda tmp: tmp.write_bytes(optimized[0]))
    else:
        (out / OPTIMIZED_FILE).unlink(missing_ok=True)
    if fp32_bytes is not None:
        atomic_write(out / FP32_FILE, lambda tmp: tmp.write_bytes(fp32_bytes))
    else:
        (out / FP32_FILE).unlink(missing_ok=True)
    atomic_write_json(out / ONNX_INFO, sidecar)  # last: it vouches for the files above
    shutil.rmtree(out / REJECTED_DIR, ignore_errors=True)
    run.record_command("export", {"format": "onnx", "label": info.label, "sha256": sidecar["sha256"],
                                  **options.to_dict()})
    return OnnxExport(out / ONNX_FILE, sidecar)


def _quantize_and_gate(run: RunDir, fp32_bytes: bytes, meta: ModelMetadata, info: TrainedModelInfo,
                       options: OnnxOptions, sidecar: dict[str, Any], out: Path, threads: int | None,
                       report: Report) -> bytes:
    """The float32 graph that passed parity -> its int8 graph, with metadata, if it passes the gate."""
    import onnx

    from glit_deploy.data import load_data, load_run_data

    recorded = run.load_meta().get("data")
    # the run's own record (absolute path, skipped files, change detection) when the model is its own
    bundle = (load_run_data(run, info.image_size) if recorded and recorded.get("spec") == info.data
              else load_data(info.data, info.image_size, report=False))
    report(f"int8: calibrating on {min(options.calibration_images, len(bundle.calib))} training images")
    calibration = calibration_images(bundle.calib, options.calibration_images)
    recipe = host_recipe()  # the recipe depends on the CPU: recorded with the CPU it was made and gated on
    quantized = onnx.load_from_string(quantize_onnx(fp32_bytes, calibration, recipe))
    quantization = {"method": "onnxruntime.quantization.quantize_static (QDQ)", "recipe": recipe.to_dict(),
                    "host": cpu_name(),
                    "calibration": {"split": "train", "images": len(calibration), "seed": CALIBRATION_SEED}}
    attach_metadata(quantized, replace(meta, precision="int8", quantization=quantization))
    quantized.doc_string = f"GLiT '{info.label}' ({info.arch.digest}) int8, exported by glit-deploy"
    int8_bytes = quantized.SerializeToString()
    check_onnx(int8_bytes)

    report(f"int8 accuracy gate on {len(bundle.val)} validation images")
    fp32_pred, labels = graph_predictions(fp32_bytes, bundle.val, threads=threads)
    int8_pred, _ = graph_predictions(int8_bytes, bundle.val, threads=threads)
    gate = options.gate.judge(fp32_pred, int8_pred, labels)
    sidecar.update({"precision": "int8", "quantization": quantization, "gate": gate,
                    "fp32": {"file": FP32_FILE, "sha256": hashlib.sha256(fp32_bytes).hexdigest()},
                    "sha256": hashlib.sha256(int8_bytes).hexdigest(), "bytes": len(int8_bytes),
                    "metadata": asdict(replace(meta, precision="int8", quantization=quantization))})
    sidecar["parity"] = {**sidecar["parity"], "of": "the float32 graph the int8 graph was quantized from"}
    if not gate["passed"]:
        sidecar["failure"] = "int8 accuracy gate: " + "; ".join(gate["failures"])
        _reject(out, int8_bytes, None, sidecar)
        raise AccuracyGateError(f"{sidecar['failure']}. The model was not exported; it is kept for inspection in "
                                f"{out / REJECTED_DIR / ONNX_FILE}")
    return int8_bytes


def _reject(out: Path, model_bytes: bytes, optimized_bytes: bytes | None, sidecar: dict[str, Any]) -> None:
    """Keep a model that failed a check in export/rejected/ for inspection; a good export stays in place."""
    rejected = out / REJECTED_DIR
    sidecar["status"] = "failed"
    atomic_write(rejected / ONNX_FILE, lambda tmp: tmp.write_bytes(model_bytes))
    if optimized_bytes is not None:
        atomic_write(rejected / OPTIMIZED_FILE, lambda tmp: tmp.write_bytes(optimized_bytes))
    atomic_write_json(rejected / ONNX_INFO, sidecar)


def ensure_onnx(run: RunDir, label: str | None = None, report: Report | None = None) -> OnnxExport:
    """The run's good ONNX export of this model, exporting it (default options) when missing or stale.

    Any good export of the same weights is reused, whatever options made it, so that `--format trt`
    and `--format triton` build on the ONNX model the user exported and checked.
    """
    info = load_trained_info(run, label)
    weights_sha = sha256_file(retrain_dir(run, info.label) / MODEL_FILE)
    try:
        sidecar = load_export_info(run)
    except GlitError:
        sidecar = None
    if (sidecar and sidecar["source"].get("label") == info.label and sidecar["source"].get("weights_sha256")
            == weights_sha and sha256_file(export_dir(run) / ONNX_FILE) == sidecar.get("sha256")):
        return OnnxExport(export_dir(run) / ONNX_FILE, sidecar, reused=True)
    return export_run_onnx(run, info.label, OnnxOptions(), report=report)
