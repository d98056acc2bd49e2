"""Submitting runs: check against the manifest and input schema, insert, then enqueue."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import structlog

from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.domain import NewRun, Run
from runner.errors import (
    ConflictError,
    InvalidInputError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    UnknownProcessorError,
)
from runner.manifest import Manifest, Processor

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Submission:
    tenant: str
    processor: str
    version: str | None
    input: Mapping[str, Any]
    timeout_seconds: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    replay_of: str | None = None
    # The submitting request's trace context (not part of the fingerprint).
    traceparent: str | None = None

    def fingerprint(self) -> str:
        """A hash of what was asked for, to tell a true retry from a reused key."""
        body = {"processor": self.processor, "version": self.version, "input": self.input,
                "timeout_seconds": self.timeout_seconds, "labels": dict(self.labels)}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _json_path(path: Any) -> str:
    text = "input"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def check_input(processor: Processor, value: object, *, max_bytes: int) -> bytes:
    """The input as a run accepts it, encoded; the API and `processor run` share it.

    Raises:
        InvalidRequestError: not a JSON object, or over the size cap.
        InvalidInputError: it fails the processor's input_schema (path named).
    """
    if not isinstance(value, dict):
        raise InvalidRequestError("the input must be a JSON object", field="input")
    encoded = json.dumps(value).encode()
    if len(encoded) > max_bytes:
        raise InvalidRequestError(f"input is {len(encoded)} bytes, over the {max_bytes} "
                                  "byte cap", field="input")
    validator = jsonschema.Draft202012Validator(processor.input_schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        where = _json_path(error.absolute_path)
        raise InvalidInputError(f"{where}: {error.message}", field=where)
    return encoded


def submit(submission: Submission, *, manifest: Manifest, store: Store, queue: RunQueue,
           default_queue: str, stop_grace_seconds: float,
           input_max_bytes: int = 1024 * 1024, max_active: int = 0) -> Run:
    """Record a new queued run and hand its id to the queue.

    Raises:
        UnknownProcessorError: no such processor (or version) in the manifest.
        InvalidInputError: the input fails the processor's input_schema (path named).
        InvalidRequestError: input over its size cap, or timeout_seconds above the
            manifest's limit.
        InvalidRequestError: the idempotency key was used for a different request.
        QuotaExceededError: the tenant is at its cap of queued and running runs.
    """
    processor = manifest.find(submission.processor, submission.version)
    if processor is None:
        wanted = submission.processor + (f" {submission.version}" if submission.version else "")
        raise UnknownProcessorError(f"no processor {wanted} in the manifest",
                                    field="version" if submission.version else "processor")
    check_input(processor, dict(submission.input), max_bytes=input_max_bytes)
    limit = processor.limits.timeout_seconds
    if submission.timeout_seconds is not None and submission.timeout_seconds > limit:
        raise InvalidRequestError(
            f"timeout_seconds {submission.timeout_seconds} is above this processor's "
            f"limit of {limit:g}", field="timeout_seconds")
    run, created = store.create_run(NewRun(
        tenant=submission.tenant, processor=processor.name, version=processor.version,
        image=processor.image, queue=processor.queue or default_queue,
        input=dict(submission.input), labels=dict(submission.labels),
        timeout_seconds=float(submission.timeout_seconds or limit),
        max_attempts=processor.retry.max_attempts, manifest_revision=manifest.revision,
        idempotency_key=submission.idempotency_key, request_hash=submission.fingerprint(),
        replay_of=submission.replay_of, traceparent=submission.traceparent,
    ), max_active=max_active)
    if not created:
        log.info("run_submission_replayed", run_id=run.id, tenant=run.tenant)
        return run
    try:
        queue.enqueue(run, stop_grace_seconds=stop_grace_seconds)
    except ServiceUnavailableError as exc:
        # The run is recorded, and the database is the truth: the reconciler queues
        # it once Redis answers again. Nothing is lost and nothing runs twice.
        log.warning("enqueue_deferred", run_id=run.id, error=exc.message)
    log.info("run_submitted", run_id=run.id, processor=run.processor, version=run.version,
             tenant=run.tenant, replay_of=run.replay_of, status=run.status.value)
    return run


def replay(run_id: str, *, tenant: str | None, manifest: Manifest, store: Store,
           queue: RunQueue, default_queue: str, stop_grace_seconds: float,
           input_max_bytes: int = 1024 * 1024, max_active: int = 0,
           traceparent: str | None = None) -> Run:
    """A new run of an ended run's processor version and input, linked to it.

    It runs the image the manifest pins now, so a processor fixed and re-pinned after
    a dead letter can be replayed to success.

    Raises:
        NotFoundError: no such run for this tenant.
        ConflictError: the run has not ended yet.
        UnknownProcessorError: the manifest no longer has that processor version.
    """
    original = store.get_run(run_id, tenant=tenant)
    if original is None:
        raise NotFoundError(f"no run {run_id}")
    if not original.status.terminal:
        raise ConflictError(f"run {run_id} is still {original.status}; only ended runs "
                            "can be replayed", status=original.status)
    processor = manifest.find(original.processor, original.version)
    timeout = None
    if processor is not None:  # keep the original timeout, within today's limit
        timeout = int(min(original.timeout_seconds, processor.limits.timeout_seconds)) or None
    return submit(Submission(tenant=original.tenant, processor=original.processor,
                             version=original.version, input=original.input,
                             timeout_seconds=timeout, labels=original.labels,
                             replay_of=original.id, traceparent=traceparent),
                  manifest=manifest, store=store, queue=queue, default_queue=default_queue,
                  stop_grace_seconds=stop_grace_seconds, input_max_bytes=input_max_bytes,
                  max_active=max_active)
