"""Where the gap between two timings of one deployed file comes from: the session, the graph, or time.

Two readings of the same file minutes apart can differ by 15 % with no round disturbed (BENCHMARKS
section 8). This times, in each of `--repeats` repetitions:

- `--sessions` onnxruntime sessions of the file, interleaved round by round (`time_interleaved`), so that
  the host's drift falls on all of them: their spread is what the session itself contributes;
- with `--run`, also the graph the search timed for the run's winner (the same arch with fresh weights,
  `Target.graph`, as `glit search` builds it), as one more interleaved runner: whether the search's graph
  and the deployed file differ.

The spread between repetitions, one after the other, is the host's drift over time.

    python bench/session_drift.py --model RUN/export/model.onnx --run RUN --sessions 4 --repeats 4 \\
        [--json-out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from glit_deploy.latency.measure import DECISION, time_interleaved
from glit_deploy.latency.targets import get_target
from glit_deploy.nn.model import GLiT
from glit_deploy.rundir import RunDir
from glit_deploy.space import Arch

console = Console()


def search_graph(run: RunDir, workdir: Path, target: Any) -> Path:
    """The run's winner as the search times it: the arch with fresh weights, the target's deployable graph."""
    summary = json.loads((run.path / "search" / "summary.json").read_text())
    winner = next(r for r in summary["budgets"].values() if r.get("digest"))
    space = run.space()
    module = GLiT(Arch.from_dict(winner["arch"]), space, run.load_meta()["data"]["num_classes"]).eval()
    image = torch.randn(int(summary["batch_size"]), space.in_chans, space.image_size, space.image_size)
    path = workdir / "search-graph.onnx"
    path.write_bytes(target.graph(module, image))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the deployed ONNX file")
    parser.add_argument("--run", type=Path, help="its run directory: also time the search's graph of the winner")
    parser.add_argument("--target", default="ort-cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    target = get_target(args.target, args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        graph = search_graph(RunDir(args.run), Path(tmp), target) if args.run else None
        for repeat in range(args.repeats):
            load = os.getloadavg()[0]
            runners = {f"session {i + 1}": target.file_runner(args.model, 1) for i in range(args.sessions)}
            if graph is not None:
                runners["search's graph"] = target.file_runner(graph, 1)
            timings = time_interleaved(runners, DECISION)
            rows.append({"repeat": repeat + 1, "load": load,
                         "median_ms": {name: t.median_ms for name, t in timings.items()},
                         "disturbed": {name: f"{t.disturbed_rounds}/{t.rounds}" for name, t in timings.items()}})
    names = list(rows[0]["median_ms"])
    table = Table(title=f"{args.model}: medians (ms), interleaved within a repetition")
    for column in ("repeat", "load", *names, "spread of the sessions"):
        table.add_column(column, justify="right")
    for row in rows:
        sessions = [row["median_ms"][n] for n in names if n.startswith("session")]
        table.add_row(str(row["repeat"]), f"{row['load']:.2f}", *(f"{row['median_ms'][n]:.4f}" for n in names),
                      f"{100 * (max(sessions) / min(sessions) - 1):.1f} %")
    console.print(table)
    per_repeat = [statistics.median(r["median_ms"][n] for n in names if n.startswith("session")) for r in rows]
    console.print(f"between repetitions (the host over time): {min(per_repeat):.4f} .. {max(per_repeat):.4f} ms, "
                  f"{100 * (max(per_repeat) / min(per_repeat) - 1):.1f} %")
    if graph is not None:
        ratios = [r["median_ms"]["search's graph"] / statistics.median(
            r["median_ms"][n] for n in names if n.startswith("session")) for r in rows]
        console.print("search's graph / deployed file, per repetition: " + ", ".join(f"{x:.3f}" for x in ratios))
    if args.json_out:
        args.json_out.write_text(json.dumps({"model": str(args.model), "run": str(args.run) if args.run else None,
                                             "target": args.target, "threads": args.threads, "rows": rows},
                                            indent=2) + "\n")


if __name__ == "__main__":
    main()
