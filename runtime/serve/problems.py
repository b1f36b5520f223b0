"""RFC 9457 problem details (`application/problem+json`) for every error of `segclip-serve`
(docs/serve.md "Errors").

Route code raises `Problem(status, detail)`; `install_handlers` also turns FastAPI's own errors
(unknown route, wrong method, validation) into problems, and any other exception into a 500
whose body names no internals (the traceback goes to the server log only).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "urn:segclip:problem:"  # + a slug per status, e.g. urn:segclip:problem:too-large
SLUGS = {400: "malformed-request", 401: "unauthorized", 404: "not-found",
         405: "method-not-allowed", 406: "not-acceptable", 413: "too-large",
         415: "unsupported-media", 422: "invalid-input", 500: "internal-error",
         503: "unavailable", 504: "timeout"}

log = logging.getLogger("segclip.serve")


class Problem(Exception):
    """An HTTP error answered as problem+json."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None,
                 title: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = int(status), detail, dict(headers or {})
        self.title = title or HTTPStatus(self.status).phrase

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": TYPE_BASE + SLUGS.get(self.status, str(self.status)),
                                "title": self.title, "status": self.status,
                                "detail": self.detail}
        if instance:
            body["instance"] = instance
        return body


def internal_error() -> Problem:
    """The 500 of an unexpected exception: its body names no internals (the log has them)."""
    return Problem(500, "the server failed to process the request; see the server log")


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(problem.body(instance), status_code=problem.status,
                        headers=problem.headers, media_type=MEDIA_TYPE)


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    """Answer every error of `app` as problem+json."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem_response(Problem(exc.status_code, detail, dict(exc.headers or {})),
                                request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(Problem(422, _validation_detail(exc)), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem_response(internal_error(), request.url.path)
