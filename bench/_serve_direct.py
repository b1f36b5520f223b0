"""The direct baseline of bench/serve.py: `Segmenter` in a process of its own (`DirectProcess`),
beside the server's app called there without HTTP (`InProcessApp`)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

STARTUP_S = 300.0
T = TypeVar("T")
SERVER_QUEUE = 256  # the servers' --queue: above any concurrency the benchmarks drive


def pin(cpus: frozenset[int] | None) -> None:
    """Pin the calling thread (and the threads it starts later) to `cpus`; None: leave it."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def after_one(call: Callable[[int], T], index: int) -> T:
    """`call(index)` right after an untimed `call(index + 1)`: how bench/serve.py times each
    concurrency-1 call on every side, so that it runs on caches its own side just filled, as
    in a loop of direct calls or a server under one client (docs/serve.md "Figures")."""
    call(index + 1)
    return call(index)


def run_direct(segmenter: Any, images: list[bytes], labels: list[str], requests: int,
               concurrency: int, max_batch: int) -> dict[str, Any]:
    from PIL import Image

    latencies, began = [], time.perf_counter()
    chunk = 1 if concurrency == 1 else min(concurrency, max_batch)
    done = 0
    while done < requests:
        count = min(chunk, requests - done)
        batch = [Image.open(io.BytesIO(images[(done + i) % len(images)])) for i in range(count)]
        start = time.perf_counter()
        if count == 1:
            segmenter.segment(batch[0], labels)
        else:
            segmenter.segment_batch(batch, labels)
        latencies.append(time.perf_counter() - start)
        done += count
    wall = time.perf_counter() - began
    return {"latencies_s": latencies, "wall_s": wall, "images": requests, "chunk": chunk}


class DirectProcess:
    """The direct baseline in a process of its own (spawned, on `--server-cpus`), started fresh
    each round as the server is: the speed of one process's decoding and inference depends on
    where its memory happened to land (the same JPEG decodes in 0.37-0.72 ms here from one
    process to the next), so each side gets a new draw every round."""

    def __init__(self, args: argparse.Namespace, images: list[bytes], labels: list[str],
                 bodies: list[tuple[bytes, str]]) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=_direct_worker, daemon=True,
            args=(child, str(args.bundle), args.threads, args.variant, args.max_batch,
                  args.server_cpus, images, labels, bodies,
                  {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                   "queue": SERVER_QUEUE, "timeout_s": args.timeout_s}))
        self.process.start()
        child.close()
        try:
            if not self.connection.poll(STARTUP_S) or self.connection.recv() != "ready":
                raise EOFError
        except EOFError:
            self.close()
            raise SystemExit("error: the direct baseline process did not start") from None

    def segment(self, index: int) -> float:
        """Seconds for `Segmenter.segment` on image `index` (opening it included), `after_one`
        on image `index + 1`."""
        self.connection.send(("one", index))
        return self.connection.recv()

    def app(self, index: int) -> float:
        """Seconds for `POST /v1/segment` with body `index` through the app, without HTTP,
        `after_one` with body `index + 1`."""
        self.connection.send(("app", index))
        return self.connection.recv()

    def run(self, requests: int, concurrency: int) -> dict[str, Any]:
        """`run_direct` there."""
        self.connection.send(("run", requests, concurrency))
        return self.connection.recv()

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):  # it died meanwhile: it is reaped below
                self.connection.send(None)
            self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def _direct_worker(connection: Any, bundle: str, threads: int | None, variant: str | None,
                   max_batch: int, cpus: frozenset[int] | None, images: list[bytes],
                   labels: list[str], bodies: list[tuple[bytes, str]],
                   serve_settings: dict[str, Any]) -> None:
    """`DirectProcess`'s side: a `Segmenter`, and the server's app without its HTTP server
    (`InProcessApp`, loaded when first asked for), running what the pipe asks until None."""
    from PIL import Image

    from segclip.runtime.segmenter import Segmenter

    pin(cpus)
    segmenter = Segmenter(bundle, device="cpu", threads=threads, variant=variant,
                          batch_size=max_batch)

    def segment(index: int) -> float:  # seconds for image `index`, opening it included
        start = time.perf_counter()
        segmenter.segment(Image.open(io.BytesIO(images[index % len(images)])), labels)
        return time.perf_counter() - start

    app: InProcessApp | None = None
    try:
        connection.send("ready")
        while (command := connection.recv()) is not None:
            if command[0] == "one":
                connection.send(after_one(segment, command[1]))
            elif command[0] == "app":
                if app is None:
                    app = InProcessApp(bundle, threads, variant, serve_settings, bodies)
                connection.send(after_one(app.post, command[1]))
            else:
                connection.send(run_direct(segmenter, images, labels, command[1], command[2],
                                           max_batch))
    finally:
        if app is not None:
            app.close()
        segmenter.close()


class InProcessApp:
    """The server's app (`segclip-serve`'s `create_app`, the options `start_server` gives)
    called in this process through ASGI, with the request in memory: everything the server does
    for a request but HTTP (no socket, no uvicorn)."""

    def __init__(self, bundle: str, threads: int | None, variant: str | None,
                 serve_settings: dict[str, Any], bodies: list[tuple[bytes, str]]) -> None:
        import asyncio
        from dataclasses import asdict

        from segclip.runtime.serve.cli import create_app
        from segclip.runtime.serve.settings import ServeSettings

        settings = asdict(ServeSettings(**serve_settings))
        self.app = create_app({"engine": bundle, "device": "cpu", "variant": variant,
                               "threads": threads, "dense": {},
                               "settings": {**settings, "api_keys": []}})
        self.bodies = bodies
        try:  # the loop uvicorn runs the server on
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        engine = self.app.state.engine
        self.loop.run_until_complete(engine.start())
        self.loop.run_until_complete(engine.warm_up())

    def post(self, index: int) -> float:
        """Seconds for `POST /v1/segment` with body `index` (bodies[index % len])."""
        body, content_type = self.bodies[index % len(self.bodies)]
        return self.loop.run_until_complete(self._post(body, content_type))

    async def _post(self, body: bytes, content_type: str) -> float:
        """Seconds from the call to the reply's last body message (where uvicorn writes it to
        the socket; what the app does after, such as its metrics, is not waited for)."""
        sent: list[dict[str, Any]] = []
        done: list[float] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.append(time.perf_counter())
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/segment", "root_path": "",
                 "headers": [(b"content-type", content_type.encode("latin-1")),
                             (b"content-length", str(len(body)).encode("latin-1"))]}
        start = time.perf_counter()
        await self.app(scope, receive, send)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"the in-process app answered {sent[0]['status']}")
        json.loads(sent[-1]["body"])
        return done[0] - start

    def close(self) -> None:
        self.loop.run_until_complete(self.app.state.engine.close())
        self.app.segment_route.close()
        self.loop.close()
