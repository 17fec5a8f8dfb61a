"""Dynamic micro-batching: concurrent requests' images are run as one batch, off the event loop.

A request's images wait in a bounded queue (counted in images). A single worker coroutine takes the
oldest job, waits at most `max_wait_s` after that job arrived for more to make up `max_batch_size`,
then runs everything taken in one onnxruntime call on a one-thread executor (onnxruntime releases
the GIL, so the event loop keeps parsing requests meanwhile, and the next batch forms while this one
runs).

Waiting stops early once the queue holds as many images as the previous batch ran: under steady load
that is about as many as will come, and at concurrency 1 it means no waiting at all (waiting the full
`max_wait_s` for clients that are all already queued only adds latency and idles the model).

A request holds its room in the queue from before its images are decoded (`reserve`), so one that
would find the queue full is refused before any decoding is spent on it, and decoded images that
wait for the queue count against `max_queue` like the queued ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class QueueFull(Exception):
    """The queue holds `max_queue` images already: the caller should answer 429."""


class Draining(Exception):
    """The batcher is shutting down and takes no new work: the caller should answer 503."""


class BatchObserver(Protocol):
    def queue_depth(self, images: int) -> None: ...
    def batch_ran(self, size: int, queue_waits_s: list[float], inference_s: float) -> None: ...


@dataclass
class _Job:
    inputs: list[np.ndarray]  # [3, H, W] float32 each
    future: asyncio.Future
    enqueued: float


class Reservation:
    """Room for `images` in the queue, held while a request decodes them: `submit` them, or `release`.

    As a context manager it releases on exit whatever was not submitted (a decoding error, a client gone).
    """

    def __init__(self, batcher: MicroBatcher, images: int) -> None:
        self._batcher = batcher
        self.images = images
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._reserved_images -= self.images

    async def submit(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Queue the decoded inputs (at most the images reserved) in the room held for them."""
        if not self._held:
            raise RuntimeError("this reservation was already submitted or released")
        if len(inputs) > self.images:
            raise ValueError(f"{len(inputs)} inputs for a reservation of {self.images} images")
        self.release()
        return await self._batcher._enqueue(inputs)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class MicroBatcher:
    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_wait_s: float = 0.005, max_queue: int = 256, observer: BatchObserver | None = None) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.observer = observer
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glit-infer")
        self._jobs: deque[_Job] = deque()
        self._queued_images = 0
        self._reserved_images = 0  # held by requests still decoding (see Reservation)
        self._last_batch = max_batch_size  # until a batch has run, wait for a full one
        self._flush = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._work(), name="glit-batcher")

    def has_room(self, images: int) -> bool:
        """Whether `images` more would fit now (queued and reserved images count)."""
        return self._queued_images + self._reserved_images + images <= self.max_queue

    def reserve(self, images: int) -> Reservation:
        """Hold room for `images` before they are decoded (raises QueueFull or Draining)."""
        if self._closing or self._wake is None:
            raise Draining()
        if not self.has_room(images):
            raise QueueFull()
        self._reserved_images += images
        return Reservation(self, images)

    async def submit(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Queue one request's inputs; returns their logits [len(inputs), classes] in order."""
        return await self.reserve(len(inputs)).submit(inputs)

    async def _enqueue(self, inputs: list[np.ndarray]) -> np.ndarray:
        if self._closing or self._wake is None:
            raise Draining()
        future = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(inputs, future, time.perf_counter()))
        self._set_depth(self._queued_images + len(inputs))
        self._wake.set()
        return await future

    def flush(self) -> None:
        """Stop waiting for batches to fill (no new requests are coming): safe from a signal handler."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._set_flush)

    def _set_flush(self) -> None:
        self._flush = True
        assert self._wake is not None
        self._wake.set()

    async def close(self) -> None:
        """Take no new work, finish every queued job, then stop the worker."""
        self._closing = self._flush = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self.executor.shutdown(wait=True)

    async def run_in_executor(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the inference thread (e.g. the warm-up), in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def _set_depth(self, images: int) -> None:
        self._queued_images = images
        if self.observer:
            self.observer.queue_depth(images)

    async def _work(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather(loop)
            await self._run(self._take())

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait (until the deadline) for the queue to reach the target batch size."""
        assert self._wake is not None
        target = min(self.max_batch_size, self._last_batch)
        deadline = self._jobs[0].enqueued + self.max_wait_s
        while self._queued_images < target and not (self._closing or self._flush):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            timer = loop.call_later(remaining, self._wake.set)
            await self._wake.wait()
            timer.cancel()

    def _take(self) -> list[_Job]:
        jobs = [self._jobs.popleft()]
        size = len(jobs[0].inputs)
        while self._jobs and size + len(self._jobs[0].inputs) <= self.max_batch_size:
            size += len(self._jobs[0].inputs)
            jobs.append(self._jobs.popleft())
        self._set_depth(self._queued_images - size)
        return jobs

    def _infer(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        step = self.max_batch_size  # a request with more images than a batch runs in several
        chunks = [self.run_batch(np.stack(inputs[i:i + step])) for i in range(0, len(inputs), step)]
        return (chunks[0] if len(chunks) == 1 else np.concatenate(chunks)), time.perf_counter() - start

    async def _run(self, jobs: list[_Job]) -> None:
        inputs = [x for job in jobs for x in job.inputs]
        started = time.perf_counter()
        self._last_batch = len(inputs)
        try:
            logits, seconds = await asyncio.get_running_loop().run_in_executor(self.executor, self._infer, inputs)
        except Exception as exc:  # a runtime failure: every request of the batch gets it (the server answers 500)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        if self.observer:
            self.observer.batch_ran(len(inputs), [started - job.enqueued for job in jobs], seconds)
        offset = 0
        for job in jobs:
            if not job.future.done():  # done: the client went away and its handler was cancelled
                job.future.set_result(logits[offset:offset + len(job.inputs)])
            offset += len(job.inputs)
