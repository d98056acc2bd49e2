"""Faults injected into real processes; each test asserts the end state.

Workers here run on their own Redis server with 3 s leases, a 1 s reconcile
interval and grace, so recoveries take seconds.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable

import docker
import pytest

from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.domain import ErrorCode, RunStatus, utcnow
from runner.errors import ServiceUnavailableError
from runner.execution.wiring import build_reconciler
from runner.settings import Settings
from tests.integration.conftest import containers_left, containers_of, running_container
from tests.integration.reliability import (
    blocked_on_an_empty_queue,
    submit_rel,
    wait_for,
    wait_terminal,
)
from tests.support.processes import WorkerProcess
from tests.support.services import RedisServer
from tests.support.waiting import wait_until

StartWorker = Callable[..., WorkerProcess]


def test_sigkill_worker_mid_run(start_worker: StartWorker, store: Store,
                                rel_settings: Settings,
                                docker_client: docker.DockerClient) -> None:
    first = start_worker("a")
    run = submit_rel(store, rel_settings, "slow", {"seconds": 3})
    orphan = running_container(docker_client, run.id)
    first.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    start_worker("b")
    final = wait_terminal(store, run.id)
    recovered_after = time.monotonic() - killed_at
    assert final.status is RunStatus.SUCCEEDED, (final.error_code, final.error_stage,
                                                 final.error_message, store.attempts(run.id))
    assert final.attempt == 2
    attempts = store.attempts(run.id)
    assert [a["error_code"] for a in attempts] == [ErrorCode.WORKER_LOST, None]
    assert attempts[0]["error_stage"] == "lease"
    # The orphan was killed before the retry started, and nothing is left.
    assert orphan.id != attempts[1]["container_id"]
    assert containers_left(docker_client, run.id) == []
    assert recovered_after < 60, recovered_after  # 3 s lease + 1 s reconcile + 3 s run


@pytest.mark.parametrize(("point", "left_as", "attempt_errors"), [
    ("before_claim", RunStatus.QUEUED, [None]),
    ("after_container_exit", RunStatus.RUNNING, [ErrorCode.WORKER_LOST, None]),
], ids=["between dequeue and claim", "after the container exits, before the record"])
def test_sigkill_at_a_fault_point(start_worker: StartWorker, store: Store,
                                  rel_settings: Settings, docker_client: docker.DockerClient,
                                  point: str, left_as: RunStatus,
                                  attempt_errors: list[ErrorCode | None]) -> None:
    doomed = start_worker("doomed", faults={point})
    run = submit_rel(store, rel_settings, "rel-echo", {"message": point})
    doomed.process.wait(30)
    assert "fault_injected" in doomed.log()
    assert store.get_run(run.id).status is left_as  # type: ignore[union-attr]
    start_worker("rescuer")
    final = wait_terminal(store, run.id)
    assert (final.status, final.attempt) == (RunStatus.SUCCEEDED, len(attempt_errors))
    assert [a["error_code"] for a in store.attempts(run.id)] == attempt_errors
    assert final.result == {"echo": {"message": point}}
    assert containers_left(docker_client, run.id) == []


def test_same_run_enqueued_twice_runs_once(start_worker: StartWorker, store: Store,
                                           rel_settings: Settings) -> None:
    run = submit_rel(store, rel_settings, "rel-echo", {"message": "once"})
    queue = RunQueue.from_url(rel_settings.redis_url)
    queue.enqueue(run)
    queue.enqueue(run)
    worker = start_worker("solo")
    final = wait_terminal(store, run.id)
    assert (final.status, final.attempt) == (RunStatus.SUCCEEDED, 1)
    assert len(store.attempts(run.id)) == 1
    # The duplicates had their chance: the worker took every job off the queue.
    wait_until(lambda: blocked_on_an_empty_queue(rel_settings.redis_url, rel_settings.queue),
               timeout=30, message="the worker never emptied its queue")
    assert worker.log().count('"event": "run_claimed"') == 1


def test_sigstop_past_the_lease_then_sigcont(start_worker: StartWorker, store: Store,
                                             rel_settings: Settings,
                                             docker_client: docker.DockerClient) -> None:
    worker = start_worker("sleepy")
    run = submit_rel(store, rel_settings, "slow", {"seconds": 4})
    first = running_container(docker_client, run.id)
    worker.kill(signal.SIGSTOP)

    def lease_expired() -> bool:
        lease = store.get_run(run.id).lease_expires_at  # type: ignore[union-attr]
        return lease is not None and lease < utcnow()

    wait_until(lease_expired, timeout=rel_settings.lease_seconds + 30, interval=0.2,
               message="the frozen worker's lease never expired")
    reconciler = build_reconciler(rel_settings, store=store)

    def taken_back() -> bool:
        if store.get_run(run.id).status is not RunStatus.RUNNING:  # type: ignore[union-attr]
            return True
        # A frozen worker may hold a row lock mid-transaction: the reconciler's write
        # times out (lock_timeout) and succeeds on a later pass once the server has
        # ended the frozen transaction.
        with contextlib.suppress(ServiceUnavailableError):
            reconciler.run_once()
        return False

    wait_until(taken_back, timeout=90, interval=0.5,
               message="no reconciler pass took the run back from the frozen worker")
    expired = wait_for(store, run.id, RunStatus.QUEUED, attempt=1, timeout=5)
    assert expired.error_code == ErrorCode.WORKER_LOST
    assert first.id not in [c.id for c in containers_of(docker_client, run.id)]
    worker.kill(signal.SIGCONT)
    final = wait_terminal(store, run.id)
    assert (final.status, final.attempt) == (RunStatus.SUCCEEDED, 2)
    attempts = store.attempts(run.id)
    assert [a["error_code"] for a in attempts] == [ErrorCode.WORKER_LOST, None]
    # The stalled worker's late writes for attempt 1 changed nothing.
    assert attempts[0]["status"] == "failed" and attempts[0]["error_stage"] == "lease"
    wait_until(lambda: any(e in worker.log()
                           for e in ("attempt_abandoned", "run_finish_fenced_off")),
               timeout=15, interval=0.1, message=worker.log)


def test_redis_flushall_with_queued_and_running_runs(start_worker: StartWorker, store: Store,
                                                     rel_settings: Settings,
                                                     rel_redis: RedisServer) -> None:
    start_worker("flush")
    running = submit_rel(store, rel_settings, "slow", {"seconds": 2})
    wait_for(store, running.id, RunStatus.RUNNING)
    queued = [submit_rel(store, rel_settings, "rel-echo", {"message": str(i)}) for i in range(3)]
    import redis as redis_lib

    redis_lib.Redis.from_url(rel_redis.url).flushall()
    for run in [running, *queued]:
        final = wait_terminal(store, run.id, timeout=90)
        assert final.status is RunStatus.SUCCEEDED, (final.error_code, final.error_stage,
                                                 final.error_message, store.attempts(run.id))
        assert len(store.attempts(run.id)) == 1


def test_redis_restarted(start_worker: StartWorker, store: Store, rel_settings: Settings,
                         rel_redis: RedisServer) -> None:
    start_worker("restart")
    running = submit_rel(store, rel_settings, "slow", {"seconds": 2})
    wait_for(store, running.id, RunStatus.RUNNING)
    queued = submit_rel(store, rel_settings, "rel-echo", {"message": "after restart"})
    rel_redis.stop()
    time.sleep(1)
    rel_redis.start()
    for run in (running, queued):
        final = wait_terminal(store, run.id, timeout=90)
        assert final.status is RunStatus.SUCCEEDED, (final.error_code, final.error_stage,
                                                 final.error_message, store.attempts(run.id))
    later = submit_rel(store, rel_settings, "rel-echo", {"message": "still serving"})
    assert wait_terminal(store, later.id, timeout=90).status is RunStatus.SUCCEEDED


def test_postgres_restarted_mid_run(start_worker: StartWorker, store: Store,
                                    rel_settings: Settings) -> None:
    worker = start_worker("pg")
    run = submit_rel(store, rel_settings, "slow", {"seconds": 3})
    wait_for(store, run.id, RunStatus.RUNNING)
    restart = subprocess.run(["bash", "scripts/services.sh", "restart", "postgres"],
                             capture_output=True, text=True, timeout=120)
    assert restart.returncode == 0, restart.stderr
    final = wait_terminal(store, run.id, timeout=120)
    assert final.status is RunStatus.SUCCEEDED, (final.error_stage, final.error_message,
                                                 worker.log()[-3000:])


def test_sigterm_drains_the_current_run(start_worker: StartWorker, store: Store,
                                        rel_settings: Settings) -> None:
    # A drain timeout far above the run's own time: on a slow engine create and start
    # alone can take seconds (the timeout path has its own test below).
    worker = start_worker("drain", env={"RUNNER_DRAIN_TIMEOUT_SECONDS": "120"})
    run = submit_rel(store, rel_settings, "slow", {"seconds": 2})
    wait_for(store, run.id, RunStatus.RUNNING)
    worker.kill(signal.SIGTERM)
    assert worker.process.wait(30) == 0
    final = store.get_run(run.id)
    assert final is not None
    assert (final.status, final.attempt) == (RunStatus.SUCCEEDED, 1)


def test_drain_timeout_hands_the_run_back(start_worker: StartWorker, store: Store,
                                          rel_settings: Settings,
                                          docker_client: docker.DockerClient) -> None:
    worker = start_worker("slowdrain")
    run = submit_rel(store, rel_settings, "slow", {"seconds": 3600})
    running_container(docker_client, run.id)
    worker.kill(signal.SIGTERM)
    worker.process.wait(60)  # drain timeout is 3 s
    handed_back = wait_for(store, run.id, RunStatus.QUEUED, attempt=1, timeout=30)
    assert handed_back.error_code == ErrorCode.WORKER_LOST
    assert handed_back.error_stage == "shutdown"
    assert containers_left(docker_client, run.id) == []
    from runner.control.lifecycle import Lifecycle

    Lifecycle(store).cancel(run.id, tenant=None)


def test_second_sigterm_stops_at_once(start_worker: StartWorker, store: Store,
                                      rel_settings: Settings,
                                      docker_client: docker.DockerClient) -> None:
    worker = start_worker("impatient")
    run = submit_rel(store, rel_settings, "slow", {"seconds": 3600})
    running_container(docker_client, run.id)
    worker.kill(signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a repeat within one second
    worker.kill(signal.SIGTERM)
    worker.process.wait(30)
    handed_back = wait_for(store, run.id, RunStatus.QUEUED, attempt=1, timeout=30)
    assert handed_back.error_code == ErrorCode.WORKER_LOST
    assert containers_left(docker_client, run.id) == []
    from runner.control.lifecycle import Lifecycle

    Lifecycle(store).cancel(run.id, tenant=None)
