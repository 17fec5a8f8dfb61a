"""int8 against float32 on onnxruntime-CPU: speed (interleaved), and accuracy where there are weights.

Models:
- GLiT-Tiny as the paper gives it (`glit-tiny-paper` in the `glit-tiny` space, 224 px, 1,000 classes),
  with random weights: speed only (the scales quantization computes do not change the speed);
- a CIFAR-10 model with trained weights: a retrained run (`--cifar-run`, its deploy model or
  `--cifar-label`), or an arch with the supernet's inherited weights, BatchNorm recalibrated
  (`--cifar-supernet` and `--cifar-arch`). Its float32 and int8 top-1 are taken on the run's whole
  validation split (the 5,000 held-out training images) with the export's accuracy gate.

Every graph is the deployed one (`glit_deploy.quant.deployable_graph`: the export's float32 graph,
quantized by `glit_deploy.quant.quantize_onnx`), timed on one thread at batch 1 and 8, float32 and the
int8 variants of one model interleaved round by round (`glit_deploy.latency.measure.time_interleaved`).
With `--recipes`, several choices of quantized operators are compared (how the default was chosen).

    nice -n 5 /work/main/.venv/bin/python bench/int8_speed.py --recipes \\
        --cifar-supernet /work/evidence/cifar-supernet --cifar-arch bench/evidence/arch-evolution.json \\
        --json-out bench/out/int8_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glit_deploy.latency.measure import DECISION, time_interleaved  # noqa: E402
from glit_deploy.quant import (  # noqa: E402
    AccuracyGate,
    calibration_images,
    deployable_graph,
    graph_predictions,
    host_recipe,
    random_calibration,
)
from glit_deploy.runtimes import ort_session  # noqa: E402

console = Console()
HOST_RECIPE = host_recipe()  # what the export uses on this CPU (7-bit weights on x86 without VNNI)
# The operator choices compared with --recipes (the default recipe is always measured).
RECIPES = {
    "MatMul+Gemm": replace(HOST_RECIPE, op_types=("MatMul", "Gemm")),
    "MatMul+Gemm+Conv (default)": HOST_RECIPE,
    "const-B MatMul+Gemm+Conv": replace(HOST_RECIPE, extra_options={"MatMulConstBOnly": True}),
    "per-tensor weights": replace(HOST_RECIPE, per_channel=False),
    "every supported op": replace(HOST_RECIPE, op_types=(
        "MatMul", "Gemm", "Conv", "Add", "Mul", "Softmax", "Transpose", "Reshape", "Split", "Concat", "Gather",
        "LayerNormalization", "Sigmoid")),
}


def glit_tiny() -> tuple[str, torch.nn.Module, torch.Tensor, Any]:
    from glit_deploy.archs import resolve_arch
    from glit_deploy.nn import GLiT
    from glit_deploy.space import get_space

    torch.manual_seed(0)
    space = get_space("glit-tiny")
    model = GLiT(resolve_arch("glit-tiny-paper", space), space, 1000).eval()
    example = torch.zeros(1, 3, space.image_size, space.image_size)
    return "GLiT-Tiny (paper arch, random weights)", model, example, None


def cifar_model(args: argparse.Namespace) -> tuple[str, torch.nn.Module, torch.Tensor, Any]:
    from glit_deploy.rundir import RunDir

    if args.cifar_run:
        from glit_deploy.data import load_data
        from glit_deploy.trained import load_trained_model

        model, info = load_trained_model(RunDir(args.cifar_run), args.cifar_label)
        bundle = load_data(info.data, info.image_size)
        name = f"cifar '{info.label}' ({info.arch.digest}, retrained)"
    else:
        from glit_deploy.archs import resolve_arch
        from glit_deploy.nn.supernet import recalibrate_bn
        from glit_deploy.train import calibration_batches, load_supernet

        supernet, bundle = load_supernet(RunDir(args.cifar_supernet))
        arch = resolve_arch(args.cifar_arch, supernet.space)
        recalibrate_bn(supernet, calibration_batches(bundle, 256, 2, torch.device("cpu")),
                       lambda x: supernet(x, arch))
        model = supernet.extract(arch)
        name = f"cifar {arch.digest} (inherited weights, BN recalibrated)"
    model = model.cpu().eval()
    example = torch.zeros(1, 3, bundle.image_size, bundle.image_size)
    return name, model, example, bundle


def time_variants(graphs: dict[str, bytes], example: torch.Tensor, batch: int, seconds: float
                  ) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((batch, *example.shape[1:])).astype(np.float32)
    runners = {}
    for name, graph in graphs.items():
        session = ort_session(graph, threads=1)
        runners[name] = ((lambda s=session: s.run(None, {"input": x})), None)
    protocol = replace(DECISION, min_seconds=seconds, max_seconds=max(4 * seconds, 10.0))
    return time_interleaved(runners, protocol)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-run", type=Path, help="a run with a retrained CIFAR-10 model")
    parser.add_argument("--cifar-label", help="with --cifar-run: the model's label (default: the deploy model)")
    parser.add_argument("--cifar-supernet", type=Path, help="a CIFAR-10 supernet run (inherited weights)")
    parser.add_argument("--cifar-arch", help="with --cifar-supernet: ARCH.json or an arch spec")
    parser.add_argument("--no-tiny", action="store_true", help="leave GLiT-Tiny out")
    parser.add_argument("--recipes", action="store_true", help="compare the operator choices of RECIPES too")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seconds", type=float, default=3.0, help="least timing per comparison")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if bool(args.cifar_supernet) != bool(args.cifar_arch):
        parser.error("--cifar-supernet and --cifar-arch go together")
    models = [] if args.no_tiny else [glit_tiny()]
    if args.cifar_run or args.cifar_supernet:
        models.append(cifar_model(args))
    recipes = RECIPES if args.recipes else {"MatMul+Gemm+Conv (default)": HOST_RECIPE}
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    accuracy_of: dict[str, float] = {}  # float32 top-1 per model
    for name, model, example, bundle in models:
        calibration = calibration_images(bundle.calib) if bundle is not None else random_calibration(example.shape, 16)
        graphs = {"fp32": deployable_graph(model, example)}
        for label, recipe in recipes.items():
            started = time.perf_counter()
            graphs[f"int8 {label}"] = deployable_graph(model, example, "int8", calibration, recipe)
            console.print(f"{name}: int8 {label} quantized in {time.perf_counter() - started:.1f} s")
        accuracy: dict[str, Any] = {}
        if bundle is not None:
            fp32_pred, labels = graph_predictions(graphs["fp32"], bundle.val, threads=1)
            for label in graphs:
                if label != "fp32":
                    pred, _ = graph_predictions(graphs[label], bundle.val, threads=1)
                    accuracy[label] = AccuracyGate().judge(fp32_pred, pred, labels)
                    accuracy_of[name] = accuracy[label]["fp32_top1"]
        for batch in (int(b) for b in args.batches.split(",")):
            timings = time_variants(graphs, example, batch, args.seconds)
            base = timings["fp32"].median_ms
            for label, timing in timings.items():
                record = {"model": name, "variant": label, "batch": batch, "median_ms": timing.median_ms,
                          "ci_ms": [timing.ci_low_ms, timing.ci_high_ms], "speedup": base / timing.median_ms,
                          "disturbed_rounds": timing.disturbed_rounds, "rounds": timing.rounds,
                          "bytes": len(graphs[label])}
                if label in accuracy:
                    record["gate"] = accuracy[label]
                results.append(record)
                console.print(f"{name} b{batch} {label}: {timing.median_ms:.3f} ms ({base / timing.median_ms:.2f}x)")
    load_after = os.getloadavg()
    table = Table(title=f"int8 vs float32, onnxruntime-CPU, 1 thread (load average {load_before[0]:.1f} -> "
                  f"{load_after[0]:.1f})")
    for column in ("model", "variant", "batch", "median ms (95 % CI)", "speed-up", "MB", "val top-1 (drop, agree)"):
        table.add_column(column)
    for r in results:
        gate = r.get("gate")
        acc = (f"{gate['int8_top1']:.2f} % ({-gate['drop_points']:+.2f}, {100 * gate['agreement']:.1f} %)" if gate
               else "")
        if r["variant"] == "fp32" and accuracy_of.get(r["model"]):
            acc = f"{accuracy_of[r['model']]:.2f} %"
        table.add_row(r["model"], r["variant"], str(r["batch"]),
                      f"{r['median_ms']:.3f} ({r['ci_ms'][0]:.3f}-{r['ci_ms'][1]:.3f})", f"{r['speedup']:.2f}x",
                      f"{r['bytes'] / 1e6:.2f}", acc)
    console.print(table)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"load_average": [load_before, load_after], "results": results,
                                             "command": " ".join(sys.argv)}, indent=1))


if __name__ == "__main__":
    main()
