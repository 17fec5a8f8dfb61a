"""ONNX export speed: onnxruntime CPU against PyTorch eager, and against this machine's matmul rate.

For the paper's GLiT-Tiny (random weights, 224 px, 1000 classes) and a `cifar` arch, times PyTorch
eager and several ONNX exports on onnxruntime's CPU provider at batch 1 and 8:

    ort (glit export)   what `glit export` writes: BN folded, depthwise conv as Conv2d, TorchScript exporter
    ort naive           the model exported as is (TorchScript exporter, no rewrite)
    ort dynamo          the rewritten model, dynamo exporter (opset 18)
    ort + optimizer     `glit export` plus onnxruntime's transformer optimizer (`--optimize`)

and, for GLiT-Tiny, float32 matrix multiplies of exactly the shapes of its Linear layers (torch and
numpy, the same thread count): the machine's matmul rate where it matters. The achieved rate of a
runtime is arch_cost MACs / median latency. Everything of one model and batch size is interleaved
(each round runs every variant once, in rotated order) so a shared machine's load hits all alike.
Goal (GLiT-Tiny, batch 1): ort >= 1.5x eager and >= 60 % of the matmul rate.

    python bench/export_speed.py [--threads 1] [--rounds 30] [--cifar-arch FILE] [--json-out F] [--md-out F]
"""

from __future__ import annotations

import argparse
import os
import sys

# Thread pools read these when they start: set them before numpy and torch load.
_THREADS = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--threads=")), None)
if _THREADS is None and "--threads" in sys.argv:
    _THREADS = int(sys.argv[sys.argv.index("--threads") + 1])
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(_THREADS or 1))

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from glit_deploy.export.onnx import export_onnx, onnx_bytes  # noqa: E402
from glit_deploy.export.onnx_export import optimize_onnx  # noqa: E402
from glit_deploy.export.rewrite import prepare_for_export  # noqa: E402
from glit_deploy.latency.measure import Protocol, time_interleaved  # noqa: E402
from glit_deploy.nn import GLiT  # noqa: E402
from glit_deploy.nn.counting import arch_cost  # noqa: E402
from glit_deploy.runtimes import cpu_name  # noqa: E402
from glit_deploy.space import NAMED_ARCHS, Arch, get_space  # noqa: E402

OUT = Path(__file__).parent / "out"
GOAL_SPEEDUP, GOAL_FRACTION = 1.5, 0.60


def default_cifar_arch() -> tuple[Arch, str]:
    winners = sorted((OUT / "search-cifar").glob("**/best-*.json"))
    if winners:
        return Arch.load(winners[0]), str(winners[0])
    return get_space("cifar").with_split([1] * 6), "cifar with_split([1]*6) (middle arch)"


def ort_session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def linear_shapes(model: torch.nn.Module, tokens: int) -> list[tuple[int, int]]:
    """(in, out) of every Linear that runs on all tokens (the head runs on the cls token only)."""
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "head"]


def gemm_runners(shapes: list[tuple[int, int]], rows: int) -> dict[str, tuple[Callable[[], None], int]]:
    """One pass over every Linear's matmul (rows x in @ in x out) in torch and in numpy, with its MACs."""
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((rows, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32))
             for k, n in shapes]
    torch_pairs = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in pairs]
    outs_np = [np.empty((rows, b.shape[1]), np.float32) for _, b in pairs]
    outs_t = [torch.from_numpy(o.copy()) for o in outs_np]
    macs = sum(rows * k * n for k, n in shapes)

    def run_torch() -> None:
        for (a, b), o in zip(torch_pairs, outs_t, strict=True):
            torch.mm(a, b, out=o)

    def run_numpy() -> None:
        for (a, b), o in zip(pairs, outs_np, strict=True):
            np.matmul(a, b, out=o)

    return {"sgemm torch": (run_torch, macs), "sgemm numpy": (run_numpy, macs)}


def bench_model(label: str, space_name: str, arch: Arch, num_classes: int, threads: int, batches: list[int],
                rounds: int, with_gemm: bool, console: Console) -> dict:
    torch.manual_seed(0)
    space = get_space(space_name)
    model = GLiT(arch, space, num_classes).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is really exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    macs = arch_cost(space, arch, num_classes).macs
    example = torch.randn(1, 3, space.image_size, space.image_size)
    deploy, applied = prepare_for_export(model)

    exports, export_seconds = {}, {}
    for name, make in (
        ("ort (glit export)", lambda: export_onnx(deploy, example, "torchscript")),
        ("ort naive", lambda: onnx_bytes(model, example, dynamic_batch=True)),
        ("ort dynamo", lambda: export_onnx(deploy, example, "dynamo", opset=18)),
    ):
        start = time.perf_counter()
        exports[name] = make()
        export_seconds[name] = time.perf_counter() - start
    start = time.perf_counter()
    exports["ort + optimizer"], fused = optimize_onnx(exports["ort (glit export)"])
    export_seconds["ort + optimizer"] = time.perf_counter() - start
    sessions = {name: ort_session(data, threads) for name, data in exports.items()}

    result = {"model": label, "space": space_name, "arch": arch.to_dict(), "macs": macs, "num_classes": num_classes,
              "image_size": space.image_size, "rewrites": applied, "export_seconds": export_seconds,
              "optimizer_fused": fused, "batches": {}}
    torch.set_num_threads(threads)
    for batch in batches:
        console.print(f"[dim]{label}: batch {batch}, {rounds} interleaved rounds[/]")
        x = torch.randn(batch, 3, space.image_size, space.image_size)
        feed = {"input": x.numpy()}
        with torch.inference_mode():
            reference = model(x).numpy()
        max_diff = {name: float(np.abs(s.run(None, feed)[0] - reference).max()) for name, s in sessions.items()}
        runners: dict[str, Callable[[], None]] = {"torch eager": lambda x=x: model(x)}
        for name, s in sessions.items():
            runners[name] = lambda s=s, feed=feed: s.run(None, feed)
        gemm_macs = {}
        if with_gemm:
            for name, (run, gmacs) in gemm_runners(linear_shapes(model, space.num_tokens),
                                                   batch * space.num_tokens).items():
                runners[name] = run
                gemm_macs[name] = gmacs
        with torch.inference_mode():
            timings = time_interleaved({name: (run, None) for name, run in runners.items()},
                                       Protocol(warmup=2, min_rounds=rounds, ci_target=1.0, max_seconds=1e9))
        medians = {name: t.median_ms for name, t in timings.items()}
        p90 = {name: t.p90_ms for name, t in timings.items()}
        rows = {}
        for name in runners:
            row = {"median_ms": medians[name], "p90_ms": p90[name]}
            if name in gemm_macs:
                row["gmacs_per_s"] = gemm_macs[name] / medians[name] / 1e6
            else:
                row["speedup_vs_eager"] = medians["torch eager"] / medians[name]
                row["gmacs_per_s"] = batch * macs / medians[name] / 1e6
                if name != "torch eager":
                    row["max_abs_diff_vs_eager"] = max_diff[name]
            rows[name] = row
        if gemm_macs:
            reference_rate = max(rows[n]["gmacs_per_s"] for n in gemm_macs)
            for name in runners:
                if name not in gemm_macs:
                    rows[name]["fraction_of_matmul_rate"] = rows[name]["gmacs_per_s"] / reference_rate
            result["batches"][str(batch)] = {"rows": rows, "matmul_rate_gmacs": reference_rate}
        else:
            result["batches"][str(batch)] = {"rows": rows}
    return result


def print_tables(results: list[dict], console: Console) -> None:
    for res in results:
        for batch, data in res["batches"].items():
            table = Table(title=f"{res['model']} ({res['macs'] / 1e6:.0f} M MACs/image), batch {batch}")
            for col in ("runtime", "median", "p90", "vs eager", "GMAC/s", "of matmul rate", "max |diff|"):
                table.add_column(col, justify="left" if col == "runtime" else "right")
            for name, row in data["rows"].items():
                table.add_row(name, f"{row['median_ms']:.2f} ms", f"{row['p90_ms']:.2f} ms",
                              f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else "-",
                              f"{row['gmacs_per_s']:.1f}",
                              f"{100 * row['fraction_of_matmul_rate']:.0f} %" if "fraction_of_matmul_rate" in row
                              else "-", f"{row['max_abs_diff_vs_eager']:.1e}" if "max_abs_diff_vs_eager" in row
                              else "-")
            console.print(table)


def markdown(results: list[dict], meta: dict) -> str:
    lines = []
    for res in results:
        lines.append(f"**{res['model']}** ({res['macs'] / 1e6:.0f} M multiply-adds per image, "
                     f"{res['image_size']} px)\n")
        lines.append("| batch | runtime | median | p90 | vs eager | GMAC/s | of matmul rate | max \\|diff\\| |")
        lines.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for batch, data in res["batches"].items():
            for name, row in data["rows"].items():
                lines.append(
                    f"| {batch} | {name} | {row['median_ms']:.2f} ms | {row['p90_ms']:.2f} ms | "
                    + (f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else "-") + " | "
                    + f"{row['gmacs_per_s']:.1f} | "
                    + (f"{100 * row['fraction_of_matmul_rate']:.0f} %" if "fraction_of_matmul_rate" in row else "-")
                    + " | " + (f"{row['max_abs_diff_vs_eager']:.1e}" if "max_abs_diff_vs_eager" in row else "-")
                    + " |")
        lines.append("")
        seconds = ", ".join(f"{k} {v:.1f} s" for k, v in res["export_seconds"].items())
        lines.append(f"Export time: {seconds}.\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="runtime threads (all runtimes alike)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per model and batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cifar-arch", type=Path, help="arch JSON (default: a bench/out/search-cifar winner, "
                        "else the cifar middle arch)")
    parser.add_argument("--json-out", type=Path, default=OUT / "export_speed.json")
    parser.add_argument("--md-out", type=Path, default=OUT / "section-export-speed-tables.md")
    args = parser.parse_args()
    console = Console(width=max(Console().width, 110))  # keep table rows on one line
    if args.cifar_arch:
        cifar_arch, cifar_source = Arch.load(args.cifar_arch), str(args.cifar_arch)
    else:
        cifar_arch, cifar_source = default_cifar_arch()
    started = time.time()
    results = [
        bench_model("GLiT-Tiny (paper arch)", NAMED_ARCHS["glit-tiny-paper"][0], NAMED_ARCHS["glit-tiny-paper"][1],
                    1000, args.threads, args.batches, args.rounds, True, console),
        bench_model(f"cifar arch ({cifar_source})", "cifar", cifar_arch, 10, args.threads, args.batches,
                    args.rounds, False, console),
    ]
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
            "threads": args.threads, "rounds": args.rounds, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
            "seconds": round(time.time() - started, 1), "argv": sys.argv}
    print_tables(results, console)
    tiny = results[0]["batches"][str(args.batches[0])]["rows"]["ort (glit export)"]
    console.print(f"GLiT-Tiny, batch {args.batches[0]}: {tiny['speedup_vs_eager']:.2f}x eager (goal "
                  f"{GOAL_SPEEDUP}x), {100 * tiny['fraction_of_matmul_rate']:.0f} % of the matmul rate "
                  f"(goal {100 * GOAL_FRACTION:.0f} %)")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    args.md_out.write_text(markdown(results, meta))
    console.print(f"wrote {args.json_out} and {args.md_out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
