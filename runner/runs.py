"""Submitting runs: check against the manifest and input schema, insert, then enqueue."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import structlog

from runner.domain import ErrorCode, RunStatus
from runner.errors import (
    InvalidInputError,
    InvalidRequestError,
    ServiceUnavailableError,
    UnknownProcessorError,
)
from runner.manifest import Manifest
from runner.queue import RunQueue
from runner.store import Finish, NewRun, Run, Store

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Submission:
    tenant: str
    processor: str
    version: str | None
    input: Mapping[str, Any]
    timeout_seconds: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


def _json_path(path: Any) -> str:
    text = "input"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def submit(submission: Submission, *, manifest: Manifest, store: Store, queue: RunQueue,
           default_queue: str, stop_grace_seconds: float,
           input_max_bytes: int = 1024 * 1024) -> Run:
    """Record a new queued run and hand its id to the queue.

    Raises:
        UnknownProcessorError: no such processor (or version) in the manifest.
        InvalidInputError: the input fails the processor's input_schema (path named).
        InvalidRequestError: input over its size cap, or timeout_seconds above the
            manifest's limit.
        ServiceUnavailableError: the queue is down; the run is ended, not left dangling.
    """
    processor = manifest.find(submission.processor, submission.version)
    if processor is None:
        wanted = submission.processor + (f" {submission.version}" if submission.version else "")
        raise UnknownProcessorError(f"no processor {wanted} in the manifest",
                                    field="version" if submission.version else "processor")
    size = len(json.dumps(dict(submission.input)).encode())
    if size > input_max_bytes:
        raise InvalidRequestError(f"input is {size} bytes, over the {input_max_bytes} byte cap",
                                  field="input")
    validator = jsonschema.Draft202012Validator(processor.input_schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(dict(submission.input)))
    if error is not None:
        where = _json_path(error.absolute_path)
        raise InvalidInputError(f"{where}: {error.message}", field=where)
    limit = processor.limits.timeout_seconds
    if submission.timeout_seconds is not None and submission.timeout_seconds > limit:
        raise InvalidRequestError(
            f"timeout_seconds {submission.timeout_seconds} is above this processor's "
            f"limit of {limit:g}", field="timeout_seconds")
    run = store.create_run(NewRun(
        tenant=submission.tenant, processor=processor.name, version=processor.version,
        image=processor.image, queue=processor.queue or default_queue,
        input=dict(submission.input), labels=dict(submission.labels),
        timeout_seconds=float(submission.timeout_seconds or limit),
        max_attempts=processor.retry.max_attempts, manifest_revision=manifest.revision,
    ))
    try:
        queue.enqueue(run, stop_grace_seconds=stop_grace_seconds)
    except ServiceUnavailableError:
        # Nothing may wait forever on a queue that never heard of it: end the run so a
        # retried submission cannot make a second one execute.
        claimed = store.claim(run.id, worker_id="api")
        if claimed is not None:
            store.finish(run.id, claimed.attempt, Finish(
                RunStatus.DEAD_LETTER, error_code=ErrorCode.INTERNAL_ERROR,
                error_message="the queue was unavailable at submission"))
        raise
    log.info("run_submitted", run_id=run.id, processor=run.processor, version=run.version,
             tenant=run.tenant)
    return run
