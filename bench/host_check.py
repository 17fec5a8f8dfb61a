"""How often does a cached latency table's host check reject a table measured on this very host?

`glit_deploy.latency.table.check_host` decides whether a cached table still describes the host. Each
repetition here builds a fresh `digits` table on ort-cpu (the test suite's short protocol: the noisiest
case), then, on the same host a moment later, applies

- the old rule (until 2026-12-02): the calibration model with the largest *reading* timed once more with
  the table's protocol, its ratio to the table;
- the rule in use: `check_host` itself (three calibration models by sum of parts, side by side over
  2 s, the median of their ratios; retimed after pauses while off).

A ratio beyond 1.5x either way rejects the table. On one host both should accept nearly always; where
they reject, the calibration readings printed next to it tell whether the table itself was measured in
a stretch of other load (every reading high: rejecting it is right) or one entry was (the old rule's
false alarm). Run it beside other load to see the shared host's worst case.

    .venv/bin/python bench/host_check.py --repeats 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_retrain import run_script

from glit_deploy.latency.measure import TABLE
from glit_deploy.latency.table import HOST_CHECK_FACTOR, check_host, profile_latency
from glit_deploy.latency.targets import get_target
from glit_deploy.nn import GLiT
from glit_deploy.space import Arch, get_space


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    os.environ["GLIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="glit-host-check-")
    torch.set_num_threads(1)
    space = get_space("digits")
    protocol = dataclasses.replace(TABLE, warmup=3, min_rounds=4, min_counted=4)  # the tests' FAST_LATENCY
    image = torch.randn(1, space.in_chans, space.image_size, space.image_size)
    rows = []
    for rep in range(args.repeats):
        target = get_target("ort-cpu", threads=1)
        table = profile_latency(space, 10, target, protocol=protocol, calibration_models=4, holdout_models=4,
                                seed=rep, use_cache=False)
        slowest = max(table.calibration, key=lambda c: c["measured_ms"])
        old = target.measure(GLiT(Arch.from_dict(slowest["arch"]), space, 10), image, protocol).median_ms \
            / slowest["measured_ms"]
        new = check_host(table, space, 10, target)
        rows.append({"repeat": rep, "load_average": os.getloadavg()[0], "old_ratio": old,
                     "old_rejects": not 1 / HOST_CHECK_FACTOR <= old <= HOST_CHECK_FACTOR,
                     "new_ratio": new["ratio"], "new_rejects": not new["agrees"], "new_ratios": new["ratios"],
                     "calibration_ms": [c["measured_ms"] for c in table.calibration],
                     "time": time.strftime("%H:%M:%S")})
    out = Table(title=f"host check on a table just measured here (digits, ort-cpu, 1 thread), {args.repeats} tables")
    for column in ("table", "load", "old rule", "rule in use", "calibration readings (ms)"):
        out.add_column(column)
    for r in rows:
        out.add_row(str(r["repeat"]), f"{r['load_average']:.2f}",
                    f"{r['old_ratio']:.2f}x" + (" REJECT" if r["old_rejects"] else ""),
                    " then ".join(f"{x:.2f}x" for x in r["new_ratios"]) + (" REJECT" if r["new_rejects"] else ""),
                    " ".join(f"{ms:.3f}" for ms in r["calibration_ms"]))
    Console(width=160).print(out)
    print(f"rejected: old rule {sum(r['old_rejects'] for r in rows)}/{len(rows)}, "
          f"rule in use {sum(r['new_rejects'] for r in rows)}/{len(rows)}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    run_script(main)
