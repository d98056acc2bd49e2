"""Execute one attempt of one run: the one place joining store, manifest and sandbox.

Claim the run (only one claim wins), re-check the allowlist at launch, run the
container, and record how it ended. A processor's failure is classified from the
sandbox's `Outcome`; a platform failure (`SandboxError`) ends the run as a dead
letter with its error code.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass

import structlog

from runner.domain import ErrorCode, RunStatus
from runner.errors import SandboxError
from runner.manifest import ManifestSource
from runner.sandbox import (
    ATTEMPT_LABEL,
    RUN_LABEL,
    WORKER_LABEL,
    ContainerSpec,
    Outcome,
    ResultStatus,
    Sandbox,
)
from runner.store import Finish, Run, Store

log = structlog.get_logger(__name__)


def container_name(run_id: str, attempt: int) -> str:
    """Deterministic, so a second create of the same attempt is a 409 we recognise."""
    return f"runner-{run_id}-{attempt}"


def _failure(outcome: Outcome) -> tuple[RunStatus, ErrorCode, str] | None:
    """Why a container's end is not a success, or None when it is one."""
    result = outcome.result
    if outcome.timed_out:
        return (RunStatus.TIMED_OUT, ErrorCode.TIMEOUT,
                "the processor did not finish before its timeout")
    if outcome.oom_killed:
        return (RunStatus.FAILED, ErrorCode.OOM_KILLED,
                "the processor was killed for exceeding its memory limit")
    if outcome.exit_code != 0:
        return (RunStatus.FAILED, ErrorCode.NONZERO_EXIT,
                f"the processor exited with code {outcome.exit_code}")
    if result.status is ResultStatus.TOO_LARGE:
        return (RunStatus.FAILED, ErrorCode.OUTPUT_TOO_LARGE,
                f"result.json is {result.size} bytes, over the cap")
    if result.status in (ResultStatus.SYMLINK, ResultStatus.NOT_REGULAR):
        return (RunStatus.FAILED, ErrorCode.INVALID_OUTPUT,
                f"result.json is not a regular file ({result.status})")
    return None


def classify(outcome: Outcome) -> Finish:
    """The terminal record for a container's end (pure: no I/O)."""
    failure = _failure(outcome)
    value = None
    if failure is None and outcome.result.status is ResultStatus.OK:
        try:
            value = json.loads(outcome.result.data or b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            failure = (RunStatus.FAILED, ErrorCode.INVALID_OUTPUT,
                       f"result.json is not JSON: {exc}")
    if failure is None:
        return Finish(RunStatus.SUCCEEDED, exit_code=outcome.exit_code, result=value,
                      log_bytes=outcome.log_bytes, log_truncated=outcome.log_truncated)
    status, code, message = failure
    return Finish(status, exit_code=outcome.exit_code, error_code=code, error_message=message,
                  log_bytes=outcome.log_bytes, log_truncated=outcome.log_truncated)


class LogWriter:
    """Batches captured output into the store: bounded memory, live enough to follow."""

    FLUSH_BYTES = 64 * 1024
    FLUSH_SECONDS = 0.25

    def __init__(self, store: Store, run_id: str, attempt: int, offset: int) -> None:
        self.store, self.run_id, self.attempt, self.offset = store, run_id, attempt, offset
        self._buffer = bytearray()
        self._last = time.monotonic()

    def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        if (len(self._buffer) >= self.FLUSH_BYTES
                or time.monotonic() - self._last >= self.FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        self.store.append_log(self.run_id, self.attempt, offset=self.offset, data=data)
        self.offset += len(data)


@dataclass
class Executor:
    store: Store
    manifests: ManifestSource
    sandbox: Sandbox
    worker_id: str
    stop_grace_seconds: float = 5.0

    def execute(self, run_id: str) -> RunStatus | None:
        """Run one attempt of `run_id`; the status recorded, or None if not claimed."""
        run = self.store.claim(run_id, worker_id=self.worker_id)
        if run is None:
            current = self.store.get_run(run_id)
            log.info("run_not_claimed", run_id=run_id,
                     status=current.status if current else "missing")
            return None
        bound = log.bind(run_id=run.id, attempt=run.attempt, worker_id=self.worker_id)
        bound.info("run_claimed", processor=run.processor, version=run.version)
        manifest = self.manifests.current()
        processor = manifest.find(run.processor, run.version)
        if processor is None or processor.image != run.image:
            return self._finish(run, Finish(
                RunStatus.DEAD_LETTER, error_code=ErrorCode.IMAGE_NOT_ALLOWED,
                error_message=(f"{run.image} is no longer allowlisted for {run.processor} "
                               f"{run.version} (manifest {manifest.revision})")))
        spec = ContainerSpec(
            name=container_name(run.id, run.attempt),
            image=run.image,
            cpus=processor.limits.cpus,
            memory_bytes=processor.limits.memory_bytes,
            pids_limit=processor.limits.pids,
            timeout_seconds=min(run.timeout_seconds, processor.limits.timeout_seconds),
            log_cap_bytes=processor.limits.log_bytes,
            input_json=json.dumps(run.input).encode(),
            environment={"RUNNER_RUN_ID": run.id, "RUNNER_ATTEMPT": str(run.attempt)},
            labels={RUN_LABEL: run.id, ATTEMPT_LABEL: str(run.attempt),
                    WORKER_LABEL: self.worker_id},
        )
        writer = LogWriter(self.store, run.id, run.attempt, self.store.log_offset(run.id))
        started = time.monotonic()
        try:
            outcome = self.sandbox.run(
                spec, on_log=writer.write,
                on_start=lambda cid, iid: self.store.record_container(
                    run.id, run.attempt, container_id=cid, image_id=iid),
            )
        except SandboxError as exc:
            writer.flush()
            bound.warning("attempt_platform_failure", error_code=exc.error_code,
                          error=exc.message)
            return self._finish(run, Finish(RunStatus.DEAD_LETTER, error_code=exc.error_code,
                                            error_message=exc.message))
        except Exception as exc:
            # A bug or a dead database must not leave the run "running" with no one on it.
            bound.exception("attempt_crashed")
            with contextlib.suppress(Exception):
                self._finish(run, Finish(RunStatus.DEAD_LETTER,
                                         error_code=ErrorCode.INTERNAL_ERROR,
                                         error_message=f"internal error: {type(exc).__name__}"))
            raise
        writer.flush()
        finish = classify(outcome)
        bound.info("container_finished", exit_code=outcome.exit_code,
                   oom_killed=outcome.oom_killed, timed_out=outcome.timed_out,
                   duration_ms=round(outcome.duration_seconds * 1000, 1),
                   total_ms=round((time.monotonic() - started) * 1000, 1),
                   log_bytes=outcome.log_bytes)
        return self._finish(run, finish)

    def _finish(self, run: Run, finish: Finish) -> RunStatus | None:
        recorded = self.store.finish(run.id, run.attempt, finish)
        log.info("run_finished" if recorded else "run_finish_fenced_off", run_id=run.id,
                 attempt=run.attempt, status=finish.status, error_code=finish.error_code)
        return finish.status if recorded else None
