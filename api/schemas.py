"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from runner.control.runs import Submission
from runner.domain import Priority, Run, RunStatus
from runner.units import parse_duration

MAX_LABELS = 32
LabelKey = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(max_length=256)]
MAX_RUN_FILES = 1000  # the schema's bound; RUNNER_RUN_MAX_FILES is the service's
FileName = Annotated[str, StringConstraints(max_length=128)]
FileId = Annotated[str, StringConstraints(max_length=71)]
Duration = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(ms|s|m|h|d)$")]


class ReuseOptions(BaseModel):
    """`"reuse": {"max_age": "1h"}`: reuse only a run that finished this recently."""

    model_config = ConfigDict(extra="forbid")

    max_age: Duration | None = Field(default=None, description="e.g. 90s, 30m, 1h, 7d")


class RunCreate(BaseModel):
    """A submission. Unknown fields are refused, so nothing else can be set."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"processor": "echo", "version": "1.0.0", "input": {"message": "hi"},
                      "timeout_seconds": 30, "labels": {"team": "data"}}]})

    processor: str = Field(min_length=1, max_length=64)
    version: str | None = Field(default=None, min_length=1, max_length=64)
    input: dict[str, Any] = Field(default_factory=dict)
    timeout_seconds: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    files: dict[FileName, FileId] = Field(
        default_factory=dict, max_length=MAX_RUN_FILES,
        description="{name: file id}: each file (POST /v1/files) at /run/in/<name>, "
                    "read-only; a name is 1-128 of A-Za-z0-9._- not starting with a dot")
    reuse: StrictBool | ReuseOptions = Field(
        default=False,
        description="true: answer with a new run pointing to (reused_from) the tenant's "
                    "latest succeeded run of the same image digest, input and files, "
                    "without running a container; {\"max_age\": \"1h\"} bounds its age")
    webhook_url: str | None = Field(
        default=None, min_length=1, max_length=2048,
        description="POST {\"event\": \"run.finished\", \"run\": ...} here, signed, when "
                    "the run ends; must be under one of the operator's "
                    "RUNNER_WEBHOOK_ALLOWED_URLS prefixes (http or https, no user:pass@, "
                    "no #fragment)")
    priority: Priority = Field(
        default=Priority.NORMAL,
        description="high, normal or low: the order among this tenant's own queued runs "
                    "(tenants take turns whatever their runs' priorities)")


    def submission(self, tenant: str, *, idempotency_key: str | None,
                   traceparent: str | None) -> Submission:
        """What this body asks the control layer for, on behalf of `tenant`."""
        max_age = (parse_duration(self.reuse.max_age)
                   if isinstance(self.reuse, ReuseOptions) and self.reuse.max_age else None)
        return Submission(tenant=tenant, processor=self.processor, version=self.version,
                          input=self.input, timeout_seconds=self.timeout_seconds,
                          labels=self.labels, idempotency_key=idempotency_key,
                          traceparent=traceparent, files=self.files,
                          reuse=self.reuse is not False, reuse_max_age=max_age,
                          webhook_url=self.webhook_url, priority=self.priority)


class ArtifactOut(BaseModel):
    name: str = Field(description="Path under /run/out; subdirectories are joined by /")
    size: int
    sha256: str
    media_type: str = Field(description="Sniffed from the bytes")


class ArtifactList(BaseModel):
    attempt: int
    items: list[ArtifactOut]


class FileOut(BaseModel):
    id: str = Field(description="sha256:<64 hex> of the bytes")
    size: int
    media_type: str = Field(description="Sniffed from the bytes")
    declared_media_type: str | None = Field(default=None,
                                            description="The Content-Type of the upload")
    name: str | None
    created_at: datetime


class AttemptOut(BaseModel):
    number: int
    worker_id: str
    host_id: str | None = Field(default=None,
                                description="RUNNER_HOST_ID of the worker host that ran it")
    status: str
    container_id: str | None
    image_id: str | None
    exit_code: int | None
    error_code: str | None
    error_message: str | None
    error_stage: str | None
    log_bytes: int
    started_at: datetime
    finished_at: datetime | None
    provenance: dict[str, Any] | None = Field(
        default=None, description="What this attempt's container was asked for and what "
                                  "the engine reports it applied")
    artifacts: list[ArtifactOut] = Field(default_factory=list,
                                         description="What this attempt left in /run/out")


class WebhookOut(BaseModel):
    """A run's webhook and how its delivery goes."""

    url: str
    state: Literal["waiting", "pending", "delivered", "failed"] = Field(
        description="waiting (the run has not ended), pending (being sent or retried), "
                    "delivered, failed (no 2xx in time)")
    attempts: int = Field(description="POSTs made so far")
    last_status_code: int | None = Field(description="The last attempt's HTTP status; "
                                                     "null when it got no answer")
    last_error: str | None = Field(description="Why the last attempt did not deliver")
    next_attempt_at: datetime | None = Field(description="When a pending delivery is "
                                                         "tried next")
    delivered_at: datetime | None


class RunOut(BaseModel):
    id: str
    status: RunStatus
    processor: str
    version: str
    image: str
    input: Any
    result: Any
    exit_code: int | None
    error_code: str | None
    error_message: str | None
    attempt: int
    max_attempts: int
    labels: dict[str, str]
    timeout_seconds: float
    log_bytes: int
    log_truncated: bool
    manifest_revision: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None = Field(
        default=None, description="When a queued run waiting out a retry backoff may start")
    error_stage: str | None = Field(
        default=None, description="Where the last attempt failed: launch, pull, create, "
                                  "start, run, collect, lease, shutdown, queue")
    cancel_requested: bool = False
    replay_of: str | None = None
    files: dict[str, str] = Field(default_factory=dict,
                                  description="{name: file id} delivered at /run/in")
    artifacts: list[ArtifactOut] | None = Field(
        default=None, description="The last attempt's artifacts (null in lists; "
                                  "GET /v1/runs/{id} has them)")
    reused_from: str | None = Field(
        default=None, description="The succeeded run whose result and artifacts this "
                                  "run reuses; no container ran for it")
    priority: Priority = Field(default=Priority.NORMAL,
                               description="The order among the tenant's own queued runs")
    attempts: list[AttemptOut] | None = Field(
        default=None, description="Every attempt (on GET /v1/runs/{id} only)")
    last_log_lines: list[str] | None = Field(
        default=None, description="The tail of the logs, for dead letters (on GET only)")
    provenance: dict[str, Any] | None = Field(
        default=None,
        description="Receipt of the latest attempt that made a container (on GET only): "
                    "manifest revision, pinned digest, image id started, and the limits "
                    "and security settings the engine reports it applied")
    webhook: WebhookOut | None = Field(
        default=None, description="The run's webhook_url and its delivery (null without "
                                  "one, and in lists)")

    @classmethod
    def of(cls, run: Run, **extra: Any) -> Self:
        extra.setdefault("artifacts", [a.public() for a in run.artifacts])
        return cls(
            next_attempt_at=run.next_attempt_at if run.status is RunStatus.QUEUED else None,
            error_stage=run.error_stage, cancel_requested=run.cancel_requested_at is not None,
            replay_of=run.replay_of, files=run.files, reused_from=run.reused_from,
            priority=run.priority, **extra,
            id=run.id, status=run.status, processor=run.processor, version=run.version,
            image=run.image, input=run.input, result=run.result, exit_code=run.exit_code,
            error_code=run.error_code, error_message=run.error_message, attempt=run.attempt,
            max_attempts=run.max_attempts, labels=run.labels,
            timeout_seconds=run.timeout_seconds, log_bytes=run.log_bytes,
            log_truncated=run.log_truncated, manifest_revision=run.manifest_revision,
            created_at=run.created_at, started_at=run.started_at, finished_at=run.finished_at,
        )


class RunListItem(RunOut):
    """A run in a list: `input` and `result` are null unless asked for with `?include=`,
    or when over the list's cap; `omitted` then names them."""

    omitted: list[str] = Field(
        default_factory=list,
        description="The values left out of this item (null here): `input` and `result` "
                    "unless `include` asks for them, and any asked for that is over "
                    "64 KiB as stored. GET /v1/runs/{id} has them whole")


class RunList(BaseModel):
    items: list[RunListItem]
    next_cursor: str | None


class LimitsOut(BaseModel):
    cpus: float
    memory_bytes: int
    pids: int
    timeout_seconds: float
    log_bytes: int
    output_bytes: int


class ProcessorOut(BaseModel):
    name: str
    version: str
    image: str
    description: str
    limits: LimitsOut
    max_attempts: int
    max_concurrency: int | None
    input_schema: dict[str, Any]
    accepts: dict[str, Any] = Field(description="The files it takes: media types, caps")
    reusable: bool = True
    require: list[str] = Field(default_factory=list,
                               description="Host tags a worker host needs to run it")


class ProcessorList(BaseModel):
    items: list[ProcessorOut]
    manifest_revision: str


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
