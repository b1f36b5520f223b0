"""`LocalEngine`: cross-request batching over one `Segmenter` (docs/serve.md "Batching").

Requests put a `SegmentJob` on a bounded asyncio queue (full: `QueueFull`, answered 503). One
worker task takes the first job, then more up to `max_batch`: those already queued at once, and
while other requests are still being read or decoded (`expect`), it waits for them at most
`max_wait_ms`; when nothing else is pending it runs at once, so a lone request never waits. The
batch runs in one worker thread (`Segmenter.segment_each`: the windows of all its images share
image-tower calls, each image keeps its own label set and threshold), so the event loop stays
free. Label-set embeddings are computed once (the Segmenter's LRU cache). A job whose request
timed out or disconnected is dropped before it runs.

A lone small job on an idle engine runs on the event loop itself: when nothing is queued,
running or being read, the image has at most `INLINE_PIXELS` and single jobs have lately taken
at most `INLINE_ENGINE_MS`. Such a job first lets the loop go round `INLINE_YIELDS` times, so
requests that arrived meanwhile start; if one did, or another job is waiting to run inline too,
they all take the queue and are batched. Alone, it saves the queue, the batching task and two
thread hand-offs (~0.17 ms per request here, with nothing to overlap); the loop is held no
longer than a small model's call (a large model's calls never qualify).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from segclip.errors import SegclipError
from segclip.runtime.segmenter import Segmenter, SegmentResult
from segclip.runtime.serve.requests import SegmentJob
from segclip.runtime.serve.settings import ServeSettings

log = logging.getLogger("segclip.serve")
WARM_UP_LABELS = ("object",)
WARM_UP_SIDE = 32  # pixels of the warm-up image (resized up to the window side)
INLINE_PIXELS = 1 << 19  # up to ~0.5 MP: an idle server's work on such an image may run inline
INLINE_ENGINE_MS = 15.0  # a lone job runs on the loop while single jobs take at most this
SINGLE_MS_WEIGHT = 0.2  # weight of the newest single job in the running average of their time
INLINE_YIELDS = 2  # loop rounds a would-be inline job waits: arrivals are read, then start
_TIMEOUT = getattr(asyncio, "timeout", None)  # Python 3.11+


async def within(awaitable: Awaitable[Any], seconds: float) -> Any:
    """`await awaitable`, or `asyncio.TimeoutError` past `seconds`: `asyncio.timeout` where
    Python has it (3.11+), which, unlike `asyncio.wait_for` there, starts no task per call."""
    if _TIMEOUT is None:
        return await asyncio.wait_for(awaitable, seconds)
    async with _TIMEOUT(seconds):
        return await awaitable


class QueueFull(Exception):
    """The engine's queue holds `queue` jobs already."""


@dataclass(frozen=True)
class EngineResult:
    """A job's segmentation, how long it waited in the queue, and the batch it ran in."""

    result: SegmentResult
    queue_ms: float
    batch_size: int
    first_in_batch: bool  # one job per batch is marked, so batch sizes are counted once


@dataclass
class _Pending:
    job: SegmentJob
    future: asyncio.Future
    queued_at: float


class LocalEngine:
    """The `Engine` of one process: a `Segmenter` and a batching worker."""

    def __init__(self, segmenter: Segmenter, settings: ServeSettings) -> None:
        self.segmenter, self.settings = segmenter, settings
        self.ready = False
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="segclip-batch")
        self._text_executor = ThreadPoolExecutor(1, thread_name_prefix="segclip-text")
        self._expected = 0  # requests being read or decoded, not yet queued
        self._running = 0  # batches running now (worker thread or inline)
        self.single_ms: float | None = None  # running average of small single jobs' time
        self._candidates = 0  # jobs now waiting to see whether they may run inline
        self._collecting = False  # the worker holds jobs it is about to run

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def idle(self) -> bool:
        """Nothing queued, collected or running (the app then decodes and encodes inline)."""
        return self.queue_depth == 0 and self._running == 0 and not self._collecting

    def expect(self, delta: int) -> None:
        """The app announces (+1) a request it is reading, and withdraws it (-1) once queued
        or failed; the worker waits for announced requests at most `max_wait_ms`."""
        self._expected += delta

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.settings.queue)
        self._worker = asyncio.create_task(self._run(), name="segclip-batcher")

    async def warm_up(self) -> None:
        """Run the text and image towers once; then `ready` is True."""
        image = np.full((WARM_UP_SIDE, WARM_UP_SIDE, 3), 127, dtype=np.uint8)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.segmenter.segment, image,
                                   list(WARM_UP_LABELS))
        self.ready = True

    async def register_label_set(self, labels: tuple[str, ...]) -> float:
        """Compute (or find cached) the label set's embeddings; the milliseconds spent."""
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        await loop.run_in_executor(self._text_executor, self.segmenter.embed_labels,
                                   list(labels))
        return (time.perf_counter() - began) * 1e3

    async def segment(self, job: SegmentJob) -> EngineResult:
        if self._queue is None:
            raise RuntimeError("LocalEngine.start() was not awaited")
        if self._inline(job) and await self._alone():
            self._running += 1
            try:  # a lone job's error is raised here (`_segment`)
                result = self._segment([job])[0]
            finally:
                self._running -= 1
            return EngineResult(cast(SegmentResult, result), 0.0, 1, True)
        pending = _Pending(job, asyncio.get_running_loop().create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return await pending.future

    async def _alone(self) -> bool:
        """Whether, after `INLINE_YIELDS` loop rounds, no other request has come forward."""
        self._candidates += 1
        try:
            for _ in range(INLINE_YIELDS):
                await asyncio.sleep(0)
            return self._candidates == 1 and self.idle and self._expected <= 0
        finally:
            self._candidates -= 1

    def _inline(self, job: SegmentJob) -> bool:
        """Run `job` on the loop (module docstring): the engine idle, no other request on its
        way, a small image, and small single jobs lately fast."""
        return (self.idle and self._expected <= 0 and _small(job)
                and self.single_ms is not None and self.single_ms <= INLINE_ENGINE_MS)

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        self._collecting = True  # `_run` hands the batch on to `_in_worker` with no await between
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.max_wait_ms / 1e3
        try:
            while len(batch) < self.settings.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if self._expected + self._candidates <= 0 or remaining <= 0:
                    break
                try:
                    batch.append(await within(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
        finally:
            self._collecting = False
        return [p for p in batch if not p.future.done()]  # drop timed-out jobs

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            jobs = [p.job for p in batch]
            try:
                results = await self._in_worker(jobs)
            except Exception as e:  # noqa: BLE001 - handed to each request, never swallowed
                if not isinstance(e, SegclipError):  # a client's mistake is answered, not logged
                    log.exception("a batch of %d failed", len(batch))
                results = [e] * len(batch)
            for index, (pending, result) in enumerate(zip(batch, results)):
                if pending.future.done():
                    continue
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    queue_ms = (started - pending.queued_at) * 1e3
                    pending.future.set_result(EngineResult(result, queue_ms, len(batch),
                                                           index == 0))

    async def _in_worker(self, jobs: list[SegmentJob]) -> list[SegmentResult | Exception]:
        """`_segment(jobs)` in the worker thread, counted in `idle`."""
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                    self._segment, jobs)
        finally:
            self._running -= 1

    def _segment(self, jobs: list[SegmentJob]) -> list[SegmentResult | Exception]:
        """All jobs in one `segment_each`; if that fails, each alone so one bad job fails
        alone. A lone small job's time updates `single_ms`."""
        began = time.perf_counter()
        try:
            results: list[SegmentResult | Exception] = list(self.segmenter.segment_each(
                [j.image for j in jobs], [j.labels for j in jobs], [j.threshold for j in jobs]))
            if len(jobs) == 1 and _small(jobs[0]):
                spent = (time.perf_counter() - began) * 1e3
                self.single_ms = spent if self.single_ms is None else (
                    SINGLE_MS_WEIGHT * spent + (1 - SINGLE_MS_WEIGHT) * self.single_ms)
            return results
        except Exception:  # noqa: BLE001 - retried one by one below
            if len(jobs) == 1:
                raise
        results = []
        for job in jobs:
            try:
                results.append(self.segmenter.segment(job.image, list(job.labels),
                                                      job.threshold))
            except Exception as e:  # noqa: BLE001 - the job's own error, raised in its request
                results.append(e)
        return results

    def model_info(self) -> dict[str, Any]:
        seg = self.segmenter
        bundle = seg.bundle
        facts: dict[str, Any] = {
            "bundle": str(bundle.root), "image_size": bundle.image_size,
            "embed_dim": bundle.embed_dim, "context_length": bundle.context_length,
            "template": bundle.template, "threshold": seg.threshold, "top_k": seg.top_k,
            "manifest_sha256": bundle.manifest_sha256, "backend": seg.backend,
            "engine": {k: (str(v) if not isinstance(v, (int, float, bool)) else v)
                       for k, v in seg.backend_info.items()},
            "windows_per_call": seg.batch_size,
            "variant": seg.backend_info.get("variant"),
            "kind": bundle.kind,
        }
        dense = getattr(seg, "settings", None)  # a DenseSegmenter's decision rule
        if bundle.kind == "dense" and dense is not None:
            facts["dense"] = {"background": list(seg.background), "pamr": dense.pamr_steps,
                              "area_thd": dense.area_thd, "logit_scale": dense.logit_scale}
        return facts

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
        self._text_executor.shutdown(wait=True)
        self.segmenter.close()


def _small(job: SegmentJob) -> bool:
    """Whether the job's image has at most `INLINE_PIXELS` (its time may go into `single_ms`,
    and it may run on the loop)."""
    height, width = job.image.shape[:2]
    return height * width <= INLINE_PIXELS
