"""The published CIFAR-10 models quantized to int8 on this host: the accuracy gate and the speed-up (issue 13).

An int8 file's accuracy and speed depend on the CPU that runs it, not only on the file: x86 CPUs without VNNI
compute onnxruntime's U8S8 products with VPMADDUBSW, whose 16-bit intermediate sums can saturate, and a host
without VNNI gains less from int8 at all. So the gate and the speed-up of a published model, measured where it
was exported, are measured again here, on this host, with the export's own code:

- each `bench/models/cifar10/NAME.onnx` (float32, as `glit export` wrote it) is quantized with
  `glit_deploy.quant.quantize_onnx` (the export's recipe for this host, `host_recipe()`, calibrated on the
  export's 64 training images of the recorded dataset, seed 0);
- the gate (`glit_deploy.quant.AccuracyGate`, 0.5 points / 97 %) on the 5,000 validation images;
- float32 and int8 timed interleaved (`glit_deploy.latency.measure.time_interleaved`) on ort-cpu, 1 thread,
  batch 1: the ratio is this host's.

    nice -n 0 python bench/published_int8.py --json-out bench/out/published_int8.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from glit_deploy.atomic_io import atomic_write_json
from glit_deploy.data import load_recorded_data
from glit_deploy.latency.measure import Protocol, time_interleaved
from glit_deploy.latency.targets import get_target
from glit_deploy.quant import AccuracyGate, calibration_images, graph_predictions, host_recipe, quantize_onnx
from glit_deploy.rundir import RunDir
from glit_deploy.runtimes import cpu_name

REPO = Path(__file__).resolve().parents[1]
console = Console()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=REPO / "bench" / "models" / "cifar10")
    parser.add_argument("--names", help="comma list of model names (default: every NAME.onnx there)")
    parser.add_argument("--run", type=Path, default=REPO / "bench" / "evidence",
                        help="a run whose run.json records the dataset the models were trained on")
    parser.add_argument("--seconds", type=float, default=4.0, help="least timing per model")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    names = args.names.split(",") if args.names else sorted(p.stem for p in args.models_dir.glob("*.onnx"))
    if not names:
        raise SystemExit(f"no .onnx files in {args.models_dir}")
    bundle = load_recorded_data(RunDir(args.run).load_meta()["data"], 32)
    calibration = calibration_images(bundle.calib)
    target = get_target("ort-cpu", threads=1)
    protocol = Protocol(min_seconds=args.seconds, max_seconds=4 * args.seconds)
    host = cpu_name()
    recipe = host_recipe()
    rows = []
    for name in names:
        fp32 = (args.models_dir / f"{name}.onnx").read_bytes()
        int8 = quantize_onnx(fp32, calibration, recipe)
        fp32_pred, labels = graph_predictions(fp32, bundle.val, threads=1)
        int8_pred, _ = graph_predictions(int8, bundle.val, threads=1)
        gate = AccuracyGate().judge(fp32_pred, int8_pred, labels)
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="published-int8-") as tmp:
            files = {"fp32": Path(tmp) / "fp32.onnx", "int8": Path(tmp) / "int8.onnx"}
            files["fp32"].write_bytes(fp32)
            files["int8"].write_bytes(int8)
            timings = time_interleaved({p: target.file_runner(f, 1) for p, f in files.items()}, protocol)
        rows.append({"name": name, "gate": gate, "load_before": load_before, "load_after": os.getloadavg()[0],
                     "timing": {p: t.to_dict() for p, t in timings.items()},
                     "speedup": timings["fp32"].median_ms / timings["int8"].median_ms})
        console.print(f"{name}: done")

    table = Table(title=f"published models in int8 on this host: {host}, ort-cpu 1 thread, batch 1, "
                        f"{len(bundle.val)} validation images")
    for column in ("model", "fp32 top-1", "int8 top-1", "drop", "agreement", "gate", "fp32 ms", "int8 ms",
                   "speed-up", "load"):
        table.add_column(column, justify="left" if column in ("model", "gate") else "right")
    for row in rows:
        g, t = row["gate"], row["timing"]
        table.add_row(row["name"], f"{g['fp32_top1']:.2f} %", f"{g['int8_top1']:.2f} %", f"{g['drop_points']:+.2f}",
                      f"{100 * g['agreement']:.2f} %", "passed" if g["passed"] else "FAILED",
                      f"{t['fp32']['median_ms']:.3f}", f"{t['int8']['median_ms']:.3f}", f"{row['speedup']:.2f}x",
                      f"{row['load_before']:.1f} -> {row['load_after']:.1f}")
    console.print(table)
    if args.json_out:
        atomic_write_json(args.json_out, {"about": "bench/published_int8.py", "host": host,
                                          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                          "recipe": recipe.to_dict(), "calibration_images": len(calibration),
                                          "models": rows, "val_images": len(bundle.val)})
        console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
