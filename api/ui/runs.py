"""`/ui/runs`: the tenant's runs, filtered, a page at a time, kept live.

The list is `Store.list_page` (the `/v1/runs` query: keyset pagination, the same
filters, the tenant's runs only). The page works as plain HTML (a filter form, a
"next page" link carrying the cursor); `ui.js` polls `/ui/runs/live` every two
seconds with the ids on the page and the newest one, and updates the rows' status
in place and, on the first page, adds the runs that appeared since.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from api.ui.access import State, Svc, User
from api.ui.security import UiRoute, templates
from api.ui.views import label_filters, timestamp
from runner.control.store import is_run_id
from runner.control.uiqueries import MAX_IDS, RunState
from runner.domain import Run, RunStatus
from runner.errors import InvalidRequestError

router = APIRouter(route_class=UiRoute)

PAGE_SIZE = 50
LIVE_NEW_MAX = 50


def _filters(status: str | None, processor: str | None, label: list[str] | None,
             created_after: str | None, created_before: str | None) -> dict[str, Any]:
    """The list's filters, checked (empty fields are no filter).

    Raises:
        InvalidRequestError: an unknown status, a bad label or date-time.
    """
    status = (status or "").strip() or None
    if status is not None and status not in {s.value for s in RunStatus}:
        raise InvalidRequestError(f"status: {status[:40]!r} is not a run status",
                                  field="status")
    processor = (processor or "").strip() or None
    if processor is not None and (len(processor) > 64 or "\x00" in processor):
        raise InvalidRequestError("processor: not a processor name", field="processor")
    return {"status": status, "processor": processor, "labels": label_filters(label or []),
            "created_after": timestamp(created_after, "created_after"),
            "created_before": timestamp(created_before, "created_before")}


def _state_of(run: Run) -> RunState:
    return RunState(id=run.id, status=run.status.value, processor=run.processor,
                    version=run.version, attempt=run.attempt, max_attempts=run.max_attempts,
                    labels=run.labels, error_code=run.error_code, created_at=run.created_at,
                    started_at=run.started_at, finished_at=run.finished_at)


LabelQuery = Annotated[list[str] | None, Query(max_length=8)]
Text = Annotated[str | None, Query(max_length=80)]


@router.get("/ui/runs/live")
def runs_live(user: User, svc: Svc, state: State,
              ids: Annotated[str, Query(max_length=MAX_IDS * 37)] = "",
              newest: Annotated[str, Query(max_length=40)] = "",
              status: Text = None, processor: Text = None, label: LabelQuery = None,
              created_after: Text = None, created_before: Text = None) -> Response:
    """What changed for the list: the current state of the runs on the page, and
    (given `newest`, the first row's id) the runs that match the filters and are newer."""
    wanted = [i for i in ids.split(",") if is_run_id(i)][:MAX_IDS]
    states = state.queries.run_states(tenant=user.tenant, ids=wanted)
    fresh: list[RunState] = []
    if newest == "" or is_run_id(newest):
        page = svc.store.list_page(tenant=user.tenant, limit=LIVE_NEW_MAX,
                                   **_filters(status, processor, label, created_after,
                                              created_before))
        fresh = [_state_of(r) for r in page.runs if newest == "" or r.id > newest]
    return JSONResponse({"runs": [s.public() for s in states],
                         "new": [s.public() for s in fresh]})


@router.get("/ui/runs")
def runs_page(request: Request, user: User, svc: Svc,
              status: Text = None, processor: Text = None, label: LabelQuery = None,
              created_after: Text = None, created_before: Text = None,
              cursor: Annotated[str | None, Query(max_length=200)] = None) -> Response:
    """A page of the tenant's runs, newest first."""
    form = {"status": status or "", "processor": processor or "",
            "label": (label or [""])[0], "created_after": created_after or "",
            "created_before": created_before or ""}
    processors = sorted({p.name for p in svc.manifests.current().processors})
    context: dict[str, Any] = {"user": user, "nav": "runs", "form": form,
                               "processors": processors, "first_page": not cursor}
    try:
        filters = _filters(status, processor, label, created_after, created_before)
        page = svc.store.list_page(tenant=user.tenant, limit=PAGE_SIZE, cursor=cursor or None,
                                   **filters)
    except InvalidRequestError as exc:
        return templates.TemplateResponse(request, "runs.html", {
            **context, "runs": [], "error": exc.message, "next_url": None,
            "live_query": ""}, status_code=422)
    kept = [(k, v) for k, v in (("status", status), ("processor", processor),
                                ("created_after", created_after),
                                ("created_before", created_before)) if v]
    kept += [("label", f"{k}={v}") for k, v in filters["labels"].items()]
    next_url = (f"/ui/runs?{urlencode([*kept, ('cursor', page.next_cursor)])}"
                if page.next_cursor else None)
    return templates.TemplateResponse(request, "runs.html", {
        **context, "runs": page.runs, "error": None, "next_url": next_url,
        "live_query": urlencode(kept)})
