"""The one place the runner's error tree becomes HTTP: status, body and headers.

Every error a route raises is a `RunnerError` (runner/errors.py) or one of
FastAPI's own (validation, unknown route or method); each is answered with the same
body, `{"error": {"code", "message", "request_id", "field"?}}`. Anything else is a
500 `internal_error` whose details go to the log, never to the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from runner.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RangeNotSatisfiableError,
    RateLimitedError,
    RunnerError,
    ServiceUnavailableError,
)

log = structlog.get_logger(__name__)

# The HTTP status of each branch of the error tree (first match wins); any other
# RunnerError is a 500.
STATUS: list[tuple[type[RunnerError], int]] = [
    (RateLimitedError, 429),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (PayloadTooLargeError, 413),
    (RangeNotSatisfiableError, 416),
    (InvalidRequestError, 422),
    (ServiceUnavailableError, 503),
]


def error_response(request: Request, status: int, code: str, message: str,
           field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message,
                            "request_id": getattr(request.state, "request_id", "")}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def field_of(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def status_of(exc: RunnerError) -> int:
    return next((s for cls, s in STATUS if isinstance(exc, cls)), 500)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` with the one error body."""

    @app.exception_handler(RunnerError)
    async def runner_error(request: Request, exc: RunnerError) -> JSONResponse:
        status = status_of(exc)
        if status == 500:
            log.error("request_failed", error=exc.message, code=exc.code)
            return error_response(request, 500, "internal_error", "internal error")
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status == 429:
            headers = {"Retry-After": str(exc.context.get("retry_after", 1))}
        elif status == 416 and "size" in exc.context:
            headers = {"Content-Range": f"bytes */{exc.context['size']}"}
        elif status == 503 and "retry_after" in exc.context:
            headers = {"Retry-After": str(exc.context["retry_after"])}
        return error_response(request, status, exc.code, exc.message,
                      field=exc.context.get("field"), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = field_of(first.get("loc", ()))
        message = f"{field}: {first.get('msg', 'invalid')}"
        if first.get("type") == "extra_forbidden":
            message = f"{field}: unknown field"
        return error_response(request, 422, "invalid_request", message, field=field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body that is not even text: same as bad JSON
            return error_response(request, 422, "invalid_request", f"body: {exc.detail}",
                          field="body")
        codes = {404: "not_found", 405: "method_not_allowed"}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; name them all.
            methods = {m for route in app.routes if isinstance(route, APIRoute)
                       and route.matches(request.scope)[0] is not Match.NONE
                       for m in route.methods or ()}
            headers["Allow"] = ", ".join(sorted(methods))
        return error_response(request, exc.status_code, codes.get(exc.status_code, "http_error"),
                      str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request_crashed")
        return error_response(request, 500, "internal_error", "internal error")
