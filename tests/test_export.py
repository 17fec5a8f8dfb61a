"""Export (ONNX, TensorRT, Triton) and bench, through the real CLI on a trained digits model."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import glit

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def exported_run(deployable_digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export (with the optimized variant) shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("runs") / "exported"
    shutil.copytree(deployable_digits_run, run)
    glit("export", "--run", str(run), "--format", "onnx", "--optimize")
    return run


def _sidecar(run: Path) -> dict:
    return json.loads((run / "export" / "model.json").read_text())


# --- rewrites (in process) ---------------------------------------------------------------------------

def _digits_model_with_bn_stats() -> torch.nn.Module:
    from glit_deploy.nn import GLiT, extreme_arch
    from glit_deploy.space import get_space

    torch.manual_seed(0)
    space = get_space("digits")
    model = GLiT(extreme_arch(space, True), space, 10).eval()
    with torch.no_grad():  # trained-looking statistics, so the fold has something to fold
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0, 0.2)
    return model


def test_fold_batchnorm_equals_unfolded_model() -> None:
    from glit_deploy.export.rewrite import fold_batchnorm, prepare_for_export

    model = _digits_model_with_bn_stats()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 3, 8, 8)
    folded = fold_batchnorm(model)
    deploy, applied = prepare_for_export(model)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in deploy.modules())
    assert any("folded" in a for a in applied)
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(folded(x), reference, atol=1e-5, rtol=0)
        assert torch.allclose(deploy(x), reference, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the original was modified"


def test_dynamo_exporter_matches_torchscript_exporter() -> None:
    from glit_deploy.export.onnx import check_onnx, export_onnx
    from glit_deploy.export.rewrite import prepare_for_export
    from glit_deploy.runtimes import ort_session

    model = _digits_model_with_bn_stats()
    deploy, _ = prepare_for_export(model)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        reference = model(x).numpy()
    for exporter in ("torchscript", "dynamo"):
        data = export_onnx(deploy, x[:1], exporter)
        check_onnx(data)
        if exporter == "torchscript":
            assert export_onnx(deploy, x[:1], exporter) == data  # deterministic: re-exports are byte-identical
        got = ort_session(data).run(None, {"input": x.numpy()})[0]
        assert np.abs(got - reference).max() <= 1e-4, exporter


def test_parity_failure_says_by_how_much() -> None:
    from glit_deploy.export.parity import Thresholds, compare_logits

    ref = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    ok = compare_logits(ref, ref + 1e-6, Thresholds(), "x")
    assert ok.passed and ok.top1_agreement == 1.0
    bad = compare_logits(ref, ref + np.array([[0.0, 2.0], [0.0, 0.0]], dtype=np.float32), Thresholds(), "x")
    assert not bad.passed
    assert "max |diff| 2 exceeds 0.0001" in bad.failure()
    assert "top-1 agreement 50.00 %" in bad.failure() and "1 of 2 images differ" in bad.failure()
    nan = compare_logits(ref, np.full_like(ref, np.nan), Thresholds(), "x")
    assert not nan.passed


# --- ONNX export through the CLI ----------------------------------------------------------------------

def test_export_writes_checked_model_and_sidecar(exported_run: Path) -> None:
    out = exported_run / "export"
    side = _sidecar(exported_run)
    assert side["status"] == "ok"
    assert side["sha256"] == _sha256(out / "model.onnx")
    assert side["opset"] >= 17
    assert side["exporter"]["name"] == "torchscript" and "dynamo=False" in side["exporter"]["call"]
    assert any("batchnorm folded" in o for o in side["optimisations"])
    assert side["parity"]["passed"] and side["parity"]["images"] == 179  # every digits validation image
    assert side["parity"]["max_abs_diff"] <= 1e-4 and side["parity"]["top1_agreement"] == 1.0
    assert side["checks"]["rewrite"]["max_abs_diff"] <= 1e-4
    opt = side["optimized"]
    assert opt["sha256"] == _sha256(out / opt["file"]) and opt["parity"]["passed"]
    assert not (out / "rejected").exists() and not (out / "staging").exists()
    # The file was timed as written, on the default target (this run has no search, hence no budget).
    lat = side["latency"]
    assert lat["measured"] and lat["target"] == "ort-cpu" and lat["batch_size"] == 1 and lat["budget_ms"] is None
    assert lat["ci_ms"][0] <= lat["median_ms"] <= lat["ci_ms"][1] and lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"]


def test_onnx_full_check_dynamic_batch_and_folded_graph(exported_run: Path) -> None:
    import onnx

    model = onnx.load(str(exported_run / "export" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, outp.name) == ("input", "output")
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 8, 8]
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "LayerNormalization" in ops


def test_exported_file_alone_matches_pytorch_on_validation_images(exported_run: Path) -> None:
    """A fresh onnxruntime session from the file: parity recomputed here, and the metadata it carries."""
    from glit_deploy.data import load_data
    from glit_deploy.export.metadata import read_metadata, session_metadata
    from glit_deploy.rundir import RunDir
    from glit_deploy.runtimes import ort_session
    from glit_deploy.trained import load_trained_model

    path = exported_run / "export" / "model.onnx"
    session = ort_session(path)
    meta = session_metadata(session)
    model, info = load_trained_model(RunDir(exported_run))
    bundle = load_data(info.data, info.image_size)
    assert list(meta.class_names) == bundle.class_names
    assert meta.mean == tuple(bundle.mean) and meta.std == tuple(bundle.std)
    assert meta.image_size == 8 and meta.input_shape == (3, 8, 8)
    assert meta.arch == info.arch.to_dict() and meta.label == info.label
    assert read_metadata(path) == meta

    images = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
    with torch.inference_mode():
        reference = model(images).numpy()
    batched = session.run(None, {"input": images.numpy()})[0]
    single = np.concatenate([session.run(None, {"input": images[i:i + 1].numpy()})[0] for i in range(8)])
    assert np.abs(batched - reference).max() <= 1e-4
    assert np.abs(single - reference[:8]).max() <= 1e-4
    assert (batched.argmax(1) == reference.argmax(1)).all()


def test_export_is_idempotent(exported_run: Path) -> None:
    out = exported_run / "export"
    before = _sha256(out / "model.onnx")
    again = glit("export", "--run", str(exported_run), "--format", "onnx", "--optimize")
    assert "up to date" in again.stdout
    assert _sha256(out / "model.onnx") == before
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


def test_mismatched_model_fails_parity_with_the_diff(deployable_copy: Path) -> None:
    proc = glit("export", "--run", str(deployable_copy), "--format", "onnx", "--inject-error", "0.5", check=False)
    assert proc.returncode == 2
    assert "parity check failed" in proc.stderr and "max |diff| 0.5 exceeds 0.0001" in proc.stderr
    out = deployable_copy / "export"
    assert not (out / "model.onnx").exists()  # never where serving would pick it up
    rejected = json.loads((out / "rejected" / "model.json").read_text())
    assert rejected["status"] == "failed" and not rejected["parity"]["passed"]
    assert rejected["sha256"] == _sha256(out / "rejected" / "model.onnx")


def test_a_file_over_its_latency_budget_is_not_exported(deployable_copy: Path) -> None:
    out = deployable_copy / "export"
    proc = glit("export", "--run", str(deployable_copy), "--format", "onnx", "--latency-budget", "1us",
                check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "measured over its budget on ort-cpu" in proc.stderr and "budget 0.001 ms" in proc.stderr
    assert not (out / "model.onnx").exists() and not (out / "staging").exists()
    rejected = json.loads((out / "rejected" / "model.json").read_text())
    assert rejected["status"] == "failed" and rejected["latency"]["within_budget"] is False
    assert rejected["latency"]["bound_ms"] > 0.001 and rejected["parity"]["passed"]
    # Under a budget it meets, the same model exports, and the verdict is kept next to the file.
    glit("export", "--run", str(deployable_copy), "--format", "onnx", "--latency-budget", "p99:1s")
    lat = _sidecar(deployable_copy)["latency"]
    assert lat["within_budget"] and lat["stat"] == "p99" and lat["bound_ms"] <= 1000 and lat["counted_runs"] >= 2000
    assert not (out / "rejected").exists()
    bad = glit("export", "--run", str(deployable_copy), "--format", "onnx", "--latency-budget", "p42:5ms",
               check=False)
    assert bad.returncode == 2 and "p42" in bad.stderr


# --- Triton ---------------------------------------------------------------------------------------------

def test_triton_repository_parses_and_matches_onnx(exported_run: Path) -> None:
    pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]' to parse config.pbtxt")
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    glit("export", "--run", str(exported_run), "--format", "triton", "--max-batch", "16")
    repo = exported_run / "export" / "triton"
    config = text_format.Parse((repo / "glit_onnx" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "glit_onnx" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert _sha256(repo / "glit_onnx" / "1" / "model.onnx") == _sidecar(exported_run)["sha256"]
    model = onnx.load(str(repo / "glit_onnx" / "1" / "model.onnx"))
    for declared, actual in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [t.name for t in declared] == [t.name for t in actual]
        for t, v in zip(declared, actual, strict=True):
            assert t.data_type == model_config_pb2.TYPE_FP32
            assert list(t.dims) == [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]
    labels = (repo / "glit_onnx" / config.output[0].label_filename).read_text().splitlines()
    assert labels == [str(i) for i in range(10)]
    assert not (repo / "glit_trt").exists()  # no engine was built here


# --- TensorRT -------------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the real engine test runs instead")
def test_trt_without_tensorrt_fails_with_one_clear_line(exported_run: Path) -> None:
    proc = glit("export", "--run", str(exported_run), "--format", "trt", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed")
    assert not (exported_run / "export" / "model.engine").exists()


@pytest.mark.skipif(not HAS_TENSORRT or not torch.cuda.is_available(), reason="needs TensorRT and an NVIDIA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_engine_builds_and_matches_onnxruntime(exported_run: Path, tmp_path: Path, precision: str) -> None:
    run = tmp_path / "trt"
    shutil.copytree(exported_run, run)
    glit("export", "--run", str(run), "--format", "trt", "--max-batch", "16",
         *(["--fp16"] if precision == "fp16" else []))
    out = run / "export"
    info = json.loads((out / "model.engine.json").read_text())
    assert info["status"] == "ok" and info["precision"] == precision and info["parity"]["passed"]
    assert info["sha256"] == _sha256(out / "model.engine")
    assert info["onnx"]["sha256"] == _sidecar(run)["sha256"]
    assert info["profile"]["input"] == {"min": [1, 3, 8, 8], "opt": [8, 3, 8, 8], "max": [16, 3, 8, 8]}
    assert info["tensorrt"] and info["gpu"] and info["compute_capability"]
    assert (out / "trt-timing.cache").stat().st_size > 0
    glit("export", "--run", str(run), "--format", "triton")
    assert (out / "triton" / "glit_trt" / "1" / "model.plan").read_bytes() == (out / "model.engine").read_bytes()
    assert 'platform: "tensorrt_plan"' in (out / "triton" / "glit_trt" / "config.pbtxt").read_text()


# --- bench and CLI errors ---------------------------------------------------------------------------

def test_bench_writes_csv_for_eager_and_onnxruntime(exported_run: Path) -> None:
    proc = glit("bench", "--run", str(exported_run), "--batch-sizes", "1,4", "--rounds", "3", "--warmup", "1",
                "--max-seconds", "1")
    assert "ort-cpu" in proc.stdout
    with open(exported_run / "export" / "bench.csv") as fh:
        rows = list(csv.DictReader(fh))
    seen = {(r["runtime"], int(r["batch_size"])) for r in rows}
    for runtime in ("torch-eager-cpu", "ort-cpu", "ort-cpu-optimized"):
        assert {(runtime, 1), (runtime, 4)} <= seen
    assert all(float(r["ci_low_ms"]) <= float(r["median_ms"]) <= float(r["ci_high_ms"]) for r in rows)
    assert all(float(r["median_ms"]) <= float(r["p99_ms"]) and float(r["images_per_s"]) > 0 for r in rows)


def test_export_and_bench_need_an_exported_or_trained_model(tmp_path: Path) -> None:
    proc = glit("export", "--run", str(tmp_path), "--format", "zip", check=False)
    assert proc.returncode == 2 and "unknown --format 'zip'" in proc.stderr
    proc = glit("bench", "--run", str(tmp_path), check=False)
    assert proc.returncode == 2 and "glit export" in proc.stderr


def test_fp16_onnx_keeps_layernorm_and_softmax_in_float32() -> None:
    """The TensorRT 11 fp16 path (a strongly typed float16 ONNX), checked without TensorRT."""
    import onnx

    from glit_deploy.export.onnx import check_onnx, export_onnx
    from glit_deploy.export.rewrite import prepare_for_export
    from glit_deploy.export.tensorrt import fp16_onnx
    from glit_deploy.nn import GLiT
    from glit_deploy.runtimes import ort_session
    from glit_deploy.space import get_space

    torch.manual_seed(0)
    space = get_space("digits")
    model = GLiT(space.with_split([1] * space.depth), space, 10).eval()  # attention and locality in every block
    x = torch.randn(4, 3, 8, 8)
    fp32 = export_onnx(prepare_for_export(model)[0], x[:1])
    half = fp16_onnx(fp32)
    check_onnx(half)  # also: nodes topologically sorted
    graph = onnx.shape_inference.infer_shapes(onnx.load_from_string(half)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    kept = [n for n in graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert {n.op_type for n in kept} == {"LayerNormalization", "Softmax"}
    assert all(types[n.output[0]] == float32 for n in kept)
    assert all(types[n.output[0]] == float16 for n in graph.node if n.op_type == "MatMul")
    assert types["input"] == float32 and types["output"] == float32
    with torch.no_grad():
        reference = model(x).numpy()
    got = ort_session(half).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - reference).max() < 5e-2
