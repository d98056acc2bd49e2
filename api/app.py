"""The FastAPI application: request ids, body limits, traces, health, and the `/v1` routes
(errors are answered by `api.errors`)."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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

    @app.middleware("http")
    async def request_context(request: Request,
                              call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else secrets.token_hex(8)
        request.state.request_id = request_id
        response: Response | None = None
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        cap = (settings.batch_max_bytes if request.url.path == BATCH_PATH
               else settings.max_body_bytes)
        if request.method == "POST" and request.url.path == UPLOAD_PATH:
            pass  # a file upload: streamed, capped by RUNNER_FILE_MAX_BYTES in its route
        elif length > cap:
            response = error_response(request, 413, "body_too_large",
                                      f"request body over {cap} bytes")
        elif "chunked" in request.headers.get("transfer-encoding", "").lower():
            # Without a length the cap above could be walked around; bodies are small.
            response = error_response(request, 411, "length_required",
                              "send the body with a Content-Length header")
        if response is None:
            started = time.perf_counter()
            tracer = app.state.services.tracer
            with tracer.start_as_current_span(
                    f"{request.method} {request.url.path}", kind=trace.SpanKind.SERVER,
                    context=context_from(request.headers),
                    attributes={"http.request.method": request.method,
                                "runner.request_id": request_id}) as span:
                trace_id = trace_id_of(span)
                if trace_id:
                    structlog.contextvars.bind_contextvars(trace_id=trace_id)
                response = await call_next(request)
                route = request.scope.get("route")
                path = getattr(route, "path", "unmatched")
                span.update_name(f"{request.method} {path}")
                span.set_attribute("http.route", path)
                span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
            metrics.requests.labels(request.method, path, str(response.status_code)).inc()
            metrics.latency.labels(request.method, path).observe(time.perf_counter() - started)
        response.headers["X-Request-ID"] = request_id
        structlog.contextvars.unbind_contextvars("request_id", "trace_id")
        return response

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
