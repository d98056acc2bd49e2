"""`POST /v1/runs/batch`: up to RUNNER_BATCH_MAX_ITEMS runs in one request.

Each item is the body of `POST /v1/runs` plus its own `idempotency_key`, checked on
its own: an invalid item gets its error in its place and the valid ones are
accepted (runner/control/batches.py records them in one transaction and queues
them in one Redis pipeline). The answer is built and serialized once, straight to
JSON: a batch of 1,000 run objects is most of the request's work otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from opentelemetry import trace
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from api.auth import Principal, submitter
from api.deps import Services, services
from api.errors import field_of
from api.routes import ERROR_RESPONSES, StrictJsonRoute
from api.schemas import ErrorOut, RunCreate, RunOut, WebhookOut
from runner.control.batches import ItemResult, submit_batch
from runner.control.outbox import WAITING, WebhookStatus, webhook_status
from runner.control.runs import Submission
from runner.domain import Run
from runner.errors import InvalidRequestError, RunnerError
from runner.observability.telemetry import traceparent

router = APIRouter(prefix="/v1", route_class=StrictJsonRoute, responses=ERROR_RESPONSES)

CONTRACT_MAX_ITEMS = 1000


class BatchItem(RunCreate):
    """One run of a batch: the body of POST /v1/runs, with its own idempotency key."""

    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="The same key with the same item returns the same run (in this "
                    "batch, a later one, or a single POST's Idempotency-Key)")


class BatchCreate(BaseModel):
    """What POST /v1/runs/batch takes. An item that is not a valid BatchItem is
    answered with its own error, in its place; it does not refuse the batch."""

    runs: list[Annotated[BatchItem | Any, Field(union_mode="left_to_right")]] = (
        Field(min_length=1, max_length=CONTRACT_MAX_ITEMS,
              description="1 to RUNNER_BATCH_MAX_ITEMS (at most 1000) runs"))


class ItemErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ItemError(BaseModel):
    error: ItemErrorBody


class BatchOut(BaseModel):
    items: list[RunOut | ItemError] = Field(
        description="One per submitted item, in order: its run, or why it was refused")


_ITEM = TypeAdapter(BatchItem)


def _invalid_item(body: Any) -> RunnerError:
    """Why `body` is not a BatchItem, as the single POST's 422 would say it."""
    if not isinstance(body, dict):
        return InvalidRequestError("an item must be a JSON object: the body of POST /v1/runs")
    try:
        _ITEM.validate_python(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = field_of(first.get("loc", ()))
        detail = "unknown field" if first.get("type") == "extra_forbidden" else first["msg"]
        return InvalidRequestError(f"{field}: {detail}", field=field)
    return InvalidRequestError("not a valid run")  # unreachable: the union tried it first


def _submission(item: BatchItem, tenant: str, parent: str | None) -> Submission:
    return item.submission(tenant, idempotency_key=item.idempotency_key, traceparent=parent)


def _item_json(result: ItemResult, webhook: WebhookOut | None) -> RunOut | ItemError:
    if isinstance(result, RunnerError):
        return ItemError(error=ItemErrorBody(code=result.code, message=result.message,
                                             field=result.context.get("field")))
    return RunOut.of(result, webhook=webhook)


@router.post("/runs/batch", tags=["runs"], status_code=202, response_model=BatchOut,
             responses={422: {"model": ErrorOut, "description": "Not a batch: no `runs` "
                                                               "list, or over the cap"}})
def create_runs(body: BatchCreate, who: Annotated[Principal, Depends(submitter)],
                svc: Annotated[Services, Depends(services)], request: Request) -> Response:
    """Submit 1 to 1,000 runs at once; answers with each item's run or error, in order.

    Valid items are accepted even when others are not; their records are written in
    one transaction. Quotas and rate limits count items. Items carrying an
    `idempotency_key` return the same runs when the batch is sent again."""
    cap = svc.settings.batch_max_items
    if len(body.runs) > cap:
        raise InvalidRequestError(f"runs: {len(body.runs)} items, over this service's cap "
                                  f"of {cap} (RUNNER_BATCH_MAX_ITEMS)", field="runs")
    parent = traceparent(trace.get_current_span())
    items = [_submission(i, who.tenant, parent) if isinstance(i, BatchItem)
             else _invalid_item(i) for i in body.runs]
    urls = {i: item.webhook_url for i, item in enumerate(items)
            if isinstance(item, Submission) and item.webhook_url}
    results = submit_batch(items, admit=lambda n: svc.admit_submissions(who.tenant, n),
                           manifest=svc.manifests.current(), store=svc.store,
                           queue=svc.queue, retry_after=svc.limiter.retry_after(60),
                           **svc.submit_options())
    metrics = request.app.state.metrics
    out: list[RunOut | ItemError] = []
    for index, result in enumerate(results):
        webhook = None
        if isinstance(result, Run):
            metrics.submitted.labels(result.processor).inc()
            if result.reused_from is not None:
                metrics.reused.labels(result.processor).inc()
            if index in urls:
                webhook = _webhook_of(svc, result, urls[index])
        out.append(_item_json(result, webhook))
    return Response(BatchOut(items=out).model_dump_json(), status_code=202,
                    media_type="application/json")


def _webhook_of(svc: Services, run: Run, url: str) -> WebhookOut:
    """A new queued run's webhook is waiting, with no query; any other (a reuse hit,
    an idempotent repeat) is read."""
    found = None
    if run.attempt == 0 and run.reused_from is None and run.status.value == "queued":
        found = WebhookStatus(url=url, state=WAITING)
    else:
        found = webhook_status(svc.store, run.id) or WebhookStatus(url=url, state=WAITING)
    return WebhookOut(**vars(found))
