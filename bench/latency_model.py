"""Accuracy of the latency model (per-block table + calibration) against end-to-end measurement.

For each preset, builds the latency model on the target from scratch (no cache) and reports its
error on held-out whole models next to the measurement's own repeat noise, and the time the table
took to build. Goal (ort-cpu, batch 1): mean absolute error <= 5 %, >= 95 % of models within
+-10 %, and an error no larger than about the noise.

On CPU targets every timing is normalised to a reference block timed alongside it. The same run
also rebuilds the model from the clock's own readings (table, calibration and held-out models as
timed, not normalised), so the two are compared on identical measurements: the row "clock" is what
the table would be without normalisation.

    python bench/latency_model.py [--presets cifar glit-tiny] [--target ort-cpu] [--holdout 20] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from glit_deploy.latency import ErrorReport, LatencyModel, Protocol, get_target, profile_latency
from glit_deploy.latency.table import fit_calibration
from glit_deploy.space import Arch, get_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cifar", "glit-tiny"])
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="0: the target's default")
    parser.add_argument("--calibration", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=20)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    os.environ["GLIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="glit-bench-cache-")  # always measure afresh

    rows = []
    for preset in args.presets:
        space = get_space(preset)
        num_classes = 1000 if preset.startswith("glit-") else 10
        target = get_target(args.target, args.threads or None)
        model = profile_latency(space, num_classes, target, args.batch_size, Protocol(),
                                calibration_models=args.calibration, holdout_models=args.holdout)
        variants = {"normalised": (model.report, model)}
        if model.clock is not None:
            variants["clock"] = clock_model(model)
        for variant, (r, fitted) in variants.items():
            measured = [p["measured_ms"] for p in r.points]
            rows.append({"preset": preset, "variant": variant, "device": model.key["device"],
                         "threads": model.key["threads"], "blocks": len(model.block_ms),
                         "build_seconds": model.build_seconds, "scale": fitted.scale, "offset_ms": fitted.offset_ms,
                         "reference_ms": model.reference_ms, "reference_drift": model.reference_drift,
                         "holdout": r.models, "mape": r.mape, "worst": r.worst, "within_5": r.within_5,
                         "within_10": r.within_10, "noise": r.noise,
                         "measured_range_ms": [min(measured), max(measured)], "points": r.points})

    table = Table(title=f"latency model on {args.target}, batch {args.batch_size}: error on held-out models")
    for column in ("preset", "timings", "held-out", "latency range", "mean abs. error", "worst", "within 5 %",
                   "within 10 %", "repeat noise", "table built in"):
        table.add_column(column)
    for r in rows:
        lo, hi = r["measured_range_ms"]
        table.add_row(r["preset"], r["variant"], str(r["holdout"]), f"{lo:.3f}-{hi:.3f} ms", f"{r['mape']:.2f} %",
                      f"{r['worst']:.2f} %", f"{100 * r['within_5']:.0f} %", f"{100 * r['within_10']:.0f} %",
                      f"{r['noise']:.2f} %", f"{r['build_seconds']:.0f} s ({r['blocks']} blocks)")
    console = Console()
    console.print(table)
    console.print(f"device: {rows[0]['device']}, {rows[0]['threads']} thread(s)")
    for r in rows:
        if r["reference_ms"] is not None and r["variant"] == "normalised":
            console.print(f"{r['preset']}: the reference block's speed moved {100 * r['reference_drift']:.1f} % "
                          f"(p90/p10) during the build; timings rescaled to {r['reference_ms']:.4f} ms")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


def clock_model(model: LatencyModel) -> tuple[ErrorReport, LatencyModel]:
    """The same measurements as the clock read them: held-out error, and the table and calibration."""
    clock = LatencyModel(key=model.key, block_ms=model.clock["block_ms"], stem_ms=model.clock["stem_ms"],
                         head_ms=model.clock["head_ms"])
    clock.calibration = [{"raw_ms": clock.raw_ms(Arch.from_dict(p["arch"])), "measured_ms": p["clock_ms"]}
                         for p in model.calibration]
    clock.scale, clock.offset_ms = fit_calibration(clock.calibration)
    report = ErrorReport.from_points([
        {"digest": p["digest"], "predicted_ms": clock.predict_ms(Arch.from_dict(p["arch"])),
         "measured_ms": p["clock_ms"], "repeat_ms": p["repeat_clock_ms"]} for p in model.report.points])
    return report, clock


if __name__ == "__main__":
    main()
