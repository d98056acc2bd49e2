"""Fakes of the runner's own ports, for unit tests of the execution layer's logic.

`FakeSandbox` stands in for `runner.sandbox.Sandbox` (the `SandboxPort` Protocol of
`runner.execution.ports`) and `FakeQueue` for `runner.control.queue.RunQueue` (the
`QueuePort` Protocol), so the executor, guard and reconciler run on SQLite in
milliseconds, with no Docker and no Redis. Each test scripts what the container
does (`Script`: exit code, OOM, timeout, result bytes, log chunks, an exception,
blocking until released) and reads back what was asked of the fakes (specs run,
stops, removals, enqueued runs).

The rule these follow: unit tests of pure logic may fake OUR Protocols (they are
small, typed and owned here, so a fake cannot drift silently: mypy checks it
against the Protocol). Integration tests never do: they run the real Sandbox on
Docker, the real queue on Redis and the real store on PostgreSQL.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from runner.domain import Run
from runner.errors import ServiceUnavailableError
from runner.execution.ports import QueuePort, SandboxPort
from runner.observability.telemetry import NullStages, StageObserver
from runner.sandbox import (
    ATTEMPT_LABEL,
    INSTANCE_LABEL,
    MANAGED_LABEL,
    RUN_LABEL,
    ArtifactSink,
    CollectedResult,
    ContainerSpec,
    LogSink,
    Outcome,
    ResultStatus,
)

IMAGE_ID = "sha256:" + "b" * 64
SIGKILL_EXIT = 137  # what a container stopped by SIGKILL exits with
# A blocked run that nobody releases fails the test instead of hanging it for ever.
BLOCK_TIMEOUT_SECONDS = 60.0

RaisePoint = Literal["create", "start", "wait"]


@dataclass
class Script:
    """What one `FakeSandbox.run` does, in the order the real sandbox does it.

    `raises` is raised at `raise_at`: "create" (before the receipt, so no container
    started), "start" (after the receipt, before `on_start`, like a failed start), or
    "wait" (after the start, the logs and any block: e.g. a SystemExit of a worker
    shut down mid-run). `block` holds the run after its logs until `release()` or a
    `stop()` of its container (then it exits 137, as after a SIGKILL).
    """

    exit_code: int | None = 0
    oom_killed: bool = False
    timed_out: bool = False
    result: bytes | CollectedResult | None = b'{"ok": true}'
    logs: list[bytes] = field(default_factory=list)
    raises: BaseException | None = None
    raise_at: RaisePoint = "start"
    block: bool = False
    image_id: str = IMAGE_ID
    mismatches: list[str] = field(default_factory=list)
    # Leave the container behind (as a crashed engine call might) instead of removing it.
    leave_container: bool = False


class FakeSandbox:
    """A scriptable `SandboxPort`: records every call, runs nothing.

    Scripts are used in order (`then(...)`), the default `Script()` when none is left.
    `started` is set once a run has started and fed its logs (and is about to block,
    when scripted to), so a test can act mid-run without sleeping.
    """

    def __init__(self, *scripts: Script, default: Script | None = None,
                 instance: str = "default") -> None:
        self.instance = instance
        self.default = default or Script()
        self._scripts = list(scripts)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._release: dict[str, threading.Event] = {}
        self._stopped_ids: set[str] = set()
        self.started = threading.Event()
        self.specs: list[ContainerSpec] = []
        self.receipts: list[dict[str, Any]] = []
        self.stopped: list[str] = []
        self.removed: list[str] = []
        self.containers: dict[str, dict[str, Any]] = {}  # what the engine "has", by id
        self.calls: list[tuple[str, str]] = []  # every call in order: (method, argument)
        self.prefetched: list[list[str]] = []
        self.fail_listing: BaseException | None = None  # raised by managed_containers
        # /run volumes the engine "has": Name -> {"Name", "Kind", "Created", "InUse"}
        self.volumes: dict[str, dict[str, Any]] = {}
        self.removed_volumes: list[str] = []
        self.fail_removal: BaseException | None = None  # raised by remove

    # Scripting ---------------------------------------------------------------------

    def then(self, script: Script) -> FakeSandbox:
        """Queue the script of the next run not yet scripted."""
        with self._lock:
            self._scripts.append(script)
        return self

    def release(self) -> None:
        """Let every blocked run go on (it ends as scripted)."""
        with self._lock:
            events = list(self._release.values())
        for event in events:
            event.set()

    def add_container(self, *, run_id: str | None, attempt: int | str | None,
                      created: float | None = None, managed: bool = True,
                      instance: str | None = None,
                      labels: dict[str, str] | None = None) -> str:
        """A container the engine has (a leftover, another attempt's, a foreign one)."""
        container_id = f"fake-extra-{next(self._ids)}"
        all_labels = dict(labels or {})
        if run_id is not None:
            all_labels[RUN_LABEL] = run_id
        if attempt is not None:
            all_labels[ATTEMPT_LABEL] = str(attempt)
        if managed:
            all_labels[MANAGED_LABEL] = "true"
            all_labels[INSTANCE_LABEL] = instance or self.instance
        with self._lock:
            self.containers[container_id] = {
                "Id": container_id, "Labels": all_labels, "Names": [f"/{container_id}"],
                "Created": int(created if created is not None else time.time() - 3600),
            }
        return container_id

    def _next_script(self) -> Script:
        with self._lock:
            return self._scripts.pop(0) if self._scripts else self.default

    # SandboxPort -------------------------------------------------------------------

    def run(self, spec: ContainerSpec, *, on_log: LogSink,
            on_start: Callable[[str, str], None] | None = None,
            stages: StageObserver | None = None,
            on_receipt: Callable[[dict[str, Any]], None] | None = None,
            artifacts: ArtifactSink | None = None) -> Outcome:
        script = self._next_script()
        observer: StageObserver = stages or NullStages()
        container_id = f"fake-{next(self._ids)}"
        release = threading.Event()
        with self._lock:
            self.specs.append(spec)
            self.calls.append(("run", spec.name))
            self._release[container_id] = release
            self.containers[container_id] = {
                "Id": container_id, "Names": [f"/{spec.name}"], "Created": int(time.time()),
                "Labels": {**spec.labels, MANAGED_LABEL: "true",
                           INSTANCE_LABEL: self.instance},
            }
        began = time.monotonic()
        try:
            with observer.stage("create", container_name=spec.name):
                if script.raises is not None and script.raise_at == "create":
                    raise script.raises
            with observer.stage("start", input_bytes=len(spec.input_json)):
                receipt = {"pinned": spec.image, "image_id": script.image_id, "applied": {},
                           "mismatches": list(script.mismatches),
                           "verified_at": datetime.now(UTC).isoformat()}
                self.receipts.append(receipt)
                if on_receipt is not None:
                    on_receipt(receipt)
                if script.raises is not None and script.raise_at == "start":
                    raise script.raises
            if on_start is not None:
                on_start(container_id, script.image_id)
            log_bytes = 0
            for chunk in script.logs:
                on_log(chunk)
                log_bytes += len(chunk)
            self.started.set()
            exit_code = script.exit_code
            with observer.stage("wait", timeout_s=spec.timeout_seconds):
                if script.block and not release.wait(BLOCK_TIMEOUT_SECONDS):
                    raise RuntimeError(f"FakeSandbox: {container_id} was blocked and "
                                       f"never released or stopped")
                with self._lock:
                    if container_id in self._stopped_ids:
                        exit_code = SIGKILL_EXIT
                if script.raises is not None and script.raise_at == "wait":
                    raise script.raises
            return Outcome(
                container_id=container_id, image_id=script.image_id, exit_code=exit_code,
                oom_killed=script.oom_killed, timed_out=script.timed_out,
                duration_seconds=time.monotonic() - began, log_bytes=log_bytes,
                log_truncated=False, result=self._result(script, exit_code))
        finally:
            # The real sandbox removes its container whatever happens.
            with self._lock:
                self._release.pop(container_id, None)
                if not script.leave_container:
                    self.containers.pop(container_id, None)

    @staticmethod
    def _result(script: Script, exit_code: int | None) -> CollectedResult:
        if isinstance(script.result, CollectedResult):
            return script.result
        # Like the real one, a result is only read from a container that exited 0.
        if script.result is None or exit_code != 0 or script.timed_out:
            return CollectedResult(ResultStatus.ABSENT)
        return CollectedResult(ResultStatus.OK, data=script.result, size=len(script.result))

    def stop(self, container_id: str) -> None:
        with self._lock:
            self.calls.append(("stop", container_id))
            self.stopped.append(container_id)
            self._stopped_ids.add(container_id)
            event = self._release.get(container_id)
        if event is not None:
            event.set()

    def remove(self, container_id: str) -> None:
        if self.fail_removal is not None:
            raise self.fail_removal
        with self._lock:
            self.calls.append(("remove", container_id))
            self.removed.append(container_id)
            self._stopped_ids.add(container_id)
            self.containers.pop(container_id, None)
            event = self._release.get(container_id)
        if event is not None:
            event.set()

    def managed_containers(self, **label_filters: str) -> list[dict[str, Any]]:
        """Like the engine's label filter: managed, this instance, and every filter."""
        if self.fail_listing is not None:
            raise self.fail_listing
        wanted = {MANAGED_LABEL: None, INSTANCE_LABEL: self.instance, **label_filters}
        with self._lock:
            self.calls.append(("list", ",".join(f"{k}={v}" for k, v in label_filters.items())))
            return [dict(c) for c in self.containers.values()
                    if all(k in c["Labels"] and (v is None or c["Labels"][k] == v)
                           for k, v in wanted.items())]

    def managed_volumes(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(v) for v in self.volumes.values()]

    def remove_volume(self, name: str) -> None:
        with self._lock:
            self.calls.append(("remove_volume", name))
            self.removed_volumes.append(name)
            self.volumes.pop(name, None)

    def prefetch(self, refs: list[str]) -> dict[str, str]:
        self.prefetched.append(list(refs))
        return {}

    def drain(self, timeout: float = 30) -> bool:
        return True

    def ping(self) -> None:
        return None

    def check_engine(self) -> None:
        return None


class FakeQueue:
    """A `QueuePort` holding jobs in memory: `(run id, attempt)` pairs.

    `down = True` makes every call fail as the real one does when Redis cannot be
    reached (`unlock` is best effort there, so it stays silent); `lock_holder` set to
    a token is a reconciler lock held by another process.
    """

    def __init__(self) -> None:
        self.down = False
        self.lock_holder: str | None = None
        self.jobs: set[tuple[str, int]] = set()
        self.enqueued: list[str] = []
        self.unlocked: list[str] = []
        self._windows: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise ServiceUnavailableError("queue unavailable: fake Redis is down")

    def hold(self, run: Run) -> None:
        """Put the run's next attempt in the queue (as if enqueued elsewhere)."""
        with self._lock:
            self.jobs.add((run.id, run.attempt + 1))

    def holds(self, run: Run) -> bool:
        self._check()
        with self._lock:
            return (run.id, run.attempt + 1) in self.jobs

    def holding(self, runs: Sequence[Run]) -> set[str]:
        return {run.id for run in runs if self.holds(run)}

    def holding_keys(self, keys: Sequence[tuple[str, int]]) -> set[str]:
        self._check()
        with self._lock:
            return {run_id for run_id, attempt in keys if (run_id, attempt + 1) in self.jobs}

    def enqueue_once(self, run: Run, *, stop_grace_seconds: float = 5.0,
                     window_seconds: float = 10.0) -> bool:
        self._check()
        due = run.next_attempt_at or run.created_at
        key = (run.id, run.attempt + 1, due.isoformat())
        with self._lock:
            if key in self._windows:
                return False
            self._windows.add(key)
            self.jobs.add((run.id, run.attempt + 1))
            self.enqueued.append(run.id)
        return True

    def try_lock(self, name: str, token: str, *, seconds: float) -> bool:
        self._check()
        with self._lock:
            if self.lock_holder is not None and self.lock_holder != token:
                return False
            self.lock_holder = token
            return True

    def unlock(self, name: str, token: str) -> None:
        if self.down:
            return
        with self._lock:
            self.unlocked.append(token)
            if self.lock_holder == token:
                self.lock_holder = None


if TYPE_CHECKING:  # mypy holds each fake to the Protocol it stands in for
    _sandbox: SandboxPort = FakeSandbox()
    _queue: QueuePort = FakeQueue()
