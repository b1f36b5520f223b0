"""`LocalEngine.idle`: true only while nothing is queued or running; the app decodes and encodes
small images inline exactly then (runtime/serve/route.py), so it must not read idle mid-batch."""

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
