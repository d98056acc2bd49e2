"""The `/v1` routes. Domain errors propagate to the one handler in `api.app`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from opentelemetry import trace
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from api.auth import Principal, submission, submitter, viewer
from api.deps import Services, run_or_404, services
from api.metrics import ApiMetrics
from api.schemas import (
    ArtifactOut,
    AttemptOut,
    ErrorOut,
    ProcessorList,
    ProcessorOut,
    RunCreate,
    RunList,
    RunListItem,
    RunOut,
    WebhookOut,
)
from runner.control.outbox import webhook_status
from runner.control.runs import replay, submit
from runner.control.store import RUN_VALUES
from runner.control.strictjson import strict_loads
from runner.domain import Run, RunStatus
from runner.errors import InvalidRequestError, ServiceUnavailableError
from runner.observability.telemetry import traceparent

log = structlog.get_logger(__name__)


class StrictJsonRequest(Request):
    """A request whose JSON body is read by `strict_loads`: an integer too long for
    Python's int() becomes a marker, not a ValueError (which FastAPI answers as an
    unparseable body), so `check_input` can refuse it, and NaN or an infinity, naming
    `input` (runner/control/strictjson.py)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route that reads JSON bodies with `StrictJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict


# The error answers every /v1 route may give, for its OpenAPI operation (api/batches.py
# can pass the same to its router).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing, unknown or revoked API key"},
    403: {"model": ErrorOut, "description": "The key's role does not allow this"},
    422: {"model": ErrorOut, "description": "Invalid request"},
    429: {"model": ErrorOut, "description": "Rate limit or quota reached; see Retry-After",
          "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    503: {"model": ErrorOut, "description": "Database unavailable or busy, or too many log "
                                            "follows; see Retry-After when present",
          "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
}
router = APIRouter(prefix="/v1", route_class=StrictJsonRoute, responses=ERROR_RESPONSES)

FOLLOW_POLL_SECONDS = 0.25
FOLLOW_READ_BYTES = 1024 * 1024  # the most a follow reads (and sends) in one step
LOG_READ_MAX_BYTES = 2**62  # a plain read answers everything from its offset on
TAIL_LINES = 20
TAIL_BYTES = 16 * 1024
# A list item carries `input` and `result` only when asked for (?include=), and then
# only each one of at most this many bytes as stored: a page of 200 runs stays small
# however large its runs' values are (GET /v1/runs/{id} has them whole).
LIST_VALUE_MAX_BYTES = 64 * 1024


def _timestamp(value: str | None, field: str) -> datetime | None:
    """An ISO 8601 date-time with its zone (naive ones are taken as UTC); nothing else."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"{field}: not an ISO 8601 date-time", field=field) from None
    # Stored times are UTC (SQLite keeps no zone), so compare in UTC.
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


MAX_WAIT_SECONDS = 60.0
WAIT_CHECK_SECONDS = 0.25  # the fallback status read when no run-end notice came
MAX_LONG_POLLS = 64  # per API process; each holds no thread between its checks


def _no_nul(value: str | None, field: str) -> None:
    """Raises: InvalidRequestError for a NUL character, which no stored text holds
    (and PostgreSQL refuses to compare with)."""
    if value is not None and "\x00" in value:
        raise InvalidRequestError(f"{field}: a NUL character is not allowed", field=field)


@router.post("/runs", tags=["runs"], status_code=202, response_model=RunOut,
             responses={503: {"model": ErrorOut, "description": "Database unavailable"}})
async def create_run(body: RunCreate, who: Annotated[Principal, Depends(submission)],
                     request: Request,
                     idempotency_key: Annotated[str | None, Header(
                         alias="Idempotency-Key", min_length=1, max_length=128,
                         description="The same key with the same body returns the same "
                                     "run")] = None,
                     ) -> Response:
    """Submit a run of an allowlisted processor; answers with the queued run."""
    # The key, its limits and the tenant's submission were counted by `submission`;
    # the rest is one worker-thread hop, and the answer is serialized once, there.
    content = await run_in_threadpool(_create_run, request.app.state.services,
                                      request.app.state.metrics, body, who,
                                      idempotency_key)
    return Response(content, status_code=202, media_type="application/json")


def _create_run(svc: Services, metrics: ApiMetrics, body: RunCreate, who: Principal,
                idempotency_key: str | None) -> bytes:
    """`create_run`'s blocking part: the submission, recorded and queued; its run
    object as JSON (exactly what `response_model=RunOut` would send)."""
    run = submit(body.submission(who.tenant, idempotency_key=idempotency_key,
                                 traceparent=traceparent(trace.get_current_span())),
                 manifest=svc.manifests.current(), store=svc.store, queue=svc.queue,
                 **svc.submit_options())
    if run.reused_from is not None:
        metrics.reused.labels(run.processor).inc()
    metrics.submitted.labels(run.processor).inc()
    out = RunOut.of(run, webhook=_webhook(svc, run) if body.webhook_url else None)
    return out.model_dump_json(by_alias=True).encode()


@router.get("/runs", tags=["runs"], response_model=RunList)
def list_runs(who: Annotated[Principal, Depends(viewer)],
              svc: Annotated[Services, Depends(services)],
              status: RunStatus | None = None,
              processor: Annotated[str | None, Query(max_length=64)] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query(max_length=200)] = None,
              label: Annotated[list[str] | None, Query(
                  max_length=8, description="key=value; repeat to require several")] = None,
              created_after: Annotated[str | None, Query(
                  max_length=40, json_schema_extra={"format": "date-time"})] = None,
              created_before: Annotated[str | None, Query(
                  max_length=40, json_schema_extra={"format": "date-time"})] = None,
              include: Annotated[str | None, Query(
                  max_length=32, pattern=r"^(input|result)(,(input|result))?$",
                  description="`input`, `result` or `input,result`: put these values in "
                              "the items (each only up to 64 KiB as stored; `omitted` "
                              "names those left out)")] = None,
              ) -> RunList:
    """The caller's tenant's runs, newest first; pass `next_cursor` back for more.

    Items leave `input` and `result` out (null, named in `omitted`) unless `include`
    asks for them."""
    _no_nul(processor, "processor")
    labels: dict[str, str] = {}
    for item in label or []:
        _no_nul(item, "label")
        key, sep, value = item.partition("=")
        if not sep or not key or len(item) > 320:
            raise InvalidRequestError(f"label filter {item[:80]!r} is not key=value",
                                      field="label")
        labels[key] = value
    values = [v for v in RUN_VALUES if v in (include or "").split(",")]
    page = svc.store.list_page(
        tenant=who.tenant, status=status.value if status else None, processor=processor,
        limit=limit, cursor=cursor, labels=labels,
        created_after=_timestamp(created_after, "created_after"),
        created_before=_timestamp(created_before, "created_before"),
        values=values, value_max_bytes=LIST_VALUE_MAX_BYTES)
    return RunList(items=[RunListItem.of(r, omitted=list(page.left_out.get(r.id, ())),
                                         artifacts=None)
                          for r in page.runs], next_cursor=page.next_cursor)


@router.get("/runs/{run_id}", tags=["runs"], response_model=RunOut,
            responses={404: {"model": ErrorOut, "description": "No such run"}})
async def get_run(run_id: str, who: Annotated[Principal, Depends(viewer)],
                  svc: Annotated[Services, Depends(services)], request: Request,
                  wait: Annotated[float, Query(
                      ge=0, le=MAX_WAIT_SECONDS,
                      description="Hold the answer up to this many seconds until the run "
                                  "has ended (a long poll); 0 answers at once")] = 0,
                  ) -> RunOut:
    """One run, with its attempts; a dead letter also carries its last log lines."""
    run = await run_in_threadpool(run_or_404, svc, run_id, who.tenant)
    if wait and not run.status.terminal and svc.long_polls < MAX_LONG_POLLS:
        # Woken by the worker's run-end notice (Redis pub/sub), with a status read
        # every WAIT_CHECK_SECONDS as the fallback for a lost notice. Like a follow
        # stream, never held past RUNNER_FOLLOW_MAX_SECONDS; a process holds at most
        # MAX_LONG_POLLS at once (past that, the answer is immediate and the client
        # asks again).
        svc.long_polls += 1
        ended = svc.ends.watch(run.id)
        try:
            deadline = time.monotonic() + min(wait, svc.settings.follow_max_seconds)
            while True:  # the first check also covers an end before the watch began
                status = await run_in_threadpool(svc.store.run_status, run.id)
                remaining = deadline - time.monotonic()
                if status is None or RunStatus(status).terminal or remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(),
                                           timeout=min(WAIT_CHECK_SECONDS, remaining))
                ended.clear()
                if await request.is_disconnected():  # nobody left to answer
                    break
        finally:
            svc.ends.unwatch(run.id, ended)
            svc.long_polls -= 1
        run = await run_in_threadpool(run_or_404, svc, run_id, who.tenant)
    return await run_in_threadpool(_run_view, svc, run)


def _run_view(svc: Services, run: Run) -> RunOut:
    tail = None
    if run.status is RunStatus.DEAD_LETTER:
        start = max(0, run.log_bytes - TAIL_BYTES)
        text = svc.store.read_logs_since(run.id, start, TAIL_BYTES).decode(errors="replace")
        tail = text.splitlines()[-TAIL_LINES:]
    by_attempt = svc.files.artifacts_by_attempt(run.id)
    attempts = [AttemptOut(**a, artifacts=[ArtifactOut(**x.public())
                                           for x in by_attempt.get(a["number"], [])])
                for a in svc.store.attempts(run.id)]
    receipts = [a.provenance for a in attempts if a.provenance]
    return RunOut.of(run, attempts=attempts, last_log_lines=tail,
                     provenance=receipts[-1] if receipts else None,
                     artifacts=[x.public() for x in by_attempt.get(run.attempt, [])],
                     webhook=_webhook(svc, run))


def _webhook(svc: Services, run: Run) -> WebhookOut | None:
    """The run's webhook and its delivery, as the run object shows them."""
    found = webhook_status(svc.store, run.id)
    return WebhookOut(**vars(found)) if found is not None else None


@router.post("/runs/{run_id}/cancel", tags=["runs"], response_model=RunOut,
             responses={404: {"model": ErrorOut, "description": "No such run"},
                        409: {"model": ErrorOut, "description": "The run already ended"}})
def cancel_run(run_id: str, who: Annotated[Principal, Depends(submitter)],
               svc: Annotated[Services, Depends(services)]) -> RunOut:
    """Cancel: a queued run never starts; a running one is stopped within its grace."""
    # A queued run ends here (its lifecycle tells the run-end listeners); a running
    # one ends on its worker.
    run = svc.lifecycle.cancel(run_id, tenant=who.tenant)
    return RunOut.of(run, webhook=_webhook(svc, run))


@router.post("/runs/{run_id}/replay", tags=["runs"], status_code=202, response_model=RunOut,
             responses={404: {"model": ErrorOut, "description": "No such run"},
                        409: {"model": ErrorOut, "description": "The run has not ended"}})
def replay_run(run_id: str, who: Annotated[Principal, Depends(submission)],
               svc: Annotated[Services, Depends(services)], request: Request) -> RunOut:
    """A new run of an ended run's processor version and input, linked by `replay_of`."""
    run = replay(run_id, tenant=who.tenant, manifest=svc.manifests.current(),
                 store=svc.store, queue=svc.queue, **svc.submit_options(),
                 traceparent=traceparent(trace.get_current_span()))
    request.app.state.metrics.submitted.labels(run.processor).inc()
    return RunOut.of(run, webhook=_webhook(svc, run))


@router.get("/runs/{run_id}/logs", tags=["runs"], response_class=Response,
            responses={200: {"content": {"text/plain": {}},
                             "description": "Captured stdout and stderr"},
                       404: {"model": ErrorOut, "description": "No such run"}})
async def get_logs(run_id: str, who: Annotated[Principal, Depends(viewer)],
                   svc: Annotated[Services, Depends(services)],
                   offset: Annotated[int, Query(ge=0, le=LOG_READ_MAX_BYTES)] = 0,
                   follow: bool = False) -> Response:
    """The run's captured output from byte `offset`; `follow=true` streams until it ends.

    A key may follow RUNNER_FOLLOW_MAX_PER_KEY runs at once (429 past that), a process
    RUNNER_FOLLOW_MAX_PER_PROCESS (503), both with Retry-After."""
    run = await run_in_threadpool(run_or_404, svc, run_id, who.tenant)
    headers = {"X-Log-Truncated": str(run.log_truncated).lower()}
    if not follow:
        # Only the chunks past `offset` are read: a client polling with the offset it
        # got last time costs what is new, not the whole log again.
        data = await run_in_threadpool(svc.store.read_logs_since, run_id, offset,
                                       LOG_READ_MAX_BYTES)
        headers["X-Log-Next-Offset"] = str(offset + len(data))
        return Response(data, media_type="text/plain; charset=utf-8", headers=headers)
    svc.hold_follow(who.key_id)  # on the event loop, as is every release
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            svc.release_follow(who.key_id)

    return _HeldStream(_follow(svc, who, run_id, offset), release=release,
                       media_type="text/plain; charset=utf-8", headers=headers)


async def _follow(svc: Services, who: Principal, run_id: str,
                  offset: int) -> AsyncIterator[bytes]:
    """New output of the run as it is stored, until the run has ended.

    Bounded, so an idle follower cannot hold a connection forever; clients resume
    with ?offset= (X-Log-Next-Offset of a plain read tells where). Each step reads
    only the chunks past what was sent, at most FOLLOW_READ_BYTES; every
    RUNNER_FOLLOW_KEY_CHECK_SECONDS the key is checked again, and a revoked one ends
    the stream. A database that fails mid-stream ends it too (the client resumes).
    """
    settings = svc.settings
    position = offset
    deadline = time.monotonic() + settings.follow_max_seconds
    key_checked = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if time.monotonic() - key_checked >= settings.follow_key_check_seconds:
                if not await run_in_threadpool(svc.keys.is_active, who.key_id):
                    log.info("follow_key_revoked", run_id=run_id, key_id=who.key_id)
                    return
                key_checked = time.monotonic()
            # The status first: output stored before the run ended is read after it.
            status = await run_in_threadpool(svc.store.run_status, run_id)
            data = await run_in_threadpool(svc.store.read_logs_since, run_id, position,
                                           FOLLOW_READ_BYTES)
            if data:
                position += len(data)
                yield data
                if len(data) == FOLLOW_READ_BYTES:
                    continue  # more is stored already: no pause
            if status is None or RunStatus(status).terminal:
                return
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
    except ServiceUnavailableError as exc:
        log.warning("follow_ended", run_id=run_id, error=exc.message)


class _HeldStream(StreamingResponse):
    """A follow's response: gives its slot back however the response ends (done,
    client gone, cancelled), and even when the stream never started."""

    def __init__(self, content: AsyncIterator[bytes], *, release: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.get("/processors", tags=["processors"], response_model=ProcessorList)
def list_processors(_who: Annotated[Principal, Depends(viewer)],
                    svc: Annotated[Services, Depends(services)]) -> ProcessorList:
    """The processors the manifest in force allows."""
    manifest = svc.manifests.current()
    return ProcessorList(items=[ProcessorOut(**p.public()) for p in manifest.processors],
                         manifest_revision=manifest.revision)
