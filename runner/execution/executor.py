"""Execute one attempt of one run, top to bottom: the one place joining the ledger
(the control layer), the manifest and the sandbox.

`Executor.execute` reads the run and claims the attempt (only one claim wins);
`_run_claimed` starts the guard (lease, cancel) and turns crashes into the right
ending; `_attempt` re-checks the allowlist at launch, builds the container spec and
runs it; `classify` names how it ended; `_record` applies the retry policy and
writes the end, fenced by the attempt number, riding out a database outage, with
what the attempt has not written yet (its last output and its container record: for
a short run, all of it), so an attempt is three transactions: read, claim, end. Every
read and write of the run goes through `RunLedger`; run-end notices and other
listeners fire inside the ledger's finish, never from here.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from opentelemetry import trace

from runner.control.lifecycle import AttemptTail, ClaimStatus
from runner.control.retry import decide
from runner.domain import ErrorCode, Finish, Run, RunStatus, utcnow
from runner.errors import SandboxError, ServiceUnavailableError
from runner.execution.classify import classify, kept_artifacts
from runner.execution.guard import FENCE_MARGIN_SECONDS, AttemptGuard, LogWriter, fence_after
from runner.execution.ports import FaultHook, FilesPort, RunLedger, SandboxPort, no_fault
from runner.manifest import ManifestSource, Processor, RetryPolicy
from runner.observability.metrics import WorkerMetrics
from runner.observability.telemetry import AttemptStages, context_from, trace_id
from runner.sandbox import HOST_LABEL, WORKER_LABEL, InputFile, spec_for

log = structlog.get_logger(__name__)

RECORD_RETRY_SECONDS = 120  # how long a finished attempt waits out a database outage


class TailLedger(RunLedger, Protocol):
    """A `RunLedger` whose `finish` also writes the attempt's tail (its last output and
    container record) in the end's transaction, as `runner.control.ledger.Ledger` does."""

    def finish(self, run_id: str, attempt: int, outcome: Finish, *,
               only_if_lease_expired: bool = False, tail: AttemptTail | None = None
               ) -> bool: ...


@dataclass
class Executor:
    ledger: TailLedger
    manifests: ManifestSource
    sandbox: SandboxPort
    worker_id: str
    lease_seconds: float = 15.0
    heartbeat_seconds: float = 1.0
    stop_grace_seconds: float = 5.0
    fault: FaultHook = no_fault  # tests only: tests/support/faults.py
    tracer: trace.Tracer = field(default_factory=trace.NoOpTracer)
    metrics: WorkerMetrics | None = None
    files: FilesPort | None = None  # None: a run with files fails to launch
    host_id: str = ""  # RUNNER_HOST_ID: on the container's labels and the attempt

    def __post_init__(self) -> None:
        if fence_after(self.lease_seconds, self.stop_grace_seconds) <= self.heartbeat_seconds:
            raise ValueError(
                f"a lease of {self.lease_seconds:g}s leaves no time to self-fence: it must "
                f"exceed the stop grace ({self.stop_grace_seconds:g}s) + "
                f"{FENCE_MARGIN_SECONDS:g}s + a heartbeat ({self.heartbeat_seconds:g}s)")

    def execute(self, run_id: str, attempt: int, *,
                dequeued_at: float | None = None) -> RunStatus | None:
        """Run attempt `attempt` of `run_id`; the status recorded, or None if not ours.

        `dequeued_at` (time.monotonic) is when the queue handed the job over; the
        time from there to the container create call is the queue overhead.
        """
        dequeued_at = dequeued_at if dequeued_at is not None else time.monotonic()
        self.fault("before_claim")
        queued = self.ledger.get_run(run_id)
        if queued is None:
            return None
        # The attempt continues the trace of the request that submitted the run.
        parent = context_from({"traceparent": queued.traceparent}
                              if queued.traceparent else None)
        with self.tracer.start_as_current_span(
                "run.attempt", context=parent, kind=trace.SpanKind.CONSUMER,
                attributes={"runner.run_id": run_id, "runner.attempt": attempt,
                            "runner.processor": queued.processor,
                            "runner.worker_id": self.worker_id}) as span:
            context = {"run_id": run_id, "attempt": attempt}
            if (tid := trace_id(span)) is not None:
                context["trace_id"] = tid
            with structlog.contextvars.bound_contextvars(**context):
                status = self._execute(queued, attempt, dequeued_at)
            span.set_attribute("runner.status", status.value if status else "not_claimed")
            return status

    def _execute(self, queued: Run, attempt: int, dequeued_at: float) -> RunStatus | None:
        run_id = queued.id
        manifest = self.manifests.current()  # the one this attempt is checked against
        processor = manifest.find(queued.processor, queued.version)
        with self.tracer.start_as_current_span("claim") as claim_span:
            claim = self.ledger.claim(
                run_id, attempt=attempt, worker_id=self.worker_id,
                lease_seconds=self.lease_seconds,
                max_concurrency=processor.max_concurrency if processor else None,
                known=queued, host_id=self.host_id or None)
            claim_span.set_attribute("runner.claim", claim.status.value)
        if claim.status is not ClaimStatus.CLAIMED or claim.run is None:
            # Not due, at capacity, or someone else's: the reconciler queues it again
            # when it is due, so dropping this job loses nothing.
            log.info("run_not_claimed", run_id=run_id, attempt=attempt, reason=claim.status)
            return None
        run = claim.run
        self.fault("after_claim")
        bound = log.bind(run_id=run.id, attempt=run.attempt, worker_id=self.worker_id)
        waited = (run.started_at or utcnow()) - max(
            t for t in (queued.created_at, queued.next_attempt_at, queued.finished_at) if t)
        bound.info("run_claimed", processor=run.processor, version=run.version,
                   queue_wait_ms=round(waited.total_seconds() * 1000, 1))
        if self.metrics is not None:
            self.metrics.queue_wait.labels(run.processor).observe(
                max(waited.total_seconds(), 0))
            self.metrics.running.inc()
            self.metrics.stats.begin(run.id)
        try:
            status = self._run_claimed(run, processor, dequeued_at, manifest.revision)
        finally:
            if self.metrics is not None:
                self.metrics.running.dec()
                self.metrics.stats.leave(run.id)
        return status

    def _run_claimed(self, run: Run, processor: Processor | None,
                     dequeued_at: float, revision: str) -> RunStatus | None:
        bound = log.bind(run_id=run.id, attempt=run.attempt, worker_id=self.worker_id)
        stages = AttemptStages(self.tracer, self.metrics, dequeued_at)
        guard = AttemptGuard(self.ledger, self.sandbox, run, self.lease_seconds,
                             self.heartbeat_seconds,
                             fence_seconds=fence_after(self.lease_seconds,
                                                       self.stop_grace_seconds))
        guard.start()
        # The allowlist lookup above, made after the job was dequeued, is the launch-time
        # check: `_attempt` refuses the run if that pin no longer matches its image.
        policy = processor.retry if processor is not None else RetryPolicy()
        try:
            finish = self._attempt(run, processor, guard, stages, revision)
        except (SystemExit, KeyboardInterrupt):
            # Cold shutdown: the container is gone (the sandbox removes it on the way
            # out); hand the run back so another worker retries it as worker_lost.
            guard.stop()
            self._record(run, policy, stages, Finish(
                RunStatus.FAILED, error_code=ErrorCode.WORKER_LOST, error_stage="shutdown",
                error_message="the worker shut down before the run finished"), guard)
            raise
        except ServiceUnavailableError as exc:
            # The database went away mid-attempt: the container is gone (the sandbox
            # removes it on the way out); retry it like a lost worker when allowed.
            guard.stop()
            bound.warning("attempt_lost_database", error=exc.message)
            return self._record(run, policy, stages, Finish(
                RunStatus.FAILED, error_code=ErrorCode.WORKER_LOST, error_stage="database",
                error_message=f"the database was unavailable mid-attempt: {exc.message}"),
                guard)
        except Exception as exc:
            guard.stop()
            bound.exception("attempt_crashed")
            with contextlib.suppress(Exception):
                self._record(run, RetryPolicy(), stages, Finish(
                    RunStatus.DEAD_LETTER, error_code=ErrorCode.INTERNAL_ERROR,
                    error_stage="worker", error_message=f"internal error: {type(exc).__name__}"),
                    guard)
            raise
        guard.stop()
        if guard.lost:
            # Fenced off (no renewal got through in time) or taken back: either way the
            # run is no longer this attempt's to record (nor its unwritten output); the
            # reconciler ends it.
            bound.warning("attempt_abandoned",
                          reason="self-fenced" if guard.fenced else "lease lost")
            return None
        return self._record(run, policy, stages, finish, guard)

    def _attempt(self, run: Run, processor: Processor | None, guard: AttemptGuard,
                 stages: AttemptStages, revision: str) -> Finish:
        if processor is None or processor.image != run.image:
            return Finish(RunStatus.DEAD_LETTER, error_code=ErrorCode.IMAGE_NOT_ALLOWED,
                          error_stage="launch",
                          error_message=(f"{run.image} is no longer allowlisted for "
                                         f"{run.processor} {run.version} "
                                         f"(manifest {revision})"))
        try:
            inputs = self._inputs(run)
        except SandboxError as exc:
            return Finish(RunStatus.DEAD_LETTER, error_code=exc.error_code,
                          error_stage="deliver input", error_message=exc.message)
        spec = spec_for(run_id=run.id, attempt=run.attempt, image=run.image,
                        limits=processor.limits, timeout_seconds=run.timeout_seconds,
                        input_json=json.dumps(run.input).encode(),
                        labels={WORKER_LABEL: self.worker_id, HOST_LABEL: self.host_id},
                        files=inputs)
        # A first attempt has no output before it; later ones append after earlier ones.
        offset = self.ledger.log_offset(run.id) if run.attempt > 1 else 0
        writer = LogWriter(self.ledger, run.id, run.attempt, offset)
        guard.writer = writer

        receipt: dict[str, Any] = {}

        def verified(found: dict[str, Any]) -> None:
            receipt.update(found, manifest_revision=revision)

        def started(container_id: str, image_id: str) -> None:
            guard.on_start(container_id)
            # Recorded by the writer's first flush while the container runs, or with the
            # attempt's end if it ends sooner: never a write before the start.
            writer.started(container_id=container_id, image_id=image_id,
                           provenance=receipt or None)

        began = time.monotonic()
        try:
            outcome = self.sandbox.run(
                spec, on_log=writer.write, on_start=started, stages=stages,
                on_receipt=verified,
                artifacts=self.files.sink(run) if self.files is not None else None)
        except SandboxError as exc:
            if receipt.get("mismatches"):  # keep the evidence of a refused start
                writer.started(provenance=receipt)
            log.warning("attempt_platform_failure", run_id=run.id, attempt=run.attempt,
                        error_code=exc.error_code, error=exc.message)
            return Finish(RunStatus.FAILED, error_code=exc.error_code,
                          error_stage=str(exc.context.get("stage", "sandbox")),
                          error_message=exc.message)
        self.fault("after_container_exit")
        log.info("container_finished", run_id=run.id, attempt=run.attempt,
                 exit_code=outcome.exit_code, oom_killed=outcome.oom_killed,
                 timed_out=outcome.timed_out, log_bytes=outcome.log_bytes,
                 duration_ms=round(outcome.duration_seconds * 1000, 1),
                 total_ms=round((time.monotonic() - began) * 1000, 1),
                 stages_ms=stages.timings_ms)
        if self.metrics is not None and outcome.log_bytes_dropped:
            self.metrics.log_dropped.labels(run.processor).inc(outcome.log_bytes_dropped)
        if guard.canceled:
            return Finish(RunStatus.CANCELED, exit_code=outcome.exit_code,
                          error_code=ErrorCode.CANCELED, error_stage="run",
                          error_message="canceled while running",
                          log_bytes=outcome.log_bytes, log_truncated=outcome.log_truncated,
                          artifacts=kept_artifacts(outcome))
        return classify(outcome)

    def _inputs(self, run: Run) -> list[InputFile]:
        """The run's files for /run/in.

        Raises:
            SandboxError: the run has files and this worker has no file store, or one
                of them is gone.
        """
        if not run.files:
            return []
        if self.files is None:
            raise SandboxError("this worker has no file store, and the run has files",
                               stage="deliver input")
        return self.files.inputs(run)

    def close(self) -> None:
        """Nothing to wait for at worker shutdown: an attempt writes everything it
        holds with its end, before `execute` returns."""

    def _record(self, run: Run, policy: RetryPolicy, stages: AttemptStages,
                finish: Finish, guard: AttemptGuard) -> RunStatus | None:
        """Apply the retry policy and store the result with what the attempt has not
        written yet (its writer's tail), riding out a database outage; `stages` holds
        the attempt's timings (the container's run time for metrics)."""
        decided = decide(finish, policy=policy, attempt=run.attempt, now=utcnow())
        tail = guard.writer.take_tail() if guard.writer is not None else None
        deadline = time.monotonic() + RECORD_RETRY_SECONDS
        while True:
            try:
                recorded = self.ledger.finish(run.id, run.attempt, decided, tail=tail)
                break
            except ServiceUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("record_retrying", run_id=run.id, error=exc.message)
                time.sleep(1)
        log.info("run_finished" if recorded else "run_finish_fenced_off", run_id=run.id,
                 attempt=run.attempt, status=decided.status, error_code=decided.error_code,
                 next_attempt_at=decided.next_attempt_at)
        if self.metrics is not None and recorded:
            wait_ms = stages.timings_ms.get("wait")
            self.metrics.record_finish(run.processor, decided.status,
                                       error_code=decided.error_code,
                                       seconds=wait_ms / 1000 if wait_ms is not None else None)
        # A retry is enqueued by the requeue pass once its backoff is over.
        return decided.status if recorded else None
