"""Accuracy of the latency model (per-block table + calibration) against end-to-end measurement.

For each preset, builds the latency model on the target from scratch (no cache) and reports its
error on held-out whole models next to the measurement's own repeat noise, and the time the table
took to build. Goal (ort-cpu, batch 1): mean absolute error <= 5 %, >= 95 % of models within
+-10 %, and an error no larger than about the noise.

Every timing follows `glit_deploy.latency.measure` (clock readings of the deployable graph, the
median of the rounds the host left undisturbed; nothing rescaled): the table with the table
protocol, the calibration and held-out models with the same. Disturbed rounds are counted, and the
load average is printed before and after: the goal is stated for a quiet machine.

    python bench/latency_model.py [--presets digits cifar glit-tiny] [--target ort-cpu] [--holdout 20] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from glit_deploy.latency import get_target, profile_latency
from glit_deploy.space import get_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["digits", "cifar", "glit-tiny"])
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="0: the target's default")
    parser.add_argument("--calibration", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=20)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    os.environ["GLIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="glit-bench-cache-")  # always measure afresh

    rows = []
    load_before = os.getloadavg()
    for preset in args.presets:
        space = get_space(preset)
        num_classes = 1000 if preset.startswith("glit-") else 10
        target = get_target(args.target, args.threads or None)
        model = profile_latency(space, num_classes, target, args.batch_size,
                                calibration_models=args.calibration, holdout_models=args.holdout)
        r = model.report
        measured = [p["measured_ms"] for p in r.points]
        rows.append({"preset": preset, "variant": "clock", "device": model.key["device"],
                     "threads": model.key["threads"], "blocks": len(model.block_ms),
                     "build_seconds": model.build_seconds, "scale": model.scale, "offset_ms": model.offset_ms,
                     "rounds": model.rounds, "disturbed_rounds": model.disturbed_rounds,
                     "holdout": r.models, "mape": r.mape, "worst": r.worst, "within_5": r.within_5,
                     "within_10": r.within_10, "noise": r.noise,
                     "measured_range_ms": [min(measured), max(measured)], "points": r.points})
    load_after = os.getloadavg()

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
    console.print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    for r in rows:
        console.print(f"{r['preset']}: {r['disturbed_rounds']} of {r['rounds']} rounds disturbed, calibration "
                      f"{r['scale']:.3f} x parts {r['offset_ms']:+.4f} ms")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "load_before": load_before, "load_after": load_after},
                                            indent=2))


if __name__ == "__main__":
    main()
