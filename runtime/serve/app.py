"""`build_app(engine, settings)`: the FastAPI app of `segclip-serve` (docs/serve.md "API").

Routes: `GET /` (the demo page), `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /v1/model`,
`POST /v1/label-sets`, `POST /v1/segment`, plus FastAPI's `/docs` and `/openapi.json`. The app
parses, validates, decodes, encodes and counts; the engine (see the package docstring) only
segments. Decoding and encoding run in a small thread pool of their own (few threads keep memory
bounded), so the loop keeps accepting requests while the engine works. When the engine is idle
(nothing queued or running), a small image (up to `INLINE_PIXELS`) is decoded, and its label-map
PNG encoded, on the loop itself: there is nothing to overlap with, and that work (~1 ms) costs
little more than the two thread hand-offs it saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from segclip._version import __version__
from segclip.errors import SegclipError
from segclip.runtime.errors import ImageError
from segclip.runtime.segmenter import SegmentResult
from segclip.runtime.serve.engine import QueueFull
from segclip.runtime.serve.metrics import CONTENT_TYPE, Metrics
from segclip.runtime.serve.problems import Problem, install_handlers
from segclip.runtime.serve.requests import (
    SegmentJob,
    decode_image,
    header_pixels,
    parse_segment,
    read_body,
    validate_labels,
)
from segclip.runtime.serve.responses import label_png, segment_body
from segclip.runtime.serve.settings import ServeSettings

log = logging.getLogger("segclip.serve")
CODEC_THREADS = min(4, os.cpu_count() or 1)  # image decode / PNG, JPEG encode threads
INLINE_PIXELS = 1 << 19  # up to ~0.5 MP: decoded / label map encoded on the loop when idle
INLINE_OUTPUTS = frozenset({"label_map", "scores"})  # outputs cheap enough to encode there
HAS_SCORES = "scores" in getattr(SegmentResult, "__dataclass_fields__", {})


class LabelSets:
    """Registered label sets by id (a hash of the labels, so every replica agrees), bounded LRU."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._sets: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    @staticmethod
    def key(labels: tuple[str, ...]) -> str:
        payload = json.dumps(list(labels), ensure_ascii=False).encode("utf-8")
        return "ls_" + hashlib.sha256(payload).hexdigest()[:24]

    def add(self, labels: tuple[str, ...]) -> str:
        key = self.key(labels)
        self._sets[key] = labels
        self._sets.move_to_end(key)
        while len(self._sets) > self.capacity:
            self._sets.popitem(last=False)
        return key

    def get(self, key: str) -> tuple[str, ...]:
        labels = self._sets.get(key)
        if labels is None:
            raise Problem(422, f"unknown label_set {key!r}; register it with POST /v1/label-sets "
                               f"(sets unused for long are dropped past {self.capacity})")
        self._sets.move_to_end(key)
        return labels


class _CountRequests:
    """ASGI middleware: count every HTTP request by route, method and final status."""

    def __init__(self, app: Any, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts

        async def counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()


def _api_key_check(settings: ServeSettings):
    keys = [k.encode("utf-8") for k in sorted(settings.api_keys)]

    async def check(request: Request) -> None:  # installed only when keys are configured
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        candidate = (given or "").encode("utf-8")
        matched = False
        for key in keys:  # every key compared, in constant time each
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise Problem(401, "missing or wrong API key; send it as 'Authorization: Bearer "
                               "KEY' or 'X-API-Key: KEY'",
                          headers={"WWW-Authenticate": 'Bearer realm="segclip"'})
    return check


def _engine_error(error: Exception) -> Problem:
    if isinstance(error, ImageError):  # e.g. too many windows for its aspect ratio
        return Problem(413, str(error))
    return Problem(422, str(error))


def build_app(engine: Any, settings: ServeSettings,
              label_sets: LabelSets | None = None) -> FastAPI:
    """The service bound to `engine` (the `Engine` interface in the package docstring).

    `label_sets`: where registered label sets live (default: in this process; Ray Serve
    replicas share one store, runtime/serve/ray.py)."""
    metrics = Metrics(lambda: engine.queue_depth)
    label_sets = label_sets if label_sets is not None else LabelSets(settings.label_sets)
    expect = getattr(engine, "expect", lambda delta: None)
    codec = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="segclip-codec")

    async def in_codec(inline: bool, function: Callable[..., Any], *args: Any) -> Any:
        if inline:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(codec, function, *args)
    state: dict[str, Any] = {"warm_up_error": None}

    async def warm_up() -> None:
        try:
            await engine.warm_up()
            metrics.ready.set(1)
        except Exception as e:  # noqa: BLE001 - reported by /readyz and the log
            state["warm_up_error"] = f"{type(e).__name__}: {e}"
            log.exception("warm-up failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        task = asyncio.create_task(warm_up())
        try:
            yield
        finally:
            task.cancel()
            await engine.close()
            codec.shutdown(wait=True)

    app = FastAPI(title="segclip-serve", version=__version__, lifespan=lifespan,
                  description="Open-vocabulary semantic segmentation (SegCLIP) over HTTP.")
    app.state.metrics, app.state.engine, app.state.label_sets = metrics, engine, label_sets
    install_handlers(app)
    guarded = [Depends(_api_key_check(settings))] if settings.api_keys else []
    page = resources.files("segclip.runtime.serve").joinpath("static/index.html").read_text(
        encoding="utf-8")
    routes = {"/", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/label-sets",
              "/v1/segment", "/docs", "/openapi.json"}

    app.add_middleware(_CountRequests, metrics=metrics, routes=frozenset(routes))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        if not engine.ready:
            why = state["warm_up_error"] or "warming up: the engines have not run yet"
            raise Problem(503, why, headers={"Retry-After": str(settings.retry_after_s)})
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/model", dependencies=guarded)
    async def model() -> dict[str, Any]:
        return {**engine.model_info(), "version": __version__, "ready": bool(engine.ready),
                "limits": settings.limits(),
                "outputs": ["label_map", "masks", *(["scores"] if HAS_SCORES else []),
                            "overlay"]}

    @app.post("/v1/label-sets", dependencies=guarded)
    async def register(request: Request) -> dict[str, Any]:
        body = await read_body(request, settings)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Problem(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict) or "labels" not in data:
            raise Problem(400, 'send a JSON object {"labels": [...]}')
        labels = validate_labels(data["labels"], settings)
        text_ms = await engine.register_label_set(labels)
        return {"id": label_sets.add(labels), "labels": list(labels),
                "text_ms": round(text_ms, 3)}

    @app.post("/v1/segment", dependencies=guarded)
    async def segment(request: Request) -> Response:
        return await _segment(request, engine, settings, metrics, label_sets, expect, in_codec)

    return app


def _inline(engine: Any, pixels: Callable[[], int]) -> bool:
    """Codec work on the loop itself: the engine is idle and the image small (module docstring).
    Engines without an `idle` property always hand it off."""
    return bool(getattr(engine, "idle", False)) and pixels() <= INLINE_PIXELS


async def _segment(request: Request, engine: Any, settings: ServeSettings, metrics: Metrics,
                   label_sets: LabelSets, expect: Any, in_codec: Any) -> Response:
    began = time.perf_counter()
    expect(1)
    expecting = True
    try:
        parsed = await parse_segment(request, settings)
        if "scores" in parsed.outputs and not HAS_SCORES:
            raise Problem(422, "output 'scores' is not available from this runtime")
        labels = parsed.labels
        if labels is None:
            labels = label_sets.get(parsed.label_set or "")
        inline = _inline(engine, lambda: header_pixels(parsed.image_bytes))
        image, decode_ms = await in_codec(inline, decode_image, parsed.image_bytes,
                                          settings.max_pixels)
        expect(-1)
        expecting = False
        remaining = settings.timeout_s - (time.perf_counter() - began)
        try:
            done = await asyncio.wait_for(engine.segment(SegmentJob(image, labels,
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
            expect(-1)
    result = done.result
    timings = {"queue": done.queue_ms, "decode": decode_ms,
               **{k: result.timings[k] for k in ("preprocess", "text", "image", "assign")}}
    metrics.label_set_lookup(hit=result.timings["text"] == 0)
    if done.first_in_batch:
        metrics.batch_size.observe(done.batch_size)
    accept = request.headers.get("accept", "")
    pixels = result.size[0] * result.size[1]
    if "image/png" in accept and "application/json" not in accept:
        began_encode = time.perf_counter()
        png = await in_codec(_inline(engine, lambda: pixels), label_png, result.label_map,
                             len(result.labels))
        timings["encode"] = (time.perf_counter() - began_encode) * 1e3
        timings["total"] = (time.perf_counter() - began) * 1e3
        metrics.observe_stages(timings)
        return Response(png, media_type="image/png", headers={
            "X-Segclip-Labels": json.dumps(list(result.labels)),
            "X-Segclip-Timings": json.dumps({k: round(v, 3) for k, v in timings.items()})})
    inline = INLINE_OUTPUTS.issuperset(parsed.outputs) and _inline(engine, lambda: pixels)
    body, timings["encode"] = await in_codec(inline, segment_body, result, image,
                                             parsed.outputs)
    timings["total"] = (time.perf_counter() - began) * 1e3
    metrics.observe_stages(timings)
    body["batch_size"] = done.batch_size
    body["timings_ms"] = {k: round(v, 3) for k, v in timings.items()}
    return JSONResponse(body)
