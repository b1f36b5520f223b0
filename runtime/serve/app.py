"""`build_app(engine, settings)`: the FastAPI app of `segclip-serve` (docs/serve.md "API").

Routes: `GET /` (the demo page), `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /v1/model`,
`POST /v1/label-sets`, `POST /v1/segment`, plus FastAPI's `/docs` and `/openapi.json`. The app
parses, validates, decodes, encodes and counts; the engine (see the package docstring) only
segments. `POST /v1/segment` is `route.SegmentRoute`, answered before FastAPI's own layers
(`SegclipAPI`); the route FastAPI declares for it serves the same handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.background import BackgroundTask

from segclip._version import __version__
from segclip.runtime.serve.metrics import CONTENT_TYPE, Metrics
from segclip.runtime.serve.problems import Problem, install_handlers
from segclip.runtime.serve.requests import json_body, read_body, validate_labels
from segclip.runtime.serve.route import HAS_SCORES, PATH, SegmentRoute
from segclip.runtime.serve.settings import ServeSettings

log = logging.getLogger("segclip.serve")


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


class SegclipAPI(FastAPI):
    """FastAPI, with `POST /v1/segment` handed to its `SegmentRoute` before the framework's
    middleware and router (route.py says why); every other request goes through FastAPI."""

    segment_route: SegmentRoute | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST"
                and self.segment_route is not None and _route_path(scope) == PATH):
            await self.segment_route(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _route_path(scope: dict) -> str:
    """The path below the app's mount point (`root_path`, e.g. a Ray Serve route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        return path[len(root):]
    return path


def build_app(engine: Any, settings: ServeSettings,
              label_sets: LabelSets | None = None) -> FastAPI:
    """The service bound to `engine` (the `Engine` interface in the package docstring).

    `label_sets`: where registered label sets live (default: in this process; Ray Serve
    replicas share one store, runtime/serve/ray.py)."""
    metrics = Metrics(lambda: engine.queue_depth)
    label_sets = label_sets if label_sets is not None else LabelSets(settings.label_sets)
    segment_route = SegmentRoute(engine, settings, metrics, label_sets)
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
            segment_route.close()

    app = SegclipAPI(title="segclip-serve", version=__version__, lifespan=lifespan,
                     description="Open-vocabulary semantic segmentation (SegCLIP) over HTTP.")
    app.state.metrics, app.state.engine, app.state.label_sets = metrics, engine, label_sets
    app.segment_route = segment_route
    install_handlers(app)

    async def check_key(request: Request) -> None:
        segment_route.check_key(request.headers)

    guarded = [Depends(check_key)] if settings.api_keys else []
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
        body = await read_body(request.headers.get("content-length"), request.stream(),
                               settings)
        data = json_body(body)
        if not isinstance(data, dict) or "labels" not in data:
            raise Problem(400, 'send a JSON object {"labels": [...]}')
        labels = validate_labels(data["labels"], settings)
        text_ms = await engine.register_label_set(labels)
        return {"id": label_sets.add(labels), "labels": list(labels),
                "text_ms": round(text_ms, 3)}

    @app.post(PATH)  # the API key is checked in SegmentRoute.respond, as on the plain entry
    async def segment(request: Request) -> Response:
        # reached only when SegclipAPI does not take the request itself (no docstring: FastAPI
        # would publish it in /openapi.json)
        reply = await segment_route.respond(request.headers, request.stream())
        return Response(reply.body, status_code=reply.status, media_type=reply.media_type,
                        headers=reply.headers,
                        background=BackgroundTask(reply.after) if reply.after else None)

    return app
