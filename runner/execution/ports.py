"""What the execution layer needs from the layers below it, as Protocols.

`RunLedger` is the control side (implemented by `runner.control.ledger.Ledger`),
`QueuePort` the reconciler's Redis (`runner.control.queue.RunQueue`), `SandboxPort`
the container side (implemented by `runner.sandbox.Sandbox`), `FilesPort` the file
store (`runner.execution.files.WorkerFiles`). The
executor, guard and reconciler are written against these, so unit tests can run
them on SQLite with a fake sandbox (tests/support/fakes.py) and no Docker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from runner.control.lifecycle import Claim, Heartbeat
from runner.domain import Finish, Run
from runner.observability.telemetry import StageObserver
from runner.sandbox import ArtifactSink, ContainerSpec, InputFile, LogSink, Outcome


class RunLedger(Protocol):
    def get_run(self, run_id: str) -> Run | None: ...

    def claim(self, run_id: str, *, attempt: int, worker_id: str, lease_seconds: float,
              max_concurrency: int | None = None, known: Run | None = None,
              host_id: str | None = None) -> Claim: ...

    def heartbeat(self, run_id: str, attempt: int, *, lease_seconds: float) -> Heartbeat: ...

    def record_container(self, run_id: str, attempt: int, *, container_id: str | None = None,
                         image_id: str | None = None,
                         provenance: dict[str, Any] | None = None) -> None: ...

    def log_offset(self, run_id: str) -> int: ...

    def append_log(self, run_id: str, attempt: int, *, offset: int, data: bytes) -> None: ...

    def finish(self, run_id: str, attempt: int, outcome: Finish, *,
               only_if_lease_expired: bool = False) -> bool: ...

    def take_back(self, run_id: str, attempt: int, outcome: Finish, *,
                  hold_until: datetime) -> bool: ...

    def release_hold(self, run_id: str, attempt: int, *, due_at: datetime | None) -> bool: ...

    def expired_leases(self) -> list[Run]: ...

    def due_queued(self, *, older_than: datetime, limit: int = 500) -> list[Run]: ...

    def due_queued_keys(self, *, older_than: datetime, limit: int) -> list[tuple[str, int]]: ...

    def release_stale_slots(self) -> int: ...

    def prune_runs_ended_before(self, *, cutoff: datetime, batch: int = 500) -> int: ...

    def slots_held(self) -> dict[str, int]: ...

    def wake_parked(self, processor: str, count: int = 1) -> int: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class QueuePort(Protocol):
    """The reconciler's view of Redis (implemented by `runner.control.queue.RunQueue`)."""

    def holds(self, run: Run) -> bool: ...

    def holding(self, runs: Sequence[Run]) -> set[str]: ...

    def holding_keys(self, keys: Sequence[tuple[str, int]]) -> set[str]: ...

    def enqueue_once(self, run: Run, *, stop_grace_seconds: float = 5.0,
                     window_seconds: float = 10.0) -> bool: ...

    def try_lock(self, name: str, token: str, *, seconds: float) -> bool: ...

    def unlock(self, name: str, token: str) -> None: ...


class SandboxPort(Protocol):
    def run(self, spec: ContainerSpec, *, on_log: LogSink,
            on_start: Callable[[str, str], None] | None = None,
            stages: StageObserver | None = None,
            on_receipt: Callable[[dict[str, Any]], None] | None = None,
            artifacts: ArtifactSink | None = None) -> Outcome: ...

    def stop(self, container_id: str) -> None: ...

    def remove(self, container_id: str) -> None: ...

    def managed_containers(self, **label_filters: str) -> list[dict[str, Any]]: ...

    def managed_volumes(self) -> list[dict[str, Any]]: ...

    def remove_volume(self, name: str) -> None: ...

    def prefetch(self, refs: list[str]) -> dict[str, str]: ...

    def drain(self, timeout: float = 30) -> bool: ...

    def ping(self) -> None: ...

    def check_engine(self) -> None: ...


class FilesPort(Protocol):
    """Files in and artifacts out (implemented by `runner.execution.files.WorkerFiles`)."""

    def inputs(self, run: Run) -> list[InputFile]: ...

    def sink(self, run: Run) -> ArtifactSink: ...

    def prune_files(self, *, cutoff: datetime) -> int: ...

    def sweep_blobs(self, *, grace_seconds: float) -> dict[str, int]: ...


# A named point in an attempt where a test entry point may inject a fault
# (tests/support/faults.py); production passes no hook.
FaultHook = Callable[[str], None]
FAULT_POINTS = frozenset({"before_claim", "after_claim", "after_container_exit"})


def no_fault(_point: str) -> None:
    """The production fault hook: nothing happens at any point."""
