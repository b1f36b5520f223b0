"""`LocalEngine`: `idle` is true only while nothing is queued or running (the app decodes and
encodes small images inline exactly then, runtime/serve/route.py, so it must not read idle
mid-batch); a lone small job on an idle engine runs on the loop once single jobs are timed fast."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")

GATE_S = 30.0


class BlockingSegmenter:
    """Holds every batch at `gate`; returns the images' sizes in place of results."""

    def __init__(self) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()

    def segment_each(self, images, labels, thresholds):
        self.entered.set()
        assert self.gate.wait(GATE_S)
        return [image.shape for image in images]

    def close(self) -> None:
        pass


def test_idle_is_false_while_a_job_waits_or_runs() -> None:
    from segclip.runtime.serve.engine import LocalEngine
    from segclip.runtime.serve.requests import SegmentJob
    from segclip.runtime.serve.settings import ServeSettings

    async def scenario() -> list[bool]:
        segmenter = BlockingSegmenter()
        engine = LocalEngine(segmenter, ServeSettings(max_wait_ms=0))
        seen = [engine.idle]  # before start: nothing queued
        await engine.start()
        seen.append(engine.idle)
        job = SegmentJob(np.zeros((4, 6, 3), np.uint8), ("a",), None)
        task = asyncio.ensure_future(engine.segment(job))
        await asyncio.sleep(0)
        seen.append(engine.idle)  # queued or taken by the worker
        assert await asyncio.to_thread(segmenter.entered.wait, GATE_S)
        seen.append(engine.idle)  # running in the worker thread
        segmenter.gate.set()
        done = await asyncio.wait_for(task, GATE_S)
        assert done.result == (4, 6, 3) and done.batch_size == 1
        seen.append(engine.idle)  # finished
        await engine.close()
        return seen

    assert asyncio.run(scenario()) == [True, True, False, False, True]


class ThreadRecordingSegmenter:
    """Records the thread each batch ran on; returns the images' sizes in place of results."""

    def __init__(self, error: Exception | None = None) -> None:
        self.threads: list[str] = []
        self.error = error

    def segment_each(self, images, labels, thresholds):
        self.threads.append(threading.current_thread().name)
        if self.error is not None:
            raise self.error
        return [image.shape for image in images]

    def close(self) -> None:
        pass


def _run_jobs(segmenter, jobs, prepare=None) -> list:
    """Each job through a started `LocalEngine`, one after another; `prepare(engine)` first."""
    from segclip.runtime.serve.engine import LocalEngine
    from segclip.runtime.serve.settings import ServeSettings

    async def scenario() -> list:
        engine = LocalEngine(segmenter, ServeSettings(max_wait_ms=0))
        await engine.start()
        if prepare is not None:
            prepare(engine)
        try:
            return [await engine.segment(job) for job in jobs]
        finally:
            await engine.close()

    return asyncio.run(scenario())


def _job(height: int = 4, width: int = 6):
    from segclip.runtime.serve.requests import SegmentJob

    return SegmentJob(np.zeros((height, width, 3), np.uint8), ("a",), None)


def test_a_lone_small_fast_job_runs_on_the_loop_once_single_jobs_are_timed() -> None:
    segmenter = ThreadRecordingSegmenter()
    done = _run_jobs(segmenter, [_job(), _job(), _job()])
    loop_thread = threading.current_thread().name  # asyncio.run runs the loop here
    # the first has no timing yet: the worker thread; then the loop itself
    assert segmenter.threads[0].startswith("segclip-batch")
    assert segmenter.threads[1:] == [loop_thread, loop_thread]
    assert [d.result for d in done] == [(4, 6, 3)] * 3
    assert all(d.batch_size == 1 and d.first_in_batch for d in done)
    assert done[1].queue_ms == 0.0


def test_slow_large_or_batchable_jobs_stay_in_the_worker_thread() -> None:
    from segclip.runtime.serve.engine import INLINE_ENGINE_MS, INLINE_PIXELS

    def slow(engine) -> None:
        engine.single_ms = INLINE_ENGINE_MS * 2  # single jobs lately too slow for the loop

    def fast(engine) -> None:
        engine.single_ms = 1.0

    def another_on_its_way(engine) -> None:
        engine.single_ms = 1.0
        engine.expect(1)  # a request still being read: its job may join the batch

    side = int(INLINE_PIXELS ** 0.5) + 1
    for prepare, job in [(slow, _job()), (fast, _job(side, side)), (another_on_its_way, _job())]:
        segmenter = ThreadRecordingSegmenter()
        _run_jobs(segmenter, [job], prepare)
        assert len(segmenter.threads) == 1 and segmenter.threads[0].startswith("segclip-batch")


def test_a_job_failing_on_the_loop_raises_its_own_error_and_leaves_the_engine_idle() -> None:
    from segclip.runtime.errors import ImageError
    from segclip.runtime.serve.engine import LocalEngine
    from segclip.runtime.serve.settings import ServeSettings

    async def scenario() -> tuple[str, bool]:
        segmenter = ThreadRecordingSegmenter(ImageError("too many windows"))
        engine = LocalEngine(segmenter, ServeSettings(max_wait_ms=0))
        await engine.start()
        engine.single_ms = 1.0
        try:
            with pytest.raises(ImageError, match="too many windows"):
                await engine.segment(_job())
            return segmenter.threads[0], engine.idle
        finally:
            await engine.close()

    thread, idle = asyncio.run(scenario())
    assert thread == threading.current_thread().name and idle


def test_jobs_that_arrive_together_are_batched_not_run_inline_one_by_one() -> None:
    from segclip.runtime.serve.engine import LocalEngine
    from segclip.runtime.serve.settings import ServeSettings

    async def scenario() -> list:
        segmenter = ThreadRecordingSegmenter()
        engine = LocalEngine(segmenter, ServeSettings(max_wait_ms=0))
        await engine.start()
        engine.single_ms = 1.0  # fast enough to run inline when alone
        try:
            done = await asyncio.gather(*(engine.segment(_job()) for _ in range(3)))
        finally:
            await engine.close()
        return [segmenter.threads, [d.batch_size for d in done]]

    threads, sizes = asyncio.run(scenario())
    assert len(threads) == 1 and threads[0].startswith("segclip-batch") and sizes == [3, 3, 3]
