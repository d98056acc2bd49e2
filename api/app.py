"""The FastAPI application: request ids, body limits, traces, health, and the `/v1` routes
(errors are answered by `api.errors`)."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.batches import router as batch_router
from api.deps import Services
from api.errors import error_response, install_error_handlers
from api.files import router as files_router
from api.metrics import ApiMetrics
from api.routes import router
from api.ui.mount import router as ui_router
from api.ui.mount import static_files as ui_static_files
from runner import __version__
from runner.control.migrate import check_schema, require_current_schema
from runner.errors import (
    RunnerError,
)
from runner.observability.telemetry import context_from
from runner.observability.telemetry import trace_id as trace_id_of
from runner.settings import Settings

log = structlog.get_logger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UPLOAD_PATH = "/v1/files"
BATCH_PATH = "/v1/runs/batch"
OPENAPI_TAGS = [
    {"name": "runs", "description": "Submit, read, follow, cancel and replay runs; their "
                                    "logs and artifacts"},
    {"name": "files", "description": "Upload files for runs and read them back"},
    {"name": "processors", "description": "What the manifest in force allows"},
    {"name": "health", "description": "Liveness, readiness and metrics"},
]


@asynccontextmanager
async def webhook_sender(app: FastAPI) -> AsyncIterator[None]:
    """The process's webhook sender runs while the app serves (docs/api.md, "Webhooks")."""
    sender = app.state.services.webhooks
    if sender is not None:
        sender.start(observe=app.state.metrics.webhook_outcome)
    try:
        yield
    finally:
        if sender is not None:
            sender.stop()


def operation_id(route: APIRoute) -> str:
    """A route's OpenAPI operation id: its function's name."""
    return route.name


class RequestContext:
    """Every HTTP request's request id (given or made; answered in X-Request-ID and
    bound to the logs), the body caps checked before the route reads anything, its
    server span (only when tracing is on) and its request metrics.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware
    runs the rest of the app in a task of its own behind memory streams, which cost
    more CPU than the rest of a cached-key GET.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings, services: Services,
                 metrics: ApiMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.tracer = services.tracer
        self.traced = not isinstance(services.tracer, trace.NoOpTracer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, _with_request_id(send, request_id, None))
                return
            started = time.perf_counter()
            status: list[int] = []
            answer = _with_request_id(send, request_id, status)
            if self.traced:
                await self._traced(scope, receive, answer, headers, request_id, status)
            else:
                await self.app(scope, receive, answer)
            if status:
                path = getattr(scope.get("route"), "path", "unmatched")
                method = scope["method"]
                self.metrics.requests.labels(method, path, str(status[0])).inc()
                self.metrics.latency.labels(method, path).observe(
                    time.perf_counter() - started)
        finally:
            structlog.contextvars.unbind_contextvars("request_id", "trace_id")

    def _refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """413 or 411 for a body this process will not read, else None."""
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            length = 0
        if scope["method"] == "POST" and scope["path"] == UPLOAD_PATH:
            return None  # a file upload: streamed, capped by RUNNER_FILE_MAX_BYTES in its route
        if length > self.settings.max_body_bytes:
            return error_response(Request(scope), 413, "body_too_large",
                                  f"request body over {self.settings.max_body_bytes} bytes")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            # Without a length the cap above could be walked around; bodies are small.
            return error_response(Request(scope), 411, "length_required",
                                  "send the body with a Content-Length header")
        return None

    async def _traced(self, scope: Scope, receive: Receive, send: Send, headers: Headers,
                      request_id: str, status: list[int]) -> None:
        method = scope["method"]
        with self.tracer.start_as_current_span(
                f"{method} {scope['path']}", kind=trace.SpanKind.SERVER,
                context=context_from(headers),
                attributes={"http.request.method": method,
                            "runner.request_id": request_id}) as span:
            trace_id = trace_id_of(span)
            if trace_id:
                structlog.contextvars.bind_contextvars(trace_id=trace_id)
            await self.app(scope, receive, send)
            path = getattr(scope.get("route"), "path", "unmatched")
            span.update_name(f"{method} {path}")
            span.set_attribute("http.route", path)
            if status:
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))


def _with_request_id(send: Send, request_id: str, status: list[int] | None) -> Send:
    """`send` that adds X-Request-ID to the response's head (and notes its status)."""
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message)["X-Request-ID"] = request_id
            if status is not None:
                status.append(message["status"])
        await send(message)

    return sending


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """The API application; `services` may be given by tests, else built from settings."""
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the package, not
    # a CDN, so they work on an air-gapped host. Operation ids are the route functions'
    # names (create_run, get_run, upload_file, ...): what generated clients call them.
    app = FastAPIOffline(
        title="Container runner API", version=__version__,
        description="Submit runs of allowlisted processors, each in its own locked-down "
                    "container, and follow them. Authenticate with `Authorization: Bearer`.",
        generate_unique_id_function=operation_id, openapi_tags=OPENAPI_TAGS,
        lifespan=webhook_sender,
    )
    if services is None:
        # Refuse to serve on a schema this code cannot run on (one line, both revisions).
        require_current_schema(settings.database_url)
    app.state.services = services or Services.build(settings)
    metrics = ApiMetrics(app.state.services)
    app.state.metrics = metrics
    app.include_router(router)
    app.include_router(batch_router)
    app.include_router(files_router)
    # The dashboard (docs/dashboard.md): its static files first, so no route shadows them.
    app.mount("/ui/static", ui_static_files(), name="ui-static")
    app.include_router(ui_router)
    if settings.cors_origin_list:  # none by default: browsers get no cross-origin access
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key",
                                          "X-Request-ID", "Range"],
                           expose_headers=["X-Request-ID", "Retry-After", "X-Log-Truncated",
                                           "X-Log-Next-Offset", "Content-Range",
                                           "Content-Disposition"])

    app.add_middleware(RequestContext, settings=settings, services=app.state.services,
                       metrics=metrics)
    install_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics_endpoint() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Database, Redis and manifest usable; 503 naming what is not."""
        svc: Services = app.state.services
        checks: dict[str, str] = {}
        for name, check in (("database", svc.store.ping), ("redis", svc.queue.ping),
                            ("manifest", svc.manifests.current),
                            ("schema", lambda: check_schema(svc.store.engine))):
            try:
                check()
                checks[name] = "ok"
            except RunnerError as exc:
                checks[name] = exc.message
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                            status_code=200 if ready else 503)

    return app


def app_from_environment() -> FastAPI:
    """The app of one process of `runner api --workers N` (uvicorn's factory): its
    settings and logging from the environment, as the command reads them."""
    from runner.observability.logsetup import configure_logging
    from runner.settings import load_settings

    settings = load_settings()
    configure_logging(service="api", fmt=settings.log_format, level=settings.log_level)
    return create_app(settings)
