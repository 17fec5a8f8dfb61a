"""`glit serve` as a real server process on 127.0.0.1: endpoints, bad input, limits, load, drain."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BODY_LIMIT = 256 * 1024
PIXEL_LIMIT = 1_000_000


# ---------------------------------------------------------------- model and images


@pytest.fixture(scope="session")
def digits_onnx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained digits model exported to ONNX with its metadata (what `glit export` writes)."""
    exported = os.environ.get("GLIT_TEST_SERVE_ONNX")  # .ci/run's floors check: the one its first session exported
    if exported:
        return Path(exported)
    path = tmp_path_factory.getbasetemp() / "serve-models" / "digits.onnx"
    if path.exists():  # this fixture is imported by test_predict too: export once per session
        return path
    import onnx
    import torch

    from glit_deploy.export.metadata import ModelMetadata, attach_metadata
    from glit_deploy.export.onnx import onnx_bytes
    from glit_deploy.rundir import RunDir
    from glit_deploy.trained import load_trained_model

    model, info = load_trained_model(RunDir(request.getfixturevalue("deployable_digits_run")))
    proto = onnx.load_from_string(onnx_bytes(model, torch.randn(1, 3, 8, 8), dynamic_batch=True))
    attach_metadata(proto, ModelMetadata.from_trained(info))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def digit_images() -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """64 validation digits as PNG files, their labels, and the training pipeline's own preprocessing."""
    from glit_deploy.data import load_digits_bundle

    val = load_digits_bundle().val
    count = 64
    pngs = [png_bytes(val.images[i].permute(1, 2, 0).numpy()) for i in range(count)]
    labels = np.array([val[i][1] for i in range(count)])
    reference_inputs = np.stack([val[i][0].numpy() for i in range(count)])  # ToDtype(scale) + Normalize
    return pngs, labels, reference_inputs


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data (a decompression bomb's shape)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "glit_deploy", "serve", "--model", str(model), "--port", str(self.port),
                 "--threads", "1", "--log-level", "warning", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not ready after 90 s:\n{log.read_text()}")

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], Any]:
        own = conn is None
        conn = conn or self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            is_json = response.getheader("content-type", "").startswith("application/json")
            return response.status, dict(response.getheaders()), json.loads(data) if is_json else data.decode()
        finally:
            if own:
                conn.close()

    def predict(self, files: list[tuple[str, bytes]], conn: http.client.HTTPConnection | None = None,
                query: str = "") -> tuple[int, dict[str, str], Any]:
        body, content_type = multipart(files)
        return self.request("POST", "/predict" + query, body, {"Content-Type": content_type}, conn)

    def metrics(self) -> dict[str, Any]:
        from prometheus_client.parser import text_string_to_metric_families

        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        return {family.name: family for family in text_string_to_metric_families(text)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(digits_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = Server(digits_onnx, tmp_path_factory.mktemp("serve") / "server.log", "--max-body-bytes", str(BODY_LIMIT),
                 "--max-image-pixels", str(PIXEL_LIMIT), "--max-images-per-request", "16")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def sample(metrics: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    return sum(s.value for s in metrics[family].samples
               if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- tests


def test_health_ready_metadata(server: Server, digits_onnx: Path) -> None:
    assert server.request("GET", "/healthz")[:1] == (200,)
    assert server.request("GET", "/readyz")[2] == {"status": "ready"}
    status, _, meta = server.request("GET", "/metadata")
    assert status == 200
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["input"]["shape"] == ["batch", 3, 8, 8]
    assert meta["providers"] == ["CPUExecutionProvider"]
    assert meta["arch"]["blocks"] and meta["label"] == "largest"
    assert {"onnxruntime", "glit_deploy"} <= set(meta["versions"])


def test_predictions_match_direct_onnxruntime(server: Server, digits_onnx: Path, digit_images: Any) -> None:
    import onnxruntime

    pngs, labels, reference_inputs = digit_images
    session = onnxruntime.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"])
    expected = softmax(session.run(["output"], {"input": reference_inputs})[0])

    status, _, body = server.predict([(f"{i}.png", png) for i, png in enumerate(pngs[:16])], query="?top_k=10")
    assert status == 200, body
    got = np.zeros((16, 10))
    for row, prediction in enumerate(body["predictions"]):
        assert prediction["image"] == f"{row}.png"
        assert [p["class"] for p in prediction["top_k"]] == [str(p["index"]) for p in prediction["top_k"]]
        for p in prediction["top_k"]:
            got[row, p["index"]] = p["probability"]
    np.testing.assert_allclose(got, expected[:16], atol=1e-5)

    # the same images as JSON base64 (with top_k in the body) and as a raw image body
    payload = {"images": [base64.b64encode(png).decode() for png in pngs[16:24]], "top_k": 1}
    status, _, body = server.request("POST", "/predict", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    assert status == 200, body
    assert [p["top_k"][0]["index"] for p in body["predictions"]] == list(expected[16:24].argmax(1))
    assert all(len(p["top_k"]) == 1 for p in body["predictions"])
    status, _, body = server.request("POST", "/predict", pngs[30], {"Content-Type": "image/png"})
    assert status == 200 and body["predictions"][0]["top_k"][0]["index"] == expected[30].argmax()
    assert len(body["predictions"][0]["top_k"]) == 5  # the default top_k
    assert (expected.argmax(1) == labels).mean() > 0.85  # a trained model on real digits


def _bad_requests(good_png: bytes) -> list[tuple[str, int, bytes, dict[str, str]]]:
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    truncated = png_bytes(big)[:2000]

    def form(*files: tuple[str, bytes], **fields: str) -> tuple[bytes, dict[str, str]]:
        body, content_type = multipart(list(files), fields)
        return body, {"Content-Type": content_type}

    def as_json(payload: Any) -> tuple[bytes, dict[str, str]]:
        return json.dumps(payload).encode(), {"Content-Type": "application/json"}

    cases = [
        ("not an image", 415, *form(("notes.png", b"this is not an image at all"))),
        ("truncated PNG", 400, *form(("cut.png", truncated))),
        ("decompression bomb (PIL's limit)", 413, *form(("bomb.png", header_only_png(100_000, 100_000)))),
        ("pixel count over --max-image-pixels", 413, *form(("wide.png", header_only_png(2000, 2000)))),
        ("empty file in a form", 400, *form(("empty.png", b""))),
        ("form without files", 400, *form(top_k="3")),
        ("empty body", 400, b"", {"Content-Type": "image/png"}),
        ("empty body, no content type", 400, b"", {}),
        ("empty JSON body", 400, b"", {"Content-Type": "application/json"}),
        ("oversized body", 413, b"\0" * (BODY_LIMIT + 1), {"Content-Type": "image/png"}),
        ("wrong content type", 415, b"hello", {"Content-Type": "text/plain"}),
        ("bad base64", 400, *as_json({"images": ["%%%not base64%%%"]})),
        ("base64 of a non-image", 415, *as_json({"images": [base64.b64encode(b"plain text").decode()]})),
        ("invalid JSON", 400, b"{images: [", {"Content-Type": "application/json"}),
        ("JSON without images", 400, *as_json({"pictures": []})),
        ("top_k not a number", 400, *form(("a.png", good_png), top_k="many")),
        ("top_k zero", 400, *as_json({"images": [base64.b64encode(good_png).decode()], "top_k": 0})),
        ("too many images", 400, *form(*[(f"{i}.png", good_png) for i in range(17)])),
        ("malformed multipart", 400, b"--xyz\r\ngarbage", {"Content-Type": "multipart/form-data; boundary=abc"}),
    ]
    return cases


def test_bad_input_answers_4xx_and_server_keeps_serving(server: Server, digit_images: Any) -> None:
    good = digit_images[0][0]
    failures = []
    for name, expected, body, headers in _bad_requests(good):
        status, _, answer = server.request("POST", "/predict", body, headers)
        if status != expected or not isinstance(answer, dict) or not answer.get("error"):
            failures.append(f"{name}: {status} {answer!r} (expected {expected})")
        # and the server still answers a good request after each bad one
        assert server.predict([("good.png", good)])[0] == 200, f"after {name}"
    assert not failures, "\n".join(failures)
    assert server.request("GET", "/predict")[0] == 405
    assert server.request("GET", "/nowhere")[0] == 404
    metrics = server.metrics()
    assert sample(metrics, "glit_requests", "_total", endpoint="/predict", status="413") >= 3
    assert not [s for s in metrics["glit_requests"].samples if s.labels.get("status", "").startswith("5")]


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_oversized_body_refused_before_it_is_read(server: Server, digit_images: Any) -> None:
    # a declared Content-Length far over the limit, with only a little data sent: 413 at once
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000000000\r\n\r\n" + b"\0" * 1024)
        response = _read_response(sock, 10)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert time.monotonic() - started < 3
        assert b"over the limit" in response

    # a chunked body (no length declared) is counted while it streams and refused past the limit
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk, sent = b"\0" * 8192, 0
        while sent < 100 * BODY_LIMIT:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
            if select.select([sock], [], [], 0.005)[0]:  # the server has answered: stop sending
                break
        response = _read_response(sock, 10)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert sent < 4 * BODY_LIMIT  # refused soon after the limit, not after reading everything
    assert server.predict([("good.png", digit_images[0][0])])[0] == 200


def test_concurrent_load_is_batched_without_errors(server: Server, digit_images: Any) -> None:
    pngs = digit_images[0]
    clients, total = 16, 2000
    before = server.metrics()
    batches_before = sample(before, "glit_batch_size", "_count")
    per_client = [total // clients + (i < total % clients) for i in range(clients)]

    def client(index: int) -> list[str]:
        problems = []
        conn = server.connection()
        try:
            for n in range(per_client[index]):
                png = pngs[(index * 7 + n) % len(pngs)]
                status, _, body = server.predict([("x.png", png)], conn)
                if status != 200 or len(body["predictions"][0]["top_k"]) != 5:
                    problems.append(f"{status} {body!r}"[:200])
        except Exception as exc:  # any transport error counts as a failure of the server
            problems.append(repr(exc))
        finally:
            conn.close()
        return problems

    with ThreadPoolExecutor(clients) as pool:
        problems = [p for result in pool.map(client, range(clients)) for p in result]
    assert not problems, problems[:5]
    after = server.metrics()
    assert sample(after, "glit_requests", "_total", endpoint="/predict", status="200") >= total
    assert not [s for s in after["glit_requests"].samples if s.labels.get("status", "").startswith("5")]
    batches = sample(after, "glit_batch_size", "_count") - batches_before
    single = sample(after, "glit_batch_size", "_bucket", le="1.0") - sample(before, "glit_batch_size", "_bucket",
                                                                           le="1.0")
    assert batches < total and single < batches, f"{batches} batches, {single} of one image: no batching"


def test_metrics_are_prometheus_text(server: Server) -> None:
    metrics = server.metrics()  # parses with prometheus_client's own parser
    assert {"glit_requests", "glit_queue_wait_seconds", "glit_inference_seconds", "glit_batch_size",
            "glit_queue_depth"} <= set(metrics)
    assert metrics["glit_queue_wait_seconds"].type == "histogram"
    assert metrics["glit_queue_depth"].type == "gauge"
    assert sample(metrics, "glit_requests", "_total", endpoint="/metrics", status="200") >= 1


def test_full_queue_429_and_sigterm_drains(digits_onnx: Path, digit_images: Any, tmp_path: Path) -> None:
    # batches wait up to 20 s to fill 64 images, and the queue holds 8: two 4-image requests fill it
    srv = Server(digits_onnx, tmp_path / "server.log", "--max-batch-size", "64", "--max-wait-ms", "20000",
                 "--max-queue", "8", "--max-images-per-request", "4")
    try:
        pngs = digit_images[0]
        results: list[Any] = [None, None]

        def in_flight(index: int) -> None:
            results[index] = srv.predict([(f"{index}-{i}.png", pngs[i]) for i in range(4)])

        threads = [threading.Thread(target=in_flight, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while sample(srv.metrics(), "glit_queue_depth") < 8:
            assert time.monotonic() < deadline, "requests never queued"
            time.sleep(0.05)

        status, headers, body = srv.predict([("extra.png", pngs[0])])
        assert status == 429 and "queue full" in body["error"]
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"

        terminated = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=20)
        assert [r[0] for r in results] == [200, 200], results
        assert [len(r[2]["predictions"]) for r in results] == [4, 4]
        assert srv.proc.wait(timeout=20) == 0, srv.log.read_text()
        assert time.monotonic() - terminated < 10  # the drain did not wait out the 20 s batch window
    finally:
        srv.stop()


def test_readyz_503_before_warm_up_and_while_draining(digits_onnx: Path) -> None:
    """In process (no lifespan, so no warm-up has run): readiness follows the server's state."""
    import asyncio

    from glit_deploy.serve import Predictor
    from glit_deploy.serve.app import create_app

    app, state = create_app(Predictor.load(digits_onnx, "cpu", 1))

    def get(path: str) -> tuple[int, Any]:
        messages: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            messages.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "headers": [], "scheme": "http",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234), "root_path": ""}
        asyncio.run(app(scope, receive, send))
        return messages[0]["status"], json.loads(b"".join(m.get("body", b"") for m in messages[1:]))

    assert get("/healthz")[0] == 200
    assert get("/readyz") == (503, {"error": "warming up"})
    state.ready = True
    assert get("/readyz") == (200, {"status": "ready"})
    state.start_draining()
    assert get("/readyz")[0] == 503 and get("/healthz")[0] == 200



# ---------------------------------------------------------------- bounded memory (issue 11, item 6)


async def _call_app(app: Any, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], Any, int]:
    """One POST straight into the ASGI app: (status, headers, JSON answer, times the app read the body)."""
    messages: list[dict] = []
    reads = 0

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        messages.append(message)

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw_headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": raw_headers, "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234), "root_path": ""}
    await app(scope, receive, send)
    start = messages[0]
    answer = json.loads(b"".join(m.get("body", b"") for m in messages[1:]))
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, answer, reads


def test_full_queue_refuses_before_reading_or_decoding(digits_onnx: Path, digit_images: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, with a queue of 4 images: room is checked before the body is read (none left) and
    before any image is decoded (too little left for the request's images)."""
    import asyncio

    from glit_deploy.serve import Predictor
    from glit_deploy.serve import app as app_module

    decoded: list[str] = []
    to_input = app_module._to_input

    async def counting_to_input(predictor: Any, blob: bytes, name: str, max_pixels: int) -> np.ndarray:
        decoded.append(name)
        return await to_input(predictor, blob, name, max_pixels)

    monkeypatch.setattr(app_module, "_to_input", counting_to_input)
    app, state = app_module.create_app(Predictor.load(digits_onnx, "cpu", 1),
                                       app_module.ServeSettings(max_queue=4, max_wait_ms=1))
    state.ready = True
    pngs = digit_images[0]

    def form(count: int) -> tuple[bytes, dict[str, str]]:
        body, content_type = multipart([(f"{i}.png", pngs[i]) for i in range(count)])
        return body, {"Content-Type": content_type}

    async def scenario() -> None:
        state.batcher.start()
        try:
            with state.batcher.reserve(2):  # another request holds half the queue
                status, headers, answer, reads = await _call_app(app, "/predict", *form(3))
                assert (status, headers["retry-after"]) == (429, "1") and "queue full" in answer["error"]
                assert reads > 0 and decoded == []  # read (to count the images), never decoded
                status, _, answer, _ = await _call_app(app, "/predict", *form(2))
                assert status == 200 and len(answer["predictions"]) == 2 and len(decoded) == 2
            decoded.clear()
            with state.batcher.reserve(4):  # the queue is full: the body is not even read
                status, headers, answer, reads = await _call_app(app, "/predict", *form(1))
                assert (status, reads, decoded) == (429, 0, [])
                assert headers["connection"] == "close" and "queue full" in answer["error"]
            assert state.batcher.has_room(4)  # every reservation was given back
        finally:
            await state.batcher.close()

    asyncio.run(scenario())
    assert state.metrics.registry.get_sample_value("glit_refused_total", {"reason": "queue_full"}) == 2


def _hold_upload(port: int, declared: int, sent: int, extra_headers: bytes = b"") -> socket.socket:
    """A client that declares a body of `declared` bytes and sends only `sent` of them (a slow upload)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n" + extra_headers
                 + f"Content-Length: {declared}\r\n\r\n".encode() + b"\0" * sent)
    return sock


def test_bytes_in_flight_bound_refuses_uploads_while_healthz_answers(digits_onnx: Path, digit_images: Any,
                                                                      tmp_path: Path) -> None:
    # two slow 100 kB uploads fill a 200 kB budget; everything else on /predict is refused until they end
    srv = Server(digits_onnx, tmp_path / "server.log", "--max-body-bytes", "100000", "--max-bytes-in-flight",
                 "200000")
    slow = []
    try:
        slow = [_hold_upload(srv.port, 100_000, 1000) for _ in range(2)]
        deadline = time.monotonic() + 20
        while sample(srv.metrics(), "glit_body_bytes_in_flight") < 200_000:
            assert time.monotonic() < deadline, "the slow uploads were never admitted"
            time.sleep(0.05)

        good = digit_images[0][0]
        status, headers, body = srv.predict([("good.png", good)])
        assert status == 429 and "in flight" in body["error"], body
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"
        started = time.monotonic()
        assert srv.request("GET", "/healthz")[0] == 200
        assert time.monotonic() - started < 5  # answered at once, not after the uploads (generous: a busy machine)
        # a client that waits for 100 Continue is refused before it sends its body
        with _hold_upload(srv.port, 50_000, 0, b"Expect: 100-continue\r\n") as waiting:
            response = _read_response(waiting, 10)
        assert response.startswith(b"HTTP/1.1 429"), response[:200]
        assert b"100 Continue" not in response

        for sock in slow:  # the uploads give up: their bytes are given back
            sock.close()
        deadline = time.monotonic() + 20
        while sample(srv.metrics(), "glit_body_bytes_in_flight") > 0:
            assert time.monotonic() < deadline, "the budget was not given back after the clients left"
            time.sleep(0.05)
        assert srv.predict([("good.png", good)])[0] == 200
        metrics = srv.metrics()
        assert sample(metrics, "glit_refused", "_total", reason="bytes_in_flight") == 2
        assert not [s for s in metrics["glit_requests"].samples if s.labels.get("status", "").startswith("5")]
    finally:
        for sock in slow:
            sock.close()
        assert srv.stop() == 0, srv.log.read_text()
