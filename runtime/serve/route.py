"""`POST /v1/segment` from body to reply (docs/serve.md "API" and "Batching").

`SegmentRoute.respond(headers, chunks)` is the whole request: API key, body limit, parsing,
decoding, the engine, encoding, metrics; it returns a `Reply` or raises `Problem`. It runs
under two entries that behave alike: the route FastAPI declares (it documents the endpoint in
`/openapi.json`), and `SegmentRoute` itself as a plain ASGI app, which `app.build_app` puts in
front of FastAPI for this one path. The plain entry skips the framework's middleware, routing,
dependency and form layers (the multipart body is parsed from memory, runtime/serve/forms.py),
which cost about as much per request as everything the route does itself.

Decoding and encoding run in a small thread pool of their own (few threads keep memory
bounded), so the loop keeps accepting requests while the engine works. When the engine is idle
(nothing queued or running), a small image (up to `INLINE_PIXELS`) is decoded, and its
label-map PNG encoded, on the loop itself: there is nothing to overlap with, and that work
(~1 ms) costs little more than the two thread hand-offs it saves. A process that may use one
CPU only does so always: there a codec thread could only take turns with the loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from segclip.errors import SegclipError
from segclip.runtime.errors import ImageError
from segclip.runtime.segmenter import SegmentResult
from segclip.runtime.serve.engine import INLINE_PIXELS, QueueFull, within
from segclip.runtime.serve.metrics import Metrics
from segclip.runtime.serve.problems import MEDIA_TYPE, Problem, internal_error
from segclip.runtime.serve.requests import (
    SegmentJob,
    body_kind,
    decode_image,
    open_image,
    parse_segment,
    read_body,
)
from segclip.runtime.serve.responses import label_png, segment_body
from segclip.runtime.serve.settings import ServeSettings

log = logging.getLogger("segclip.serve")
PATH = "/v1/segment"
# image decode / PNG, JPEG encode threads: up to 4, no more than the CPUs this process may use
CODEC_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1)
INLINE_OUTPUTS = frozenset({"label_map", "scores"})  # outputs cheap enough to encode there
HAS_SCORES = "scores" in getattr(SegmentResult, "__dataclass_fields__", {})
CLIENT_CLOSED = 499  # the status counted for a request whose client left before the reply


@dataclass(frozen=True)
class Reply:
    """A response: status, media type, body bytes and extra headers."""

    status: int
    media_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    after: Callable[[], None] | None = None  # run once the reply is written (its metrics)


class ClientGone(Exception):
    """The client disconnected before its body was read."""


def json_bytes(content: Any) -> bytes:
    """Compact UTF-8 JSON by orjson: a segment reply in ~2 µs where the standard library takes
    ~25. Strings, integers and the problem bodies come out as FastAPI's `JSONResponse` writes
    them; small floats may differ in form (0.00001 where Python writes 1e-05)."""
    return orjson.dumps(content)


def problem_reply(problem: Problem, instance: str) -> Reply:
    return Reply(problem.status, MEDIA_TYPE, json_bytes(problem.body(instance)),
                 problem.headers)


class SegmentRoute:
    """`POST /v1/segment` of one app (module docstring)."""

    def __init__(self, engine: Any, settings: ServeSettings, metrics: Metrics,
                 label_sets: Any) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.label_sets = label_sets
        self.expect: Callable[[int], None] = getattr(engine, "expect", lambda delta: None)
        self.codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="segclip-codec")
        self.one_cpu = CODEC_THREADS == 1  # small images' codec work always on the loop
        self._keys = [k.encode("utf-8") for k in sorted(settings.api_keys)]
        self._counted: dict[int, Any] = {}  # status -> its requests counter, looked up once

    def close(self) -> None:
        self.codec.shutdown(wait=True)

    def check_key(self, headers: Mapping[str, str]) -> None:
        """401 unless a configured API key came (`Authorization: Bearer` or `X-API-Key`);
        every key compared, each in constant time. Nothing to check without keys."""
        if not self._keys:
            return
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        candidate = (given or "").encode("utf-8")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise Problem(401, "missing or wrong API key; send it as 'Authorization: Bearer "
                               "KEY' or 'X-API-Key: KEY'",
                          headers={"WWW-Authenticate": 'Bearer realm="segclip"'})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """The plain ASGI entry: headers from the scope, the body from `receive`."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        try:
            reply = await self.respond(headers, _chunks(receive))
        except Problem as problem:
            reply = problem_reply(problem, scope["path"])
        except ClientGone:
            self._count(CLIENT_CLOSED)
            return
        except Exception:  # noqa: BLE001 - logged, answered as a 500 naming no internals
            log.exception("unexpected error on POST %s", scope["path"])
            reply = problem_reply(internal_error(), scope["path"])
        raw_headers = [(b"content-type", reply.media_type.encode("latin-1")),
                       (b"content-length", str(len(reply.body)).encode("latin-1"))]
        raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in reply.headers.items()]
        try:
            await send({"type": "http.response.start", "status": reply.status,
                        "headers": raw_headers})
            await send({"type": "http.response.body", "body": reply.body})
        finally:
            self._count(reply.status)
            if reply.after is not None:
                reply.after()

    def _count(self, status: int) -> None:
        """One more request answered with `status` (its counter looked up once)."""
        counter = self._counted.get(status)
        if counter is None:
            counter = self._counted[status] = self.metrics.requests.labels(PATH, "POST",
                                                                           str(status))
        counter.inc()

    async def respond(self, headers: Mapping[str, str], chunks: AsyncIterator[bytes]) -> Reply:
        """The reply to one request (headers: lower-case names); raises `Problem`."""
        began = time.perf_counter()
        self.check_key(headers)
        settings, engine = self.settings, self.engine
        self.expect(1)
        expecting = True
        try:
            content_type = headers.get("content-type", "")
            body_kind(content_type)  # 415 before the body is read
            body = await read_body(headers.get("content-length"), chunks, settings)
            parsed = parse_segment(content_type, body, settings)
            if "scores" in parsed.outputs and not HAS_SCORES:
                raise Problem(422, "output 'scores' is not available from this runtime")
            labels = parsed.labels
            if labels is None:
                labels = self.label_sets.get(parsed.label_set or "")
            began_decode = time.perf_counter()
            image = await self._decode(parsed.image_bytes)
            decode_ms = (time.perf_counter() - began_decode) * 1e3
            self.expect(-1)
            expecting = False
            remaining = settings.timeout_s - (time.perf_counter() - began)
            try:
                done = await within(engine.segment(SegmentJob(image, labels,
                                                              parsed.threshold)),
                                    max(remaining, 0.0))
            except QueueFull as e:
                raise Problem(503, f"the server is busy ({e}); retry later",
                              headers={"Retry-After": str(settings.retry_after_s)}) from None
            except asyncio.TimeoutError:
                raise Problem(504, f"the request took longer than {settings.timeout_s:g} s "
                                   f"(--timeout-s)") from None
            except SegclipError as e:
                raise _engine_error(e) from None
        finally:
            if expecting:
                self.expect(-1)
        return await self._reply(headers, parsed.outputs, image, done, decode_ms, began)

    async def _reply(self, headers: Mapping[str, str], outputs: tuple[str, ...], image: Any,
                     done: Any, decode_ms: float, began: float) -> Reply:
        result = done.result
        timings = {"queue": done.queue_ms, "decode": decode_ms,
                   **{k: result.timings[k] for k in ("preprocess", "text", "image", "assign")}}

        def record() -> None:  # the metrics, once the reply is on its way
            self.metrics.label_set_lookup(hit=result.timings["text"] == 0)
            if done.first_in_batch:
                self.metrics.batch_size.observe(done.batch_size)
            self.metrics.observe_stages(timings)

        accept = headers.get("accept", "")
        pixels = result.size[0] * result.size[1]
        if "image/png" in accept and "application/json" not in accept:
            began_encode = time.perf_counter()
            png = await self._codec(self._inline(pixels), label_png, result.label_map,
                                    len(result.labels))
            timings["encode"] = (time.perf_counter() - began_encode) * 1e3
            timings["total"] = (time.perf_counter() - began) * 1e3
            return Reply(200, "image/png", png, {
                "X-Segclip-Labels": json.dumps(list(result.labels)),
                "X-Segclip-Timings": json.dumps({k: round(v, 3) for k, v in timings.items()})},
                record)
        inline = INLINE_OUTPUTS.issuperset(outputs) and self._inline(pixels)
        body, timings["encode"] = await self._codec(inline, segment_body, result, image, outputs)
        timings["total"] = (time.perf_counter() - began) * 1e3
        body["batch_size"] = done.batch_size
        body["timings_ms"] = {k: round(v, 3) for k, v in timings.items()}
        return Reply(200, "application/json", json_bytes(body), after=record)

    async def _decode(self, data: bytes) -> Any:
        """The (H, W, 3) image. With the engine idle (or on one CPU) its header is read here,
        and a small image decoded here too (`_inline`); otherwise decoding is handed to the
        codec threads."""
        if not self._local():
            return await self._codec(False, decode_image, data, self.settings.max_pixels)
        opened = open_image(data, self.settings.max_pixels)
        inline = opened.width * opened.height <= INLINE_PIXELS
        return await self._codec(inline, decode_image, opened, self.settings.max_pixels)

    def _local(self) -> bool:
        """Whether codec work may run on the loop: the process has one CPU, or the engine is
        idle (engines without an `idle` property never are)."""
        return self.one_cpu or bool(getattr(self.engine, "idle", False))

    def _inline(self, pixels: int) -> bool:
        """Codec work on the loop itself: `_local` and the image small (module docstring)."""
        return self._local() and pixels <= INLINE_PIXELS

    async def _codec(self, inline: bool, function: Callable[..., Any], *args: Any) -> Any:
        if inline:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self.codec, function, *args)


async def _chunks(receive: Any) -> AsyncIterator[bytes]:
    """The body's chunks from ASGI `receive`; `ClientGone` if the client leaves first."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def _engine_error(error: Exception) -> Problem:
    if isinstance(error, ImageError):  # e.g. too many windows for its aspect ratio
        return Problem(413, str(error))
    return Problem(422, str(error))
