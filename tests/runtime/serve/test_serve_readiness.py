"""Readiness and the 504 timeout, on a uvicorn server on 127.0.0.1 in a thread of this process, so
that the test holds warm-up and the engine at a gate (docs/serve.md "Other routes", "Errors")."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _serve_support import assert_problem, free_port, image_bytes, segment_multipart

pytest.importorskip("fastapi")

GATE_S = 60.0  # bound on every wait at a gate


class GatedEngine:
    """A `LocalEngine` whose warm-up waits for `warm_gate` and whose jobs wait for `job_gate`."""

    def __init__(self, inner, warm_gate: threading.Event, job_gate: threading.Event) -> None:
        self.inner, self.warm_gate, self.job_gate = inner, warm_gate, job_gate

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def warm_up(self) -> None:
        await asyncio.to_thread(self.warm_gate.wait, GATE_S)
        await self.inner.warm_up()

    async def segment(self, job):
        await asyncio.to_thread(self.job_gate.wait, GATE_S)
        return await self.inner.segment(job)


@pytest.fixture(scope="module")
def gated(tiny_bundle: Path) -> Iterator[tuple[str, GatedEngine]]:
    import uvicorn

    from segclip.runtime.segmenter import Segmenter
    from segclip.runtime.serve.app import build_app
    from segclip.runtime.serve.engine import LocalEngine
    from segclip.runtime.serve.settings import ServeSettings

    settings = ServeSettings(timeout_s=0.5)
    engine = GatedEngine(LocalEngine(Segmenter(tiny_bundle, device="cpu", threads=1), settings),
                         threading.Event(), threading.Event())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, settings), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + GATE_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield url, engine
    finally:
        engine.warm_gate.set()
        engine.job_gate.set()
        server.should_exit = True
        thread.join(timeout=GATE_S)
        assert not thread.is_alive()


def test_ready_only_after_warm_up(gated: tuple[str, GatedEngine]) -> None:
    url, engine = gated
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        not_ready = assert_problem(client.get("/readyz"), 503, "warming up")
        assert not_ready["status"] == 503
        assert client.get("/readyz").headers["retry-after"] == "1"
        assert engine.inner.segmenter.text_engine_calls == 0  # nothing has run yet
        assert "segclip_ready 0.0" in client.get("/metrics").text
        engine.warm_gate.set()
        deadline = time.monotonic() + GATE_S
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        assert client.get("/readyz").json() == {"status": "ready"}
        assert engine.inner.segmenter.text_engine_calls == 1  # the warm-up ran the text tower
        assert "segclip_ready 1.0" in client.get("/metrics").text


def test_past_timeout_is_504(gated: tuple[str, GatedEngine]) -> None:
    url, engine = gated
    data = image_bytes(32, 32, 0)
    with httpx.Client(base_url=url, timeout=30) as client:
        began = time.monotonic()
        assert_problem(segment_multipart(client, data, ["cat"]), 504, "--timeout-s")
        assert time.monotonic() - began < 10
        engine.job_gate.set()
        assert segment_multipart(client, data, ["cat"]).status_code == 200
