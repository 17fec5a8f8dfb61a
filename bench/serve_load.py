"""Throughput and latency of `glit serve` under load, next to the raw onnxruntime session.

Starts `glit serve` on 127.0.0.1 as its own process with a `cifar` model (32x32 px, 10 classes) and
drives it with closed-loop clients (each keeps one request in flight on its own keep-alive
connection) at concurrency 1, 8 and 32; every request is a multipart upload of one real CIFAR-10
image encoded as PNG. In the same run, the raw onnxruntime session (same model, same threads) is
timed at batch 1, 8 and 32 on already-preprocessed inputs, before and after the server runs (the
machine is shared: the baseline is the mean of the two passes). Goal: at concurrency 8 the server
delivers at least 80 % of the raw session's best throughput.

Without --model, a GLiT of the `cifar` space (arch from --arch, else the best-*.json winner under
bench/out/search-cifar/search/, else space.with_split([1]*6)) is exported with random weights plus
metadata: its speed does not depend on the weights.

    python bench/serve_load.py [--model M.onnx | --arch A.json] [--threads 1] [--seconds 8]

With --memory it runs the memory case instead (issue 11): --uploads concurrent connections each
upload an --upload-bytes PNG as a raw image/png body at full speed (or at --upload-rate bytes/s),
retrying after a refusal (waiting about the Retry-After), while a few clients keep sending normal
one-image requests and a prober times /healthz. It reports the answers each kind got, /healthz's
worst latency, and the server's peak RSS (VmHWM) against the bound the server's settings imply.

    python bench/serve_load.py --memory [--uploads 1000] [--upload-bytes 8000000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import multiprocessing
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
CIFAR_DIR = REPO.parent / "shared" / "data" / "cifar10"
console = Console(width=max(140, Console().width))


# ---------------------------------------------------------------- model and images


def pick_arch(arch_file: Path | None) -> tuple[Any, Any, str]:
    from glit_deploy.space import Arch, get_space

    space = get_space("cifar")
    if arch_file is None:
        winners = sorted((OUT / "search-cifar" / "search").glob("best-*.json"))
        arch_file = winners[-1] if winners else None
    if arch_file is None:
        return space, space.with_split([1] * space.depth), "space.with_split([1]*6)"
    return space, space.validate(Arch.load(arch_file), source=str(arch_file)), str(arch_file)


def export_random_cifar_model(arch_file: Path | None, class_names: list[str], path: Path) -> str:
    import onnx
    import torch

    from glit_deploy.data import CIFAR10_MEAN, CIFAR10_STD
    from glit_deploy.export.metadata import ModelMetadata, attach_metadata
    from glit_deploy.export.onnx import onnx_bytes
    from glit_deploy.nn import GLiT

    space, arch, source = pick_arch(arch_file)
    torch.manual_seed(0)
    model = GLiT(arch, space, len(class_names)).eval()
    proto = onnx.load_from_string(onnx_bytes(model, torch.randn(1, 3, 32, 32), dynamic_batch=True))
    meta = ModelMetadata(arch=arch.to_dict(), space=space.to_dict(), image_size=32, mean=CIFAR10_MEAN,
                         std=CIFAR10_STD, class_names=tuple(class_names), label="bench-untrained")
    attach_metadata(proto, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return f"{source}: {arch.describe(space.num_heads)}"


def cifar_pngs(count: int) -> tuple[list[bytes], list[str]]:
    from PIL import Image

    with np.load(CIFAR_DIR / "train_1.npz", allow_pickle=False) as z:
        images, names = z["images"][:count], [str(c) for c in z["class_names"]]
    pngs = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, names


# ---------------------------------------------------------------- raw session


def raw_throughput(model: Path, threads: int, pngs: list[bytes], batch_sizes: list[int], seconds: float
                   ) -> dict[int, dict[str, float]]:
    from glit_deploy.serve import Predictor

    predictor = Predictor.load(model, "cpu", threads)
    inputs = np.stack([predictor.image_to_input(png) for png in pngs])
    results = {}
    for batch in batch_sizes:
        x = np.ascontiguousarray(inputs[:batch])
        for _ in range(5):
            predictor.logits(x)
        runs, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            predictor.logits(x)
            runs += 1
        results[batch] = {"images_per_s": runs * batch / elapsed, "ms_per_batch": 1e3 * elapsed / runs}
    return results


def decode_cost_us(model: Path, pngs: list[bytes]) -> float:
    """PNG decode + resize + normalise per image, in microseconds (what the server adds per image)."""
    from glit_deploy.serve import Predictor

    predictor = Predictor.load(model, "cpu", 1)
    started = time.perf_counter()
    for png in pngs * 4:
        predictor.image_to_input(png)
    return 1e6 * (time.perf_counter() - started) / (4 * len(pngs))


# ---------------------------------------------------------------- server and load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, threads: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "glit_deploy", "serve", "--model", str(model), "--port", str(port),
           "--threads", str(threads), "--provider", "cpu", "--log-level", "warning", *extra]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("server not ready after 120 s")


def predict_request(png: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode() + png + f"\r\n--{boundary}--\r\n".encode())
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _client(port: int, requests: list[bytes], offset: int, stop_at: float, record_from: float,
                  latencies: list[float], errors: list[str]) -> None:
    """One keep-alive connection with one request in flight (a minimal HTTP/1.1 client: cheap per request)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = offset
    try:
        while (now := time.perf_counter()) < stop_at:
            writer.write(requests[n % len(requests)])
            n += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0].decode())
            elif now >= record_from:
                latencies.append(time.perf_counter() - now)
    finally:
        writer.close()


def run_load(port: int, requests: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []

    async def main() -> float:
        start = time.perf_counter()
        record_from, stop_at = start + warmup, start + warmup + seconds
        await asyncio.gather(*(_client(port, requests, 97 * i, stop_at, record_from, latencies, errors)
                               for i in range(concurrency)))
        return time.perf_counter() - record_from

    elapsed = asyncio.run(main())
    ordered = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(ordered), "errors": len(errors),
            "error_samples": errors[:5], "requests_per_s": len(ordered) / elapsed,
            "p50_ms": 1e3 * statistics.median(ordered), "p99_ms": 1e3 * ordered[int(0.99 * (len(ordered) - 1))]}


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def batch_stats(port: int) -> tuple[float, float]:
    """(batches, images) run so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return values.get("glit_batch_size_count", 0.0), values.get("glit_batch_size_sum", 0.0)


# ---------------------------------------------------------------- memory case


def noise_png(size_bytes: int) -> bytes:
    """A real PNG of random pixels (incompressible) of about `size_bytes`, so the server decodes every upload."""
    from PIL import Image

    side = int((size_bytes / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of `pid` in bytes, from /proc (Linux)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server keeps the connection) of one response, its body read."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return int(lines[0].split()[1]), headers.get(b"connection", b"").lower() != b"close"


async def _uploader(port: int, body: bytes, rate: float | None, stop_at: float, outcomes: dict[str, int]) -> None:
    """Upload `body` again and again on fresh connections until one is answered 200 or time is up."""
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    view, chunk = memoryview(body), 256 * 1024 if rate is None else max(1, int(rate / 10))
    await asyncio.sleep(random.uniform(0, 0.5))  # the connections open over half a second, not in one instant
    while time.perf_counter() < stop_at:
        outcome = "reset before an answer"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcome = "connect failed"
        else:
            answer = asyncio.ensure_future(_read_answer(reader))
            try:
                writer.write(head)
                for offset in range(0, len(body), chunk):
                    if answer.done():  # refused while sending: stop pushing the body
                        break
                    writer.write(view[offset:offset + chunk])
                    await writer.drain()
                    if rate is not None:
                        await asyncio.sleep(chunk / rate)
                outcome = str((await asyncio.wait_for(answer, timeout=120))[0])
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                await asyncio.wait([answer], timeout=2)  # a refusal may be read just after the send failed
                if answer.done() and not answer.cancelled() and answer.exception() is None:
                    outcome = str(answer.result()[0])
            finally:
                answer.cancel()
                writer.close()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "200":
            return
        await asyncio.sleep(random.uniform(0.5, 1.5))  # about the Retry-After (1 s), spread out


def _upload_process(port: int, body: bytes, uploads: int, rate: float | None, seconds: float, results: Any) -> None:
    """The uploaders, in a process of their own, so that their event loop (1,000 connections pushing
    megabytes) does not delay the normal clients' and the prober's, whose latencies are measured."""
    outcomes: dict[str, int] = {}

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(_uploader(port, body, rate, stop_at, outcomes) for _ in range(uploads)))

    asyncio.run(main())
    results.put(outcomes)


async def _normal_client(port: int, requests: list[bytes], offset: int, stop_at: float, statuses: dict[str, int],
                         latencies: list[float]) -> None:
    """One small request at a time, each on a fresh connection (so any failure is the server's, not a
    kept-alive connection the server closed while idle)."""
    n = offset
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(requests[n % len(requests)])
            n += 1
            outcome = str((await asyncio.wait_for(_read_answer(reader), timeout=60))[0])
            writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            outcome = f"connection error ({type(exc).__name__})"
        latencies.append(time.perf_counter() - started)
        statuses[outcome] = statuses.get(outcome, 0) + 1
        if outcome != "200":
            await asyncio.sleep(0.05)


async def _healthz_prober(port: int, stop_at: float, latencies: list[float], failures: list[str]) -> None:
    """GET /healthz every 50 ms on a fresh connection (what a liveness probe does)."""
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            status, _ = await asyncio.wait_for(_read_answer(reader), timeout=30)
            writer.close()
            if status != 200:
                failures.append(str(status))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            failures.append(type(exc).__name__)
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)


def run_memory_case(args: argparse.Namespace, model: Path, source: str, pngs: list[bytes]) -> dict[str, Any]:
    from glit_deploy.runtimes import cpu_name

    upload = noise_png(args.upload_bytes)
    server_args = [*args.server_arg]

    def flag(option: str, default: int) -> int:
        return int(server_args[server_args.index(option) + 1]) if option in server_args else default

    max_body, in_flight = flag("--max-body-bytes", 8 * 2**20), flag("--max-bytes-in-flight", 256 * 2**20)
    if len(upload) > max_body:
        raise SystemExit(f"the upload ({len(upload):,} bytes) is over --max-body-bytes {max_body:,}")
    port = free_port()
    load_at_start = os.getloadavg()[0]
    proc = start_server(model, port, args.threads, server_args, OUT / "serve_memory_server.log")
    requests = [predict_request(png) for png in pngs]
    rss_samples: list[int] = []
    fd_samples: list[int] = []
    uploads: dict[str, int] = {}
    normal: dict[str, int] = {}
    normal_latencies: list[float] = []
    health_latencies: list[float] = []
    health_failures: list[str] = []
    try:
        # one request of each kind first, so that the baseline includes what serving itself allocates
        asyncio.run(_normal_client(port, requests, 0, time.perf_counter() + 0.5, {}, []))
        baseline = vm_status(proc.pid)

        async def sample_rss(stop_at: float) -> None:
            while time.perf_counter() < stop_at:
                rss_samples.append(vm_status(proc.pid)["VmRSS"])
                fd_samples.append(len(os.listdir(f"/proc/{proc.pid}/fd")))  # mostly the open connections
                await asyncio.sleep(0.05)

        async def main() -> None:
            stop_at = time.perf_counter() + args.seconds
            await asyncio.gather(
                *(_normal_client(port, requests, 97 * i, stop_at, normal, normal_latencies)
                  for i in range(args.normal_clients)),
                _healthz_prober(port, stop_at, health_latencies, health_failures), sample_rss(stop_at))

        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        uploader = context.Process(target=_upload_process, args=(port, upload, args.uploads, args.upload_rate,
                                                                 args.seconds, results))
        cpu_before, started = thread_cpu_seconds(proc.pid), time.perf_counter()
        uploader.start()
        asyncio.run(main())
        uploads = results.get(timeout=300)  # the uploads in progress when time is up finish first
        uploader.join()
        elapsed = time.perf_counter() - started
        cpu_after, peak = thread_cpu_seconds(proc.pid), vm_status(proc.pid)
    finally:
        proc.terminate()
        exit_code = proc.wait(timeout=120)
    # The bound, from the settings alone: what the server held before the flood; three times the body budget
    # (a body's chunks as received, their join into one buffer, and its decoded pixels, about as many bytes as
    # the body for these incompressible PNGs); and per connection the bench can have open at once, the
    # 0.5 MiB uvicorn may buffer before the app reads or refuses a body (its 64 KiB high-water mark plus one
    # 256 KiB socket read, copied once into h11's buffer).
    connections = args.uploads + args.normal_clients + 1
    bound = baseline["VmRSS"] + 3 * in_flight + connections * 2**19
    ordered = sorted(normal_latencies)
    return {
        "date": datetime.date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "model": str(model), "model_source": source, "server_args": server_args, "server_exit_code": exit_code,
        "uploads": args.uploads, "upload_bytes": len(upload), "upload_rate": args.upload_rate,
        "seconds": args.seconds, "elapsed_s": elapsed, "normal_clients": args.normal_clients,
        "max_body_bytes": max_body, "max_bytes_in_flight": in_flight,
        "upload_outcomes": uploads, "normal_outcomes": normal,
        "normal_p50_ms": 1e3 * statistics.median(ordered) if ordered else None,
        "normal_p99_ms": 1e3 * ordered[int(0.99 * (len(ordered) - 1))] if ordered else None,
        "healthz_probes": len(health_latencies), "healthz_failures": health_failures,
        "healthz_max_ms": 1e3 * max(health_latencies) if health_latencies else None,
        "rss_baseline": baseline["VmRSS"], "rss_peak_sampled": max(rss_samples, default=0),
        "vm_hwm": peak["VmHWM"], "rss_bound": bound, "within_bound": peak["VmHWM"] <= bound,
        "open_fds_peak": max(fd_samples, default=0),
        "load_average": [load_at_start, os.getloadavg()[0]],
        # the event loop is the main thread; decoding and inference run on the others
        "server_cpu_s": {"event_loop": cpu_after.get(proc.pid, 0.0) - cpu_before.get(proc.pid, 0.0),
                         "other_threads": sum(v - cpu_before.get(t, 0.0) for t, v in cpu_after.items()
                                              if t != proc.pid)},
    }


def print_memory_case(result: dict[str, Any]) -> None:
    mib = 2**20
    rate = "full speed" if result["upload_rate"] is None else f"{result['upload_rate'] / 1e6:g} MB/s each"
    console.print(f"{result['uploads']} connections uploading {result['upload_bytes']:,}-byte PNGs ({rate}) "
                  f"for {result['elapsed_s']:.0f} s, {result['normal_clients']} normal clients; load average "
                  f"{result['load_average'][0]:.1f} -> {result['load_average'][1]:.1f}")
    console.print(f"  upload answers: {dict(sorted(result['upload_outcomes'].items()))}")
    console.print(f"  normal answers: {dict(sorted(result['normal_outcomes'].items()))}, p50 "
                  f"{result['normal_p50_ms']:.1f} ms, p99 {result['normal_p99_ms']:.1f} ms")
    console.print(f"  /healthz: {result['healthz_probes']} probes, {len(result['healthz_failures'])} failed, "
                  f"worst {result['healthz_max_ms']:.0f} ms")
    cpu = result["server_cpu_s"]
    console.print(f"  server CPU: event loop {cpu['event_loop']:.1f} s, other threads {cpu['other_threads']:.1f} s "
                  f"in {result['elapsed_s']:.0f} s")
    console.print(f"  server file descriptors (mostly connections): at most {result['open_fds_peak']} sampled")
    console.print(f"  server RSS: {result['rss_baseline'] / mib:.0f} MiB before, peak (VmHWM) "
                  f"{result['vm_hwm'] / mib:.0f} MiB, bound {result['rss_bound'] / mib:.0f} MiB: "
                  f"{'within' if result['within_bound'] else 'OVER'}; server exit code {result['server_exit_code']}")


# ---------------------------------------------------------------- report


def write_section(result: dict[str, Any], path: Path, command: str) -> None:
    raw, server = result["raw"], result["server"]
    best = result["raw_best_images_per_s"]
    lines = [
        "## Serving under load (`glit serve`)",
        "",
        "`bench/serve_load.py` starts `glit serve` on 127.0.0.1 as its own process and drives it with",
        "closed-loop clients (each keeps one request in flight on its own keep-alive connection; a minimal",
        "asyncio HTTP/1.1 client in the bench process) at concurrency 1, 8 and 32. Every request is a",
        "multipart upload of one real CIFAR-10 training image encoded as PNG, so each includes HTTP and",
        "multipart parsing, PNG decoding, normalisation, dynamic micro-batching, onnxruntime and the JSON",
        "answer (top-5). Next to it, in the same run, the raw onnxruntime session (same model, same",
        "thread count) is timed at batch 1, 8 and 32 on already-preprocessed inputs, once before and once",
        "after the server (the baseline is the mean of the two passes, since the machine is shared).",
        "Goal: at concurrency 8 the server delivers at least 80 % of the raw session's best throughput.",
        "",
        f"- Model: {result['model_source']}" + (" (random, untrained weights: speed does not depend on them)"
                                                 if result["untrained"] else ""),
        f"- Date: {result['date']}; machine: {result['machine']}; onnxruntime {result['onnxruntime']}, "
        f"{result['threads']} intra-op thread(s), CPU provider. Load average (1 min) from other work on the "
        f"machine: {result['load_average'][0]:.1f} at the start, {result['load_average'][1]:.1f} at the end.",
        f"- Server settings: {' '.join(result['server_args']) or 'the defaults'} (max batch "
        f"{result['max_batch_size']}, max wait {result['max_wait_ms']:g} ms); {result['seconds']:g} s measured "
        f"per level after {result['warmup']:g} s of warm-up load.",
        "- Command:",
        "",
        "```",
        command,
        "```",
        "",
        "| | batch / concurrency | throughput (images/s) | p50 latency | p99 latency | mean batch run | "
        "vs raw best |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch, row in raw.items():
        lines.append(f"| raw onnxruntime session | batch {batch} | {row['images_per_s']:.0f} "
                     f"({row['passes'][0]:.0f} / {row['passes'][1]:.0f}) | {row['ms_per_batch']:.2f} ms per batch | "
                     f"| | {100 * row['images_per_s'] / best:.0f} % |")
    for row in server:
        lines.append(f"| `glit serve` | concurrency {row['concurrency']} | {row['requests_per_s']:.0f} | "
                     f"{row['p50_ms']:.2f} ms | {row['p99_ms']:.2f} ms | {row['mean_batch']:.1f} | "
                     f"{100 * row['requests_per_s'] / best:.0f} % |")
    lines += ["", "Where the server's CPU went (per thread, from /proc; warm-up load included):", "",
              "| concurrency | event loop: CPU per request | its share of a core | inference thread: CPU per image | "
              "its share of a core | client: CPU per request |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in server:
        cpu = row["cpu"]
        lines.append(f"| {row['concurrency']} | {cpu['loop_ms_per_request']:.2f} ms | "
                     f"{100 * cpu['loop_core_share']:.0f} % | {cpu['other_threads_ms_per_image']:.2f} ms | "
                     f"{100 * cpu['other_core_share']:.0f} % | "
                     f"{cpu['client_ms_per_request']:.2f} ms |")
    at8 = next((r for r in server if r["concurrency"] == 8), None)
    lines += ["", f"PNG decode + resize + normalise: {result['decode_us_per_image']:.0f} µs per image (one thread).",
              f"Errors: {sum(r['errors'] for r in server)} of {sum(r['requests'] for r in server)} requests.", ""]
    if at8:
        verdict = "meets" if at8["requests_per_s"] >= 0.8 * best else "misses"
        share = 100 * at8["requests_per_s"] / best
        lines.append(f"Reading: at concurrency 8 the server delivers {share:.0f} % of the raw "
                     f"session's best throughput ({at8['requests_per_s']:.0f} vs {best:.0f} images/s): it "
                     f"{verdict} the 80 % goal. {result.get('reading', '')}".rstrip())
    path.write_text("\n".join(lines) + "\n")


def shown_command(argv: list[str]) -> str:
    """The command line for the section, without the --reading prose."""
    shown, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--reading="):
            skip = False
            continue
        skip = arg == "--reading"
        if not skip:
            shown.append(arg)
    return " ".join(["python bench/serve_load.py", *shown])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="An exported cifar model (default: export one, untrained)")
    parser.add_argument("--arch", type=Path, help="Arch JSON for the exported model")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (server and raw)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=8.0, help="Measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="Seconds of load before measuring each level")
    parser.add_argument("--server-arg", action="append", default=[], help="Extra `glit serve` option (repeat)")
    parser.add_argument("--reading", default="", help="Sentences appended to the section's reading (not shown in "
                        "its command line)")
    parser.add_argument("--memory", action="store_true", help="Run the memory case instead (see above)")
    parser.add_argument("--uploads", type=int, default=1000, help="Memory case: concurrent uploading connections")
    parser.add_argument("--upload-bytes", type=int, default=8_000_000, help="Memory case: size of each upload")
    parser.add_argument("--upload-rate", type=float, help="Memory case: bytes/s per upload (default: full speed)")
    parser.add_argument("--normal-clients", type=int, default=4, help="Memory case: clients of small requests")
    parser.add_argument("--json-out", type=Path, default=OUT / "serve_load.json")
    parser.add_argument("--section-out", type=Path, default=OUT / "section-serve-load.md")
    args = parser.parse_args()
    import onnxruntime

    from glit_deploy.runtimes import cpu_name

    OUT.mkdir(parents=True, exist_ok=True)
    pngs, class_names = cifar_pngs(512)
    if args.model:
        model, source, untrained = args.model, str(args.model), False
    else:
        model = OUT / "serve_load_model.onnx"
        source, untrained = export_random_cifar_model(args.arch, class_names, model), True
        console.print(f"exported {model} (untrained weights: speed does not depend on them)\n  arch {source}")

    if args.memory:
        result = run_memory_case(args, model, source, pngs)
        print_memory_case(result)
        path = args.json_out.with_name("serve_memory.json") if args.json_out == OUT / "serve_load.json" \
            else args.json_out
        path.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {path}")
        return

    load_at_start = os.getloadavg()[0]
    raw_first = raw_throughput(model, args.threads, pngs, args.batch_sizes, args.seconds / 2)
    decode_us = decode_cost_us(model, pngs)
    port = free_port()
    server_args = [*args.server_arg]
    proc = start_server(model, port, args.threads, server_args, OUT / "serve_load_server.log")
    server_rows = []
    try:
        requests = [predict_request(png) for png in pngs]
        for concurrency in args.concurrency:
            batches_before, images_before = batch_stats(port)
            cpu_before, client_before, wall_before = thread_cpu_seconds(proc.pid), time.process_time(), time.time()
            row = run_load(port, requests, concurrency, args.seconds, args.warmup)
            cpu_after, client_after, wall = thread_cpu_seconds(proc.pid), time.process_time(), time.time() - wall_before
            batches_after, images_after = batch_stats(port)
            row["mean_batch"] = (images_after - images_before) / max(1.0, batches_after - batches_before)
            # where the CPU went (over warm-up + measured load): the event loop is the main thread, inference
            # runs on the other busy thread
            served = images_after - images_before
            loop_s = cpu_after.get(proc.pid, 0.0) - cpu_before.get(proc.pid, 0.0)
            other_s = sum(v - cpu_before.get(t, 0.0) for t, v in cpu_after.items() if t != proc.pid)
            row["cpu"] = {"loop_ms_per_request": 1e3 * loop_s / served, "loop_core_share": loop_s / wall,
                          "other_threads_ms_per_image": 1e3 * other_s / served, "other_core_share": other_s / wall,
                          "client_ms_per_request": 1e3 * (client_after - client_before) / served}
            server_rows.append(row)
            cpu = row["cpu"]
            console.print(f"concurrency {concurrency}: {row['requests_per_s']:.0f} req/s, p50 {row['p50_ms']:.2f} ms, "
                          f"p99 {row['p99_ms']:.2f} ms, mean batch {row['mean_batch']:.1f}, {row['errors']} errors; "
                          f"event loop {cpu['loop_ms_per_request']:.2f} ms CPU/request ({cpu['loop_core_share']:.0%} "
                          f"of a core), inference thread {cpu['other_threads_ms_per_image']:.2f} ms CPU/image "
                          f"({cpu['other_core_share']:.0%}), client {cpu['client_ms_per_request']:.2f} ms/request")
    finally:
        proc.terminate()
        exit_code = proc.wait(timeout=60)
    raw_second = raw_throughput(model, args.threads, pngs, args.batch_sizes, args.seconds / 2)
    raw = {b: {"images_per_s": (raw_first[b]["images_per_s"] + raw_second[b]["images_per_s"]) / 2,
               "ms_per_batch": (raw_first[b]["ms_per_batch"] + raw_second[b]["ms_per_batch"]) / 2,
               "passes": [raw_first[b]["images_per_s"], raw_second[b]["images_per_s"]]} for b in args.batch_sizes}
    best = max(r["images_per_s"] for r in raw.values())

    def flag(option: str, default: str) -> str:
        return server_args[server_args.index(option) + 1] if option in server_args else default

    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "threads": args.threads,
        "model": str(model), "model_source": source, "untrained": untrained, "seconds": args.seconds,
        "warmup": args.warmup, "server_args": server_args, "server_exit_code": exit_code,
        "max_batch_size": int(flag("--max-batch-size", "32")), "max_wait_ms": float(flag("--max-wait-ms", "5")),
        "decode_us_per_image": decode_us, "raw": raw, "raw_best_images_per_s": best, "server": server_rows,
        "reading": args.reading, "load_average": [load_at_start, os.getloadavg()[0]],
    }
    table = Table(title=f"glit serve vs raw onnxruntime ({args.threads} thread(s); raw best {best:.0f} images/s)")
    for column in ("", "batch / concurrency", "images/s", "p50", "p99", "mean batch", "vs raw best"):
        table.add_column(column)
    for batch, row in raw.items():
        table.add_row("raw session", f"batch {batch}", f"{row['images_per_s']:.0f}",
                      f"{row['ms_per_batch']:.2f} ms/batch", "", "", f"{row['images_per_s'] / best:.0%}")
    for row in server_rows:
        table.add_row("glit serve", f"concurrency {row['concurrency']}", f"{row['requests_per_s']:.0f}",
                      f"{row['p50_ms']:.2f} ms", f"{row['p99_ms']:.2f} ms", f"{row['mean_batch']:.1f}",
                      f"{row['requests_per_s'] / best:.0%}")
    console.print(table)
    console.print(f"PNG decode+preprocess {decode_us:.0f} µs/image; server exit code {exit_code}")
    args.json_out.write_text(json.dumps(result, indent=2))
    write_section(result, args.section_out, shown_command(sys.argv[1:]))
    console.print(f"wrote {args.json_out} and {args.section_out}")


if __name__ == "__main__":
    main()
