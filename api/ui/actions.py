"""The dashboard's state-changing posts: cancel, replay, replay many.

Each is a plain form post carrying the session's CSRF token (`access.checked_form`:
without it, or with another, 403 and nothing changes) and needs the submitter role
(a viewer's post is refused, 403, even with a good token; its pages show no such
buttons). They call what the `/v1` routes call (`Lifecycle.cancel`,
`runner.control.runs.replay`), with the tenant's submission limit, so the dashboard
can do nothing the API would refuse.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from opentelemetry import trace

from api.deps import Services
from api.ui.access import Form, Svc, UiUser, User, require_actor
from api.ui.security import UiRoute, templates
from runner.control.runs import replay
from runner.control.store import is_run_id
from runner.domain import Run
from runner.errors import InvalidRequestError, NotFoundError, RunnerError
from runner.observability.telemetry import traceparent

log = structlog.get_logger(__name__)

router = APIRouter(route_class=UiRoute)

BULK_MAX = 1000  # runs one bulk replay may name


def _replay(svc: Services, request: Request, user: UiUser, run_id: str) -> Run:
    """Raises: what `runner.control.runs.replay` raises, or RateLimitedError."""
    if not is_run_id(run_id):
        raise NotFoundError("no such run: not a run id")
    svc.count_submission(user.tenant)
    run = replay(run_id, tenant=user.tenant, manifest=svc.manifests.current(),
                 store=svc.store, queue=svc.queue, **svc.submit_options(),
                 traceparent=traceparent(trace.get_current_span()))
    request.app.state.metrics.submitted.labels(run.processor).inc()
    log.info("ui_replayed", run_id=run_id, replay_id=run.id, key_id=user.principal.key_id)
    return run


@router.post("/ui/runs/{run_id}/cancel")
def cancel(run_id: str, user: User, _form: Form, svc: Svc) -> Response:
    """Cancel the run, then back to its page (which shows the cancel in progress)."""
    require_actor(user)
    if not is_run_id(run_id):
        raise NotFoundError("no such run: not a run id")
    svc.lifecycle.cancel(run_id, tenant=user.tenant)
    log.info("ui_canceled", run_id=run_id, key_id=user.principal.key_id)
    return RedirectResponse(f"/ui/runs/{run_id}", status_code=303)


@router.post("/ui/runs/{run_id}/replay")
def replay_one(request: Request, run_id: str, user: User, _form: Form, svc: Svc) -> Response:
    """Replay an ended run, then to the new run's page."""
    require_actor(user)
    made = _replay(svc, request, user, run_id)
    return RedirectResponse(f"/ui/runs/{made.id}", status_code=303)


@router.post("/ui/dead-letters/replay")
def replay_many(request: Request, user: User, form: Form, svc: Svc) -> Response:
    """Replay every dead letter ticked (each on its own: one refused does not stop
    the others), then a page saying what became of each."""
    require_actor(user)
    ids = list(dict.fromkeys(form.get("run", [])))
    if not ids:
        raise InvalidRequestError("tick at least one dead letter to replay")
    if len(ids) > BULK_MAX:
        raise InvalidRequestError(f"at most {BULK_MAX} runs at once")
    outcomes: list[dict[str, Any]] = []
    for run_id in ids:
        try:
            made = _replay(svc, request, user, run_id)
            outcomes.append({"id": run_id, "replay": made.id, "error": None})
        except RunnerError as exc:
            outcomes.append({"id": run_id, "replay": None, "error": exc.message})
    return templates.TemplateResponse(request, "replayed.html", {
        "user": user, "nav": "dead-letters", "outcomes": outcomes})
