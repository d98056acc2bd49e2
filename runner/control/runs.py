"""Submitting runs: check against the manifest and input schema, insert, then enqueue."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import jsonschema
import referencing.exceptions
import structlog
from jsonschema.protocols import Validator

from runner.control.outbox import webhook_url_of
from runner.control.queue import RunQueue, tagged_queue
from runner.control.store import Store
from runner.control.strictjson import check_strict_json
from runner.control.webhooks import WebhookRules
from runner.domain import Artifact, NewRun, Priority, Run, utcnow
from runner.errors import (
    ConflictError,
    InvalidInputError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    UnknownProcessorError,
)
from runner.manifest import Manifest, Processor
from runner.manifest.inputschema import (
    INPUT_PATTERN_BUDGET_SECONDS,
    PatternTimeoutError,
    input_schema_validator,
    pattern_budget,
)

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
    # {name: file id}: delivered at /run/in/<name>.
    files: Mapping[str, str] = field(default_factory=dict)
    # Answer with an earlier succeeded run of the same image, input and files (no
    # container starts); `reuse_max_age` bounds how long ago it may have finished.
    reuse: bool = False
    reuse_max_age: float | None = None
    # Where the run's end is POSTed (runner/control/webhooks.py).
    webhook_url: str | None = None
    # The order among the tenant's own queued runs (tenants take turns regardless).
    priority: Priority = Priority.NORMAL

    def fingerprint(self) -> str:
        """A hash of what was asked for, to tell a true retry from a reused key."""
        body: dict[str, Any] = {
            "processor": self.processor, "version": self.version, "input": self.input,
            "timeout_seconds": self.timeout_seconds, "labels": dict(self.labels)}
        if self.files or self.reuse:  # runs without them keep their old fingerprints
            body.update(files=dict(self.files), reuse=self.reuse,
                        reuse_max_age=self.reuse_max_age)
        if self.webhook_url is not None:  # likewise
            body["webhook_url"] = self.webhook_url
        if self.priority is not Priority.NORMAL:  # likewise
            body["priority"] = self.priority.value
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def reuse_key(image: str, input_json: bytes, files: Mapping[str, str]) -> str:
    """What a run computes from, as one digest: the pinned image, the input as encoded
    (keys sorted) and each file's name and content hash."""
    body = {"image": image, "input": json.loads(input_json),
            "files": {name: files[name] for name in sorted(files)}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _json_path(path: Any) -> str:
    text = "input"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


# Validators of input schemas, one per (processor, version, manifest revision): built
# on the first submission of that revision, not on every one. A revision's entries are
# never edited (an edit is a new revision), and old revisions age out.
VALIDATOR_CACHE_SIZE = 256
_validators: OrderedDict[tuple[str, str, str], Validator] = OrderedDict()
_validators_lock = threading.Lock()


def input_validator(processor: Processor, revision: str | None) -> Validator:
    """The processor's input_schema validator, cached per manifest revision.

    Without a revision (a one-off check, e.g. `runner processor run`) it is built anew.
    """
    if revision is None:
        return input_schema_validator(processor.input_schema)
    key = (processor.name, processor.version, revision)
    with _validators_lock:
        found = _validators.get(key)
        if found is not None:
            _validators.move_to_end(key)
            return found
    built = input_schema_validator(processor.input_schema)
    with _validators_lock:
        found = _validators.setdefault(key, built)
        _validators.move_to_end(key)
        while len(_validators) > VALIDATOR_CACHE_SIZE:
            _validators.popitem(last=False)
    return found


def check_input(processor: Processor, value: object, *, max_bytes: int,
                revision: str | None = None) -> bytes:
    """The input as a run accepts it, encoded; the API, replay and `processor run` share it.

    Raises:
        InvalidRequestError: not a JSON object, not strict JSON (NaN, an infinity, an
            integer outside 64 bits: see runner/control/strictjson.py), or over the
            size cap; its field is `input`.
        InvalidInputError: it fails the processor's input_schema (path named), the
            schema's patterns ran out of their time budget, or the schema references
            something it does not hold.
    """
    if not isinstance(value, dict):
        raise InvalidRequestError("the input must be a JSON object", field="input")
    check_strict_json(value, "input")
    encoded = json.dumps(value, allow_nan=False).encode()
    if len(encoded) > max_bytes:
        raise InvalidRequestError(f"input is {len(encoded)} bytes, over the {max_bytes} "
                                  "byte cap", field="input")
    validator = input_validator(processor, revision)
    try:
        with pattern_budget(INPUT_PATTERN_BUDGET_SECONDS):
            error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except PatternTimeoutError as exc:
        raise InvalidInputError(f"input: {exc}; the input is refused", field="input") from None
    except referencing.exceptions.Unresolvable as exc:
        # The manifest refuses such a schema; this holds for one built any other way.
        raise InvalidInputError(
            f"input: the input_schema of {processor.name} {processor.version} has a $ref "
            f"that does not resolve ({exc}); nothing is fetched", field="input") from None
    if error is not None:
        where = _json_path(error.absolute_path)
        raise InvalidInputError(f"{where}: {error.message}", field=where)
    return encoded


class FileRules(Protocol):
    """How a submission's files are checked, and a reuse hit's artifacts found
    (`runner.control.files.RunFiles`)."""

    def check(self, tenant: str, files: Mapping[str, str], processor: Processor) -> None:
        """Raises: InvalidRequestError naming the file (`files.<name>`) and why."""

    def artifacts_of(self, run: Run) -> list[Artifact]:
        """The artifacts a run shows (its last attempt's)."""


@dataclass(frozen=True)
class Prepared:
    """A submission checked against the manifest, its schema and the rules: the run
    to record, and where its end is POSTed."""

    new: NewRun
    webhook_url: str | None


def prepare(submission: Submission, *, manifest: Manifest, store: Store, default_queue: str,
            input_max_bytes: int = 1024 * 1024, file_rules: FileRules | None = None,
            webhook_rules: WebhookRules = WebhookRules()) -> Prepared:
    """Check a submission and build the run it asks for (nothing is written).

    Raises: what `submit` raises, except QuotaExceededError and the idempotency
    conflict, which only recording can tell.
    """
    if submission.webhook_url is not None:
        webhook_rules.check(submission.webhook_url)
    processor = manifest.find(submission.processor, submission.version)
    if processor is None:
        wanted = submission.processor + (f" {submission.version}" if submission.version else "")
        raise UnknownProcessorError(f"no processor {wanted} in the manifest",
                                    field="version" if submission.version else "processor")
    encoded = check_input(processor, dict(submission.input), max_bytes=input_max_bytes,
                          revision=manifest.revision)
    limit = processor.limits.timeout_seconds
    if submission.timeout_seconds is not None and submission.timeout_seconds > limit:
        raise InvalidRequestError(
            f"timeout_seconds {submission.timeout_seconds} is above this processor's "
            f"limit of {limit:g}", field="timeout_seconds")
    files = dict(submission.files)
    if files:
        if file_rules is None:
            raise InvalidRequestError("files: this service takes no files", field="files")
        file_rules.check(submission.tenant, files, processor)
    key = reuse_key(processor.image, encoded, files)
    hit = None
    if submission.reuse and processor.reusable:
        not_before = (utcnow() - timedelta(seconds=submission.reuse_max_age)
                      if submission.reuse_max_age is not None else None)
        hit = store.find_reusable(tenant=submission.tenant, reuse_key=key,
                                  not_before=not_before)
    return Prepared(NewRun(
        tenant=submission.tenant, processor=processor.name, version=processor.version,
        image=processor.image,
        queue=tagged_queue(processor.queue or default_queue, processor.require),
        input=dict(submission.input), labels=dict(submission.labels),
        timeout_seconds=float(submission.timeout_seconds or limit),
        max_attempts=processor.retry.max_attempts, manifest_revision=manifest.revision,
        idempotency_key=submission.idempotency_key, request_hash=submission.fingerprint(),
        replay_of=submission.replay_of, traceparent=submission.traceparent,
        files=files, reuse_key=key,
        reused_from=(hit.reused_from or hit.id) if hit is not None else None,
        result=hit.result if hit is not None else None,
        artifacts=tuple(file_rules.artifacts_of(hit)) if hit is not None and file_rules
        else (), priority=submission.priority,
    ), submission.webhook_url)


def needs_queueing(run: Run, created: bool, *, quiet: bool = False) -> bool:
    """Whether a recorded run goes to the queue: new, and not a reuse hit (which is
    recorded already ended). Logs which it was, unless `quiet` (a batch logs once)."""
    if quiet:
        return created and run.reused_from is None
    if not created:
        log.info("run_submission_replayed", run_id=run.id, tenant=run.tenant)
        return False
    if run.reused_from is not None:
        log.info("run_reused", run_id=run.id, reused_from=run.reused_from,
                 processor=run.processor, tenant=run.tenant)
        return False
    log.info("run_submitted", run_id=run.id, processor=run.processor, version=run.version,
             tenant=run.tenant, replay_of=run.replay_of, status=run.status.value)
    return True


def submit(submission: Submission, *, manifest: Manifest, store: Store, queue: RunQueue,
           default_queue: str, stop_grace_seconds: float,
           input_max_bytes: int = 1024 * 1024, max_active: int = 0,
           file_rules: FileRules | None = None,
           webhook_rules: WebhookRules = WebhookRules()) -> Run:
    """Record a new queued run and hand its id to the queue.

    Raises:
        UnknownProcessorError: no such processor (or version) in the manifest.
        InvalidInputError: the input fails the processor's input_schema (path named).
        InvalidRequestError: input over its size cap or not strict JSON (field
            `input`), or timeout_seconds above the manifest's limit.
        InvalidRequestError: the idempotency key was used for a different request.
        InvalidRequestError: a file is refused (field `files.<name>`: its name, an
            unknown id, the processor's `accepts`, the caps).
        InvalidRequestError: the webhook_url is refused (field `webhook_url`: malformed,
            not under the operator's prefixes, or webhooks off: `webhook_rules`).
        QuotaExceededError: the tenant is at its cap of queued and running runs.
    """
    prepared = prepare(submission, manifest=manifest, store=store,
                       default_queue=default_queue, input_max_bytes=input_max_bytes,
                       file_rules=file_rules, webhook_rules=webhook_rules)
    run, created = store.create_run(prepared.new, max_active=max_active,
                                    webhook_url=prepared.webhook_url)
    if not needs_queueing(run, created):
        return run
    try:
        queue.enqueue(run, stop_grace_seconds=stop_grace_seconds)
    except ServiceUnavailableError as exc:
        # The run is recorded, and the database is the truth: the reconciler queues
        # it once Redis answers again. Nothing is lost and nothing runs twice.
        log.warning("enqueue_deferred", run_id=run.id, error=exc.message)
    return run


def replay(run_id: str, *, tenant: str | None, manifest: Manifest, store: Store,
           queue: RunQueue, default_queue: str, stop_grace_seconds: float,
           input_max_bytes: int = 1024 * 1024, max_active: int = 0,
           traceparent: str | None = None, file_rules: FileRules | None = None,
           webhook_rules: WebhookRules = WebhookRules()) -> Run:
    """A new run of an ended run's processor version and input, linked to it.

    It runs the image the manifest pins now, so a processor fixed and re-pinned after
    a dead letter can be replayed to success, with the same files (never a reuse: a
    replay is asked for to run again) and the same webhook_url (checked against
    today's `webhook_rules`, as a new submission's would be).

    Raises:
        NotFoundError: no such run for this tenant.
        ConflictError: the run has not ended yet.
        UnknownProcessorError: the manifest no longer has that processor version.
        InvalidRequestError, InvalidInputError: its input (or webhook_url) is refused
            today, as a new submission's would be (e.g. a NaN stored before inputs were
            strict JSON, a webhook_url no longer allowed).
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
                             replay_of=original.id, traceparent=traceparent,
                             files=original.files, priority=original.priority,
                             webhook_url=webhook_url_of(store, original.id)),
                  manifest=manifest, store=store, queue=queue, default_queue=default_queue,
                  stop_grace_seconds=stop_grace_seconds, input_max_bytes=input_max_bytes,
                  max_active=max_active, file_rules=file_rules, webhook_rules=webhook_rules)
