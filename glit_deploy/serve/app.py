"""The HTTP API of `glit serve`.

FastAPI on uvicorn: the Python ecosystem's usual pair for model servers, asyncio-native (so one
event loop can hold many connections while a worker thread runs onnxruntime), with multipart
parsing through python-multipart and no code generation or extra processes to run.

Endpoints: GET /healthz, GET /readyz, GET /metadata, POST /predict, GET /metrics. Client errors
answer 4xx with {"error": "..."}; the server keeps serving after any of them.

Memory stays bounded under any number of uploads: a body over the size limit is refused before it
is read (413), the bodies /predict holds at once are bounded in bytes, a request that would find the
queue full is refused before its images are decoded (both 429 with Retry-After), and the decoded
images waiting for inference are bounded by the queue. The byte bound is kept in the app rather than
by uvicorn's `limit_concurrency`, which counts every connection and would turn /healthz away too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import platform
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from glit_deploy.serve.batcher import Draining, MicroBatcher, QueueFull, Reservation
from glit_deploy.serve.images import DEFAULT_MAX_PIXELS, ImageRejected, open_image
from glit_deploy.serve.predictor import Predictor

log = logging.getLogger("uvicorn.error")  # configured by uvicorn, so it reaches the console

ENDPOINTS = ("/healthz", "/readyz", "/metadata", "/predict", "/metrics")
# Images up to this many pixels decode on the event loop (cheaper than a thread hop); larger ones
# decode on a worker thread so that one big photo does not stall every other connection.
INLINE_DECODE_PIXELS = 256 * 256


@dataclass(frozen=True)
class ServeSettings:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting for inference; more answers 429
    max_body_bytes: int = 8 * 1024 * 1024
    # request bodies /predict holds at once (received, parsed or decoding); more answers 429
    max_bytes_in_flight: int = 256 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_images_per_request: int = 64
    default_top_k: int = 5
    retry_after_s: int = 1


class ClientError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Metrics:
    """Prometheus metrics on a registry of their own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("glit_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=self.registry)
        self.request_seconds = Histogram("glit_request_duration_seconds", "Time to answer a request.",
                                         ["endpoint"], registry=self.registry,
                                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.queue_wait = Histogram("glit_queue_wait_seconds", "Time a request's images waited for their batch.",
                                    registry=self.registry,
                                    buckets=(.0001, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.inference = Histogram("glit_inference_seconds", "onnxruntime time per batch.", registry=self.registry,
                                   buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.batch_size = Histogram("glit_batch_size", "Images per inference batch.", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth_gauge = Gauge("glit_queue_depth", "Images waiting for inference.", registry=self.registry)
        self.images = Counter("glit_images", "Images classified.", registry=self.registry)
        self.refused = Counter("glit_refused", "Requests refused with 429 before their images were decoded, by "
                               "reason.", ["reason"], registry=self.registry)
        self.body_bytes_in_flight = Gauge("glit_body_bytes_in_flight", "Request body bytes held by /predict "
                                          "requests being received, parsed or decoded (as charged).",
                                          registry=self.registry)

    def queue_depth(self, images: int) -> None:
        self.queue_depth_gauge.set(images)

    def batch_ran(self, size: int, queue_waits_s: list[float], inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(inference_s)
        self.images.inc(size)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def _send_error(send: Callable[[dict], Awaitable[None]], status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    # close the connection: the rest of the refused body is not worth reading
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """Pure ASGI middleware: refuse request bodies over `max_bytes` before anything parses them.

    A declared Content-Length over the limit is answered 413 without reading a byte of the body;
    a chunked (or lying) body is counted while it streams and refused as soon as it passes the limit:
    the 413 goes out at once, and the app sees the client disconnect (so it stops reading, and its
    own reaction to that is dropped).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, f"request body of {declared:,} bytes is over the limit of "
                                      f"{self.max_bytes:,}")
                    return
        received = 0
        response_started = refused = False

        async def limited_receive() -> dict:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not response_started:
                        await _send_error(send, 413, f"request body is over the limit of {self.max_bytes:,} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal response_started
            if refused:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not refused:  # the app's ClientDisconnect after a refusal is expected; anything else is not
                raise


class RequestMetrics:
    """Pure ASGI middleware counting every answer (including the body-limit refusals) by endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500  # unless the app sends a response
        start = time.perf_counter()

        async def status_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        except ClientDisconnect:
            status = 499  # the client went away mid-request (nginx's code): nothing to answer, no server error
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


class BodyBudget:
    """The request-body bytes that /predict requests may hold at once, while they are received, parsed and decoded.

    A request is charged its declared Content-Length (the body limit when it declares none) before its
    body is read, and refused when the charge does not fit. Counting bytes rather than requests lets a
    small request through beside large uploads that fill most of the budget.
    """

    def __init__(self, capacity: int, gauge: Gauge) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self.gauge = gauge

    def take(self, size: int) -> bool:
        if self.in_flight + size > self.capacity:
            return False
        self.in_flight += size
        self.gauge.set(self.in_flight)
        return True

    def give_back(self, size: int) -> None:
        self.in_flight -= size
        self.gauge.set(self.in_flight)


class ServerState:
    def __init__(self, predictor: Predictor, settings: ServeSettings) -> None:
        self.predictor = predictor
        self.settings = settings
        self.metrics = Metrics()
        self.batcher = MicroBatcher(predictor.logits, settings.max_batch_size, settings.max_wait_ms / 1e3,
                                    settings.max_queue, observer=self.metrics)
        self.body_budget = BodyBudget(settings.max_bytes_in_flight, self.metrics.body_bytes_in_flight)
        self.ready = False
        self.draining = False
        self.warmup_error: str | None = None

    def start_draining(self) -> None:
        """Called on SIGTERM: /readyz answers 503 from now on (the load balancer stops sending), and queued
        images run without waiting for batches to fill, since no new requests will join them."""
        self.draining = True
        self.batcher.flush()

    async def warm_up(self) -> None:
        started = time.perf_counter()
        try:
            await self.batcher.run_in_executor(self.predictor.warm_up)
        except Exception as exc:  # report through /readyz and the log; the process stays up for inspection
            self.warmup_error = f"warm-up inference failed: {exc}"
            log.error(self.warmup_error)
            return
        self.ready = True
        log.info("ready: warm-up inference took %.1f ms", 1e3 * (time.perf_counter() - started))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime

    try:
        glit = version("glit-deploy")
    except PackageNotFoundError:
        glit = "unknown"
    return {"glit_deploy": glit, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> tuple[Any, ServerState]:
    """The ASGI app (FastAPI wrapped in the body limit and request metrics) and its state."""
    settings = settings or ServeSettings()
    state = ServerState(predictor, settings)
    meta = predictor.meta

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        state.batcher.start()
        warm_up = asyncio.create_task(state.warm_up())  # accept connections (healthz) while warming up
        yield
        state.draining = True
        warm_up.cancel()
        await state.batcher.close()  # uvicorn has waited for in-flight requests; finish anything queued

    api = FastAPI(title="glit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(ClientError)
    async def client_error(_: Request, exc: ClientError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @api.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "alive"})

    @api.get("/readyz")
    async def readyz() -> Response:
        if state.draining:
            return error_response(503, "draining: shutting down")
        if not state.ready:
            return error_response(503, state.warmup_error or "warming up")
        return JSONResponse({"status": "ready"})

    versions = _versions()

    @api.get("/metadata")
    async def metadata() -> Response:
        return JSONResponse({
            "arch": meta.arch, "space": meta.space.get("name"), "label": meta.label, "val_top1": meta.val_top1,
            "input": {"name": meta.input_name, "shape": ["batch", *meta.input_shape], "dtype": "float32",
                      "mean": list(meta.mean), "std": list(meta.std)},
            "output": {"name": meta.output_name, "shape": ["batch", meta.num_classes]},
            "classes": list(meta.class_names), "providers": predictor.providers, "versions": versions,
            "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                         "max_queue": settings.max_queue},
            "limits": {"max_body_bytes": settings.max_body_bytes, "max_bytes_in_flight": settings.max_bytes_in_flight,
                       "max_image_pixels": settings.max_image_pixels,
                       "max_images_per_request": settings.max_images_per_request},
        })

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    retry_later = {"Retry-After": str(settings.retry_after_s)}
    # a refusal before the body is read closes the connection: the unread rest is not worth receiving
    unread_refusal = {**retry_later, "Connection": "close"}
    queue_full = f"queue full ({settings.max_queue} images waiting)"

    @api.post("/predict")
    async def predict(request: Request) -> Response:
        # while draining, requests that still reach us (in flight when SIGTERM came) are served
        if not state.ready:
            return error_response(503, "warming up", retry_later)
        if not state.batcher.has_room(1):
            state.metrics.refused.labels("queue_full").inc()
            return error_response(429, queue_full, unread_refusal)
        charge = _declared_length(request, settings.max_body_bytes)
        if not state.body_budget.take(charge):
            state.metrics.refused.labels("bytes_in_flight").inc()
            return error_response(429, f"busy: {settings.max_bytes_in_flight:,} bytes of request bodies in flight",
                                  unread_refusal)
        try:
            names, inputs, top_k, room = await _read_and_decode(request, predictor, state)
        except QueueFull:
            state.metrics.refused.labels("queue_full").inc()
            return error_response(429, queue_full, retry_later)
        except Draining:
            return error_response(503, "draining: shutting down")
        finally:
            state.body_budget.give_back(charge)  # the encoded images are gone; the queue bounds the decoded ones
        try:
            logits = await room.submit(inputs)
        except Draining:
            return error_response(503, "draining: shutting down")
        predictions = predictor.top_k(logits, top_k)
        return JSONResponse({"predictions": [{"image": name, "top_k": p.to_list()}
                                             for name, p in zip(names, predictions, strict=True)]})

    return RequestMetrics(BodySizeLimit(api, settings.max_body_bytes), state.metrics), state


def _declared_length(request: Request, max_body_bytes: int) -> int:
    """The body size a request declares (BodySizeLimit has checked it), or the most it may send without one."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None else max_body_bytes


async def _read_and_decode(request: Request, predictor: Predictor, state: ServerState
                           ) -> tuple[list[str], list[np.ndarray], int, Reservation]:
    """Read the request's images, hold their room in the queue (QueueFull before any is decoded), decode them."""
    settings = state.settings
    names, blobs, top_k = await _read_images(request, settings)
    room = state.batcher.reserve(len(blobs))
    try:
        inputs = [await _to_input(predictor, blob, name, settings.max_image_pixels)
                  for name, blob in zip(names, blobs, strict=True)]
    except BaseException:
        room.release()
        raise
    return names, inputs, top_k, room


async def _to_input(predictor: Predictor, blob: bytes, name: str, max_pixels: int) -> np.ndarray:
    try:
        image = open_image(blob, max_pixels)
        width, height = image.size
        if width * height <= INLINE_DECODE_PIXELS:
            return predictor.opened_to_input(image)
        return await asyncio.to_thread(predictor.opened_to_input, image)
    except ImageRejected as exc:
        raise ClientError(exc.status, f"{name}: {exc}") from None


def _parse_top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        raise ClientError(400, f"top_k must be an integer, not {str(value)[:40]!r}") from None
    if top_k < 1:
        raise ClientError(400, "top_k must be at least 1")
    return top_k


async def _body(request: Request) -> bytes:
    """The request body, owned by the caller alone: unlike `request.body()` the request keeps no copy, so the
    bytes are freed once decoded rather than while the images wait for inference (the body budget counts on it)."""
    return b"".join([chunk async for chunk in request.stream()])


async def _read_images(request: Request, settings: ServeSettings) -> tuple[list[str], list[bytes], int]:
    """(names, encoded images, top_k) from a multipart form, a JSON body of base64 images, or a raw image."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query_top_k = request.query_params.get("top_k")
    limit = settings.max_images_per_request
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=limit, max_fields=8, max_part_size=1024)
        except ValueError as exc:  # python-multipart's parse errors: the floor's Starlette lets them out as a 500
            if isinstance(exc, OSError):  # its FileError: the server's disk, not the client's body
                raise
            raise ClientError(400, "malformed multipart body") from None
        try:
            files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
                     if isinstance(value, UploadFile)]
            form_top_k = form.get("top_k")
        finally:
            await form.close()
        if not files:
            raise ClientError(400, "the form holds no image files (send each image as a file field)")
        names, blobs = [n for n, _ in files], [b for _, b in files]
        top_k = form_top_k if isinstance(form_top_k, str) else query_top_k
    elif content_type == "application/json":
        names, blobs, top_k = await _read_json_images(request, limit, query_top_k)
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        names, blobs, top_k = ["image"], [await _body(request)], query_top_k
    elif not content_type:
        if not await _body(request):
            raise ClientError(400, "empty request body")
        raise ClientError(415, "no Content-Type: send multipart/form-data, application/json or an image/* body")
    else:
        raise ClientError(415, f"unsupported Content-Type {content_type}: send multipart/form-data, "
                          "application/json or an image/* body")
    if len(blobs) > limit:
        raise ClientError(400, f"{len(blobs)} images in one request, over the limit of {limit}")
    return names, blobs, _parse_top_k(top_k, settings.default_top_k)


async def _read_json_images(request: Request, limit: int, query_top_k: str | None
                            ) -> tuple[list[str], list[bytes], Any]:
    body = await _body(request)
    if not body:
        raise ClientError(400, "empty request body")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ClientError(400, "request body is not valid JSON") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise ClientError(400, 'expected JSON {"images": ["<base64>", ...], "top_k": 5}')
    if len(images) > limit:
        raise ClientError(400, f"{len(images)} images in one request, over the limit of {limit}")
    blobs = []
    for index, text in enumerate(images):
        if text.startswith("data:"):  # a data URL: data:image/png;base64,....
            text = text.partition(",")[2]
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise ClientError(400, f"images[{index}] is not valid base64") from None
    return [f"images[{i}]" for i in range(len(blobs))], blobs, payload.get("top_k", query_top_k)
