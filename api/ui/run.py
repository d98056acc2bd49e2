"""`/ui/runs/{id}`: one run, its attempts, provenance, values, files and live log.

The page shows the log's last LOG_TAIL_BYTES (the whole log is a download); while the
run is active `ui.js` polls `/ui/runs/{id}/live?offset=N`, which answers the status
and the output stored past byte N (`Store.read_logs_since`, the API's follow read),
cut on a character boundary, and appends it as text. Downloads (the log, artifacts,
files in) go through `api.downloads.stored_response`: attachments, never rendered.
Another tenant's run is 404 here as in the API (`api.deps.run_or_404`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.deps import Services, run_or_404
from api.downloads import disposition, stored_response
from api.files import artifact_response
from api.ui.access import State, Svc, User
from api.ui.security import UiRoute, templates
from api.ui.templating import when
from api.ui.views import complete_utf8, limits_of, timeline, webhook_of
from runner.control.outbox import webhook_status
from runner.domain import Run, RunStatus, utcnow
from runner.errors import NotFoundError, RunnerError

router = APIRouter(route_class=UiRoute)

LOG_TAIL_BYTES = 64 * 1024  # what the page shows of the log at first
LIVE_LOG_BYTES = 256 * 1024  # the most one live poll answers
DOWNLOAD_STEP_BYTES = 1024 * 1024


def _log_tail(svc: Services, run: Run) -> tuple[str, int, int]:
    """(text, offset after it, bytes left out before it) of the log's end."""
    total = svc.store.log_offset(run.id)
    start = max(0, total - LOG_TAIL_BYTES)
    data = svc.store.read_logs_since(run.id, start, LOG_TAIL_BYTES)
    if not run.status.terminal:
        data = complete_utf8(data)
    skipped = start
    if start > 0:  # begin at a whole line
        cut = data.find(b"\n")
        if 0 <= cut < len(data) - 1:
            data, skipped = data[cut + 1:], start + cut + 1
    return data.decode(errors="replace"), skipped + len(data), skipped


def _actions(run: Run) -> dict[str, bool]:
    return {"can_cancel": not run.status.terminal and run.cancel_requested_at is None,
            "can_replay": run.status.terminal}


@router.get("/ui/runs/{run_id}/live")
def run_live(run_id: str, user: User, svc: Svc, state: State,
             offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> Response:
    """The run's status and the log stored past `offset` (JSON, for `ui.js`).

    Polled every second by each open page: it reads the run's status columns only
    (never its input or result), then the log chunks past `offset`.
    """
    found = state.queries.run_states(tenant=user.tenant, ids=[run_id])
    if not found:
        raise NotFoundError(f"no run {run_id}")
    run = found[0]  # the status first, then the output stored before it
    terminal = RunStatus(run.status).terminal
    data = svc.store.read_logs_since(run.id, offset, LIVE_LOG_BYTES)
    more = len(data) == LIVE_LOG_BYTES
    if not terminal or more:
        data = complete_utf8(data)
    return JSONResponse({
        "status": run.status, "terminal": terminal, "attempt": run.attempt,
        "max_attempts": run.max_attempts, "started_at": when(run.started_at),
        "error_code": run.error_code, "log": data.decode(errors="replace"),
        "next_offset": offset + len(data), "more": more,
        "log_truncated": run.log_truncated,
        "can_cancel": not terminal and not run.cancel_requested, "can_replay": terminal})


@router.get("/ui/runs/{run_id}/log")
def run_log(run_id: str, user: User, svc: Svc) -> Response:
    """The whole captured output as a text attachment, read a step at a time."""
    run = run_or_404(svc, run_id, user.tenant)

    def steps() -> Iterator[bytes]:
        position = 0
        while True:
            data = svc.store.read_logs_since(run.id, position, DOWNLOAD_STEP_BYTES)
            if not data:
                return
            position += len(data)
            yield data

    return StreamingResponse(steps(), media_type="text/plain; charset=utf-8", headers={
        "Content-Disposition": disposition(f"run-{run.id}.log"),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'"})


@router.get("/ui/runs/{run_id}/artifacts/{name:path}")
def run_artifact(run_id: str, name: Annotated[str, Path(max_length=1024)], user: User,
                 svc: Svc, attempt: Annotated[int | None, Query(ge=0, le=10_000)] = None,
                 range_: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
                 ) -> Response:
    """One artifact, with the API's attachment headers."""
    return artifact_response(svc, run_or_404(svc, run_id, user.tenant), name,
                             attempt=attempt, range_header=range_)


@router.get("/ui/files/{file_id}")
def file_content(file_id: Annotated[str, Path(max_length=80)], user: User,
                 svc: Svc) -> Response:
    """A file given to a run (the tenant's own files only)."""
    info = svc.files.get(user.tenant, file_id)
    read = svc.files.content(user.tenant, info.sha256, start=0, end=info.size) \
        if info.size else None
    return stored_response(read, size=info.size, media_type=info.media_type,
                           filename=info.name or info.sha256, part=None, sha256=info.sha256)


def _files_in(svc: Services, run: Run) -> list[dict[str, Any]]:
    found = []
    for name, file_id in sorted(run.files.items()):
        try:
            info: dict[str, Any] = svc.files.get(run.tenant, file_id).public()
        except RunnerError:  # a file removed since: still named by its id
            info = {"id": file_id, "size": None, "media_type": None}
        found.append({"name": name, **info})
    return found


@router.get("/ui/runs/{run_id}")
def run_page(request: Request, run_id: str, user: User, svc: Svc) -> Response:
    """Everything about one run."""
    run = run_or_404(svc, run_id, user.tenant)
    attempts = svc.store.attempts(run.id)
    by_attempt = svc.files.artifacts_by_attempt(run.id)
    receipts = [a["provenance"] for a in attempts if a["provenance"]]
    provenance = receipts[-1] if receipts else None
    processor = svc.manifests.current().find(run.processor, run.version)
    text, offset, skipped = _log_tail(svc, run)
    webhook = webhook_status(svc.store, run.id)
    return templates.TemplateResponse(request, "run.html", {
        "user": user, "nav": "runs", "run": run, "attempts": attempts,
        "artifacts": by_attempt.get(run.attempt, []),
        "older_artifacts": {n: a for n, a in sorted(by_attempt.items()) if n != run.attempt},
        "timeline": timeline(run.created_at, attempts, now=utcnow()),
        "provenance": provenance, "limits": limits_of(
            timeout_seconds=run.timeout_seconds, provenance=provenance,
            processor=processor),
        "files_in": _files_in(svc, run), "log_text": text, "log_offset": offset,
        "log_skipped": skipped,
        "webhook": webhook_of(vars(webhook) if webhook is not None else None),
        "cancel_requested": run.cancel_requested_at is not None,
        "queued": run.status is RunStatus.QUEUED, **_actions(run)})
