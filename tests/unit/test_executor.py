"""The executor on SQLite with a scripted fake sandbox: how each container end, crash
and platform failure is recorded, the guard's cancel and lost lease, the launch-time
allowlist check, and the fault hook's points. No Docker."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from runner.control.ledger import Ledger
from runner.control.lifecycle import ClaimStatus, Lifecycle, RunEnded
from runner.control.store import Store
from runner.domain import ErrorCode, Finish, Run, RunStatus, utcnow
from runner.errors import (
    DigestMismatchError,
    DockerUnavailableError,
    ImagePullError,
    SandboxError,
    SandboxMismatchError,
    ServiceUnavailableError,
)
from runner.execution.executor import Executor
from runner.execution.ports import FAULT_POINTS
from runner.manifest import ManifestSource
from runner.sandbox import (
    ATTEMPT_LABEL,
    HOST_LABEL,
    RUN_LABEL,
    WORKER_LABEL,
    CollectedResult,
    ResultStatus,
    container_name,
)
from tests.support.fakes import IMAGE_ID, SIGKILL_EXIT, FakeSandbox, RaisePoint, Script
from tests.support.waiting import wait_until
from tests.unit.conftest import (
    IMAGE,
    OTHER_IMAGE,
    ManifestMaker,
    NewRunMaker,
    manifest_text,
    past,
    set_run,
)

WAIT = 30.0  # generous: a loaded 2-core machine must never make these flaky
NO_RETRY = "{max_attempts: 1}"

ExecutorMaker = Callable[..., Executor]


@pytest.fixture
def make_executor(ledger: Ledger, manifests: ManifestSource) -> Iterator[ExecutorMaker]:
    made: list[Executor] = []

    def make(sandbox: FakeSandbox, **options: Any) -> Executor:
        options.setdefault("manifests", manifests)
        options.setdefault("lease_seconds", 30.0)
        options.setdefault("heartbeat_seconds", 0.05)
        options.setdefault("stop_grace_seconds", 1.0)
        options.setdefault("ledger", ledger)
        executor = Executor(sandbox=sandbox, worker_id="w", **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()


class InBackground:
    """`executor.execute` in a thread, so the test can act while the fake blocks."""

    def __init__(self, executor: Executor, run_id: str, attempt: int) -> None:
        self.result: RunStatus | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._go, args=(executor, run_id, attempt),
                                        daemon=True)
        self._thread.start()

    def _go(self, executor: Executor, run_id: str, attempt: int) -> None:
        try:
            self.result = executor.execute(run_id, attempt)
        except BaseException as exc:
            self.error = exc

    def join(self) -> RunStatus | None:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the executor did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def current(store: Store, run_id: str) -> Run:
    run = store.get_run(run_id)
    assert run is not None
    return run


def started(sandbox: FakeSandbox) -> None:
    assert sandbox.started.wait(WAIT), "the fake container never started"


# Success -------------------------------------------------------------------------------

def test_success_records_result_logs_and_provenance(make_executor: ExecutorMaker,
                                                    new_run: NewRunMaker, store: Store,
                                                    manifests: ManifestSource,
                                                    events: list[RunEnded]) -> None:
    fake = FakeSandbox(Script(logs=[b"hello\n", b"world\n"], result=b'{"echo": {"x": 1}}'))
    run = new_run()
    assert make_executor(fake).execute(run.id, 1) is RunStatus.SUCCEEDED
    done = current(store, run.id)
    assert done.status is RunStatus.SUCCEEDED
    assert done.result == {"echo": {"x": 1}}
    assert (done.exit_code, done.error_code, done.attempt) == (0, None, 1)
    assert done.finished_at is not None and done.lease_expires_at is None
    assert store.read_logs(run.id) == b"hello\nworld\n"
    assert done.log_bytes == 12
    [attempt] = store.attempts(run.id)
    assert attempt["status"] == "succeeded" and attempt["worker_id"] == "w"
    assert attempt["container_id"] == "fake-1" and attempt["image_id"] == IMAGE_ID
    assert attempt["provenance"]["pinned"] == IMAGE
    assert attempt["provenance"]["manifest_revision"] == manifests.current().revision
    assert events == [RunEnded(run.id, RunStatus.SUCCEEDED, 1, None)]


def test_the_container_spec_is_built_from_the_run_and_manifest(
        make_executor: ExecutorMaker, new_run: NewRunMaker) -> None:
    fake = FakeSandbox()
    run = new_run(timeout_seconds=90)
    make_executor(fake).execute(run.id, 1)
    [spec] = fake.specs
    assert spec.image == IMAGE and spec.name == container_name(run.id, 1)
    assert spec.labels == {RUN_LABEL: run.id, ATTEMPT_LABEL: "1", WORKER_LABEL: "w",
                           HOST_LABEL: ""}
    assert json.loads(spec.input_json) == {"x": 1}
    assert spec.timeout_seconds == 30  # the manifest's limit is below the run's
    assert spec.memory_bytes == 64 * 1024**2 and spec.cpus == 0.5


# How a container's end is classified -------------------------------------------------

@pytest.mark.parametrize(("script", "status", "code", "stage"), [
    (Script(exit_code=1), RunStatus.FAILED, ErrorCode.NONZERO_EXIT, "run"),
    (Script(exit_code=137, oom_killed=True), RunStatus.FAILED, ErrorCode.OOM_KILLED, "run"),
    (Script(exit_code=137, timed_out=True), RunStatus.TIMED_OUT, ErrorCode.TIMEOUT, "run"),
    (Script(result=b"{not json"), RunStatus.FAILED, ErrorCode.INVALID_OUTPUT, "collect"),
    (Script(result=CollectedResult(ResultStatus.SYMLINK)), RunStatus.FAILED,
     ErrorCode.INVALID_OUTPUT, "collect"),
    (Script(result=CollectedResult(ResultStatus.TOO_LARGE, size=2 * 1024**2)),
     RunStatus.FAILED, ErrorCode.OUTPUT_TOO_LARGE, "collect"),
], ids=["nonzero", "oom", "timeout", "invalid-json", "symlink", "too-large"])
def test_a_failed_container_is_classified(script: Script, status: RunStatus, code: ErrorCode,
                                          stage: str, make_executor: ExecutorMaker,
                                          new_run: NewRunMaker, store: Store,
                                          events: list[RunEnded]) -> None:
    run = new_run()
    assert make_executor(FakeSandbox(script)).execute(run.id, 1) is status
    done = current(store, run.id)
    assert (done.status, done.error_code, done.error_stage) == (status, code, stage)
    assert done.exit_code == script.exit_code
    assert done.result is None
    assert events == [RunEnded(run.id, status, 1, code)]


def test_no_result_file_is_a_success_with_no_result(make_executor: ExecutorMaker,
                                                    new_run: NewRunMaker,
                                                    store: Store) -> None:
    run = new_run()
    assert make_executor(FakeSandbox(Script(result=None))).execute(
        run.id, 1) is RunStatus.SUCCEEDED
    assert current(store, run.id).result is None


# Retries -----------------------------------------------------------------------------

def test_a_retryable_exit_goes_back_to_the_queue(make_executor: ExecutorMaker,
                                                 make_manifests: ManifestMaker,
                                                 new_run: NewRunMaker, store: Store,
                                                 events: list[RunEnded]) -> None:
    manifests = make_manifests(retry='{max_attempts: 3, backoff: {initial: 1h, max: 1h}, '
                                     'on: ["exit:75"]}')
    run = new_run()
    before = utcnow()
    assert make_executor(FakeSandbox(Script(exit_code=75)), manifests=manifests).execute(
        run.id, 1) is RunStatus.QUEUED
    queued = current(store, run.id)
    assert queued.status is RunStatus.QUEUED and queued.attempt == 1
    assert queued.error_code == ErrorCode.NONZERO_EXIT and queued.exit_code == 75
    assert queued.next_attempt_at is not None
    assert before <= queued.next_attempt_at <= utcnow() + timedelta(hours=1)
    assert queued.finished_at is None
    assert store.attempts(run.id)[0]["status"] == "failed"
    assert events == []


def test_retries_append_output_then_run_out(make_executor: ExecutorMaker,
                                            new_run: NewRunMaker, store: Store,
                                            events: list[RunEnded]) -> None:
    fake = FakeSandbox(default=Script(exit_code=75, logs=[b"try\n"]))
    executor = make_executor(fake)
    run = new_run()
    assert executor.execute(run.id, 1) is RunStatus.QUEUED
    assert executor.execute(run.id, 2) is RunStatus.QUEUED
    assert executor.execute(run.id, 3) is RunStatus.DEAD_LETTER
    done = current(store, run.id)
    assert "retries exhausted after 3 attempts" in (done.error_message or "")
    assert store.read_logs(run.id) == b"try\n" * 3  # each attempt after the one before
    assert done.log_bytes == 12
    assert [a["log_bytes"] for a in store.attempts(run.id)] == [4, 4, 4]
    assert [a["number"] for a in store.attempts(run.id)] == [1, 2, 3]
    assert events == [RunEnded(run.id, RunStatus.DEAD_LETTER, 3, ErrorCode.NONZERO_EXIT)]


# The guard: renewals, cancels, a lost lease --------------------------------------------

def test_the_guard_renews_the_lease_while_the_container_runs(
        make_executor: ExecutorMaker, new_run: NewRunMaker, store: Store) -> None:
    fake = FakeSandbox(Script(block=True))
    run = new_run()
    job = InBackground(make_executor(fake, lease_seconds=5.0), run.id, 1)
    started(fake)
    first = current(store, run.id).lease_expires_at
    assert first is not None
    wait_until(lambda: (current(store, run.id).lease_expires_at or first) > first,
               timeout=WAIT, interval=0.01, message="a renewed lease")
    fake.release()
    assert job.join() is RunStatus.SUCCEEDED


def test_a_cancel_stops_the_container_and_ends_the_run(make_executor: ExecutorMaker,
                                                       new_run: NewRunMaker,
                                                       lifecycle: Lifecycle, store: Store,
                                                       events: list[RunEnded]) -> None:
    fake = FakeSandbox(Script(block=True, logs=[b"working\n"]))
    run = new_run()
    job = InBackground(make_executor(fake), run.id, 1)
    started(fake)
    assert lifecycle.cancel(run.id, tenant="t").status is RunStatus.RUNNING
    assert job.join() is RunStatus.CANCELED
    assert fake.stopped == ["fake-1"]
    done = current(store, run.id)
    assert done.status is RunStatus.CANCELED and done.error_code == ErrorCode.CANCELED
    assert done.exit_code == SIGKILL_EXIT
    assert store.read_logs(run.id) == b"working\n"
    assert events == [RunEnded(run.id, RunStatus.CANCELED, 1, ErrorCode.CANCELED)]


def test_a_cancel_before_the_container_starts_still_stops_it(
        make_executor: ExecutorMaker, new_run: NewRunMaker, lifecycle: Lifecycle,
        store: Store) -> None:
    """The cancel lands between the claim and the start: whether the guard's first
    heartbeat sees it before or after the start, the container is stopped."""
    run = new_run()

    def cancel_after_claim(point: str) -> None:
        if point == "after_claim":
            lifecycle.cancel(run.id, tenant="t")

    fake = FakeSandbox(Script(block=True))
    job = InBackground(make_executor(fake, fault=cancel_after_claim), run.id, 1)
    assert job.join() is RunStatus.CANCELED
    assert fake.stopped == ["fake-1"]
    assert current(store, run.id).status is RunStatus.CANCELED


def steal(ledger: Ledger, store: Store, run_id: str, finish: Finish) -> None:
    """Another actor (the reconciler) takes the run back once its lease is expired.

    The live guard may renew the lease between the two writes: then try again.
    """
    def taken() -> bool:
        set_run(store, run_id, lease_expires_at=past(60))
        return ledger.finish(run_id, 1, finish, only_if_lease_expired=True)

    wait_until(taken, timeout=WAIT, interval=0.01, message="the lease to be taken over")


def test_a_lost_lease_is_never_overwritten(make_executor: ExecutorMaker, ledger: Ledger,
                                           new_run: NewRunMaker, store: Store,
                                           events: list[RunEnded]) -> None:
    fake = FakeSandbox(Script(block=True))
    run = new_run()
    job = InBackground(make_executor(fake), run.id, 1)
    started(fake)
    steal(ledger, store, run.id, Finish(RunStatus.QUEUED, error_code=ErrorCode.WORKER_LOST,
                                        error_stage="lease", error_message="taken back"))
    second = ledger.claim(run.id, attempt=2, worker_id="w2", lease_seconds=30)
    assert second.status is ClaimStatus.CLAIMED
    assert job.join() is None  # the guard saw the loss, stopped the container, gave up
    assert fake.stopped == ["fake-1"]
    now = current(store, run.id)
    assert (now.status, now.attempt, now.worker_id) == (RunStatus.RUNNING, 2, "w2")
    first, live = store.attempts(run.id)
    assert first["error_code"] == ErrorCode.WORKER_LOST and first["exit_code"] is None
    assert live["status"] == "running"
    assert events == []


def test_a_run_ended_by_another_actor_keeps_that_end(make_executor: ExecutorMaker,
                                                     ledger: Ledger, new_run: NewRunMaker,
                                                     store: Store,
                                                     events: list[RunEnded]) -> None:
    fake = FakeSandbox(Script(block=True))
    run = new_run()
    job = InBackground(make_executor(fake), run.id, 1)
    started(fake)
    steal(ledger, store, run.id, Finish(RunStatus.DEAD_LETTER,
                                        error_code=ErrorCode.WORKER_LOST,
                                        error_stage="lease", error_message="taken back"))
    assert job.join() is None
    done = current(store, run.id)
    assert done.status is RunStatus.DEAD_LETTER and done.error_message == "taken back"
    assert events == [RunEnded(run.id, RunStatus.DEAD_LETTER, 1, ErrorCode.WORKER_LOST)]


class HangingLedger(Ledger):
    """A ledger whose lease renewals stop getting through once `cut` is set: each one
    then hangs (a connection into a cut network) until `heal` is set."""

    def __init__(self, store: Store, lifecycle: Lifecycle) -> None:
        super().__init__(store, lifecycle)
        self.cut, self.heal = threading.Event(), threading.Event()

    def heartbeat(self, run_id: str, attempt: int, *, lease_seconds: float) -> Any:
        if self.cut.is_set():
            self.heal.wait(WAIT)
        return super().heartbeat(run_id, attempt, lease_seconds=lease_seconds)


def test_a_worker_cut_off_fences_its_container_before_the_lease_ends(
        make_executor: ExecutorMaker, store: Store, lifecycle: Lifecycle,
        new_run: NewRunMaker, events: list[RunEnded]) -> None:
    ledger = HangingLedger(store, lifecycle)
    fake = FakeSandbox(Script(block=True))
    run = new_run()
    # Lease 4 s, stop grace 1 s: the container must be stopped within 4 - 1 - 2 = 1 s
    # of the last renewal, so the engine's SIGKILL lands before the lease can expire.
    job = InBackground(make_executor(fake, ledger=ledger, lease_seconds=4.0), run.id, 1)
    started(fake)
    lease = current(store, run.id).lease_expires_at
    assert lease is not None
    ledger.cut.set()
    cut_at = utcnow()
    wait_until(lambda: fake.stopped == ["fake-1"], timeout=WAIT, interval=0.01,
               message="the cut-off worker never stopped its container")
    stopped_at = utcnow()
    assert stopped_at - cut_at < timedelta(seconds=2.5)
    # The stop grace (1 s) is over before the last renewed lease ends.
    assert stopped_at + timedelta(seconds=1) < (current(store, run.id).lease_expires_at
                                                or stopped_at)
    ledger.heal.set()
    assert job.join() is None  # self-fenced: nothing recorded, the reconciler ends it
    assert current(store, run.id).status is RunStatus.RUNNING
    assert events == []


def test_an_executor_refuses_a_lease_too_short_to_fence(ledger: Ledger,
                                                       manifests: ManifestSource) -> None:
    with pytest.raises(ValueError, match="self-fence"):
        Executor(ledger=ledger, manifests=manifests, sandbox=FakeSandbox(), worker_id="w",
                 lease_seconds=6.0, stop_grace_seconds=5.0, heartbeat_seconds=1.0)


# Crashes and platform failures --------------------------------------------------------

@pytest.mark.parametrize(("retry", "status"), [
    (None, RunStatus.QUEUED), (NO_RETRY, RunStatus.DEAD_LETTER)],
    ids=["retried", "dead-letter"])
def test_a_worker_shutdown_records_worker_lost_and_reraises(
        retry: str | None, status: RunStatus, make_executor: ExecutorMaker,
        make_manifests: ManifestMaker, new_run: NewRunMaker, store: Store) -> None:
    manifests = make_manifests(retry=retry) if retry else make_manifests()
    fake = FakeSandbox(Script(raises=SystemExit(1), raise_at="wait"))
    run = new_run()
    with pytest.raises(SystemExit):
        make_executor(fake, manifests=manifests).execute(run.id, 1)
    after = current(store, run.id)
    assert after.status is status
    assert (after.error_code, after.error_stage) == (ErrorCode.WORKER_LOST, "shutdown")
    assert (after.next_attempt_at is not None) is (status is RunStatus.QUEUED)


def test_a_database_outage_mid_attempt_is_retried_as_worker_lost(
        make_executor: ExecutorMaker, new_run: NewRunMaker, store: Store) -> None:
    fake = FakeSandbox(Script(raises=ServiceUnavailableError("database down"),
                              raise_at="wait"))
    run = new_run()
    assert make_executor(fake).execute(run.id, 1) is RunStatus.QUEUED
    after = current(store, run.id)
    assert (after.error_code, after.error_stage) == (ErrorCode.WORKER_LOST, "database")


def test_a_bug_mid_attempt_is_a_dead_letter_and_reraised(make_executor: ExecutorMaker,
                                                         new_run: NewRunMaker,
                                                         store: Store) -> None:
    fake = FakeSandbox(Script(raises=RuntimeError("a bug"), raise_at="wait"))
    run = new_run()
    with pytest.raises(RuntimeError, match="a bug"):
        make_executor(fake).execute(run.id, 1)
    after = current(store, run.id)
    assert after.status is RunStatus.DEAD_LETTER
    assert (after.error_code, after.error_stage) == (ErrorCode.INTERNAL_ERROR, "worker")


@pytest.mark.parametrize("error", [
    DockerUnavailableError("gone", stage="start"),
    ImagePullError("gone", stage="pull"),
    DigestMismatchError("gone", stage="pull"),
], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("raise_at", ["create", "start"])
def test_a_platform_failure_is_recorded_with_its_error_code(
        error: SandboxError, raise_at: RaisePoint, make_executor: ExecutorMaker,
        new_run: NewRunMaker, store: Store, events: list[RunEnded]) -> None:
    fake = FakeSandbox(Script(raises=error, raise_at=raise_at))
    run = new_run()
    # The default test policy retries exit 75 and lost workers only: a platform
    # failure it does not retry is a dead letter.
    assert make_executor(fake).execute(run.id, 1) is RunStatus.DEAD_LETTER
    after = current(store, run.id)
    assert after.error_code == error.error_code
    assert after.error_stage == error.context["stage"] and after.error_message == "gone"
    assert store.attempts(run.id)[0]["container_id"] is None  # it never started
    assert events == [RunEnded(run.id, RunStatus.DEAD_LETTER, 1, error.error_code)]


def test_docker_unavailable_is_retried_when_the_policy_says_so(
        make_executor: ExecutorMaker, make_manifests: ManifestMaker, new_run: NewRunMaker,
        store: Store) -> None:
    manifests = make_manifests(retry="{max_attempts: 2, backoff: {initial: 0s}}")
    fake = FakeSandbox(Script(raises=DockerUnavailableError("gone", stage="start")))
    run = new_run()
    assert make_executor(fake, manifests=manifests).execute(run.id, 1) is RunStatus.QUEUED
    assert current(store, run.id).error_code == ErrorCode.DOCKER_UNAVAILABLE


def test_a_refused_start_keeps_the_receipt_as_evidence(make_executor: ExecutorMaker,
                                                       new_run: NewRunMaker,
                                                       store: Store) -> None:
    mismatch = "cpus: asked 0.5, engine reports 1.0"
    fake = FakeSandbox(Script(raises=SandboxMismatchError(mismatch, stage="create"),
                              mismatches=[mismatch]))
    run = new_run()
    assert make_executor(fake).execute(run.id, 1) is RunStatus.DEAD_LETTER
    assert current(store, run.id).error_code == ErrorCode.SANDBOX_MISMATCH
    provenance = store.attempts(run.id)[0]["provenance"]
    assert provenance is not None and provenance["mismatches"] == [mismatch]


# The launch-time allowlist check ------------------------------------------------------

@pytest.mark.parametrize("options", [{"image": OTHER_IMAGE}, {"name": "other"},
                                     {"version": "2.0.0"}],
                         ids=["re-pinned", "processor-removed", "version-removed"])
def test_a_run_no_longer_allowlisted_is_refused_without_a_container(
        options: dict[str, Any], make_executor: ExecutorMaker, make_manifests: ManifestMaker,
        new_run: NewRunMaker, store: Store) -> None:
    manifests = make_manifests(**options)
    fake = FakeSandbox()
    run = new_run()
    assert make_executor(fake, manifests=manifests).execute(
        run.id, 1) is RunStatus.DEAD_LETTER
    after = current(store, run.id)
    assert (after.error_code, after.error_stage) == (ErrorCode.IMAGE_NOT_ALLOWED, "launch")
    assert manifests.current().revision in (after.error_message or "")
    assert fake.specs == [] and fake.calls == []


def test_a_re_pin_is_seen_by_the_next_attempt(make_executor: ExecutorMaker,
                                              make_manifests: ManifestMaker,
                                              new_run: NewRunMaker, store: Store) -> None:
    manifests = make_manifests()
    fake = FakeSandbox(Script(exit_code=75))
    executor = make_executor(fake, manifests=manifests)
    run = new_run()
    assert executor.execute(run.id, 1) is RunStatus.QUEUED
    manifests.path.write_text(manifest_text(image=OTHER_IMAGE))  # hot reload
    assert executor.execute(run.id, 2) is RunStatus.DEAD_LETTER
    assert current(store, run.id).error_code == ErrorCode.IMAGE_NOT_ALLOWED
    assert len(fake.specs) == 1


# Jobs that are not ours ------------------------------------------------------------------

def test_jobs_that_cannot_be_claimed_return_none(make_executor: ExecutorMaker,
                                                 ledger: Ledger, new_run: NewRunMaker,
                                                 store: Store) -> None:
    fake = FakeSandbox()
    calls: list[str] = []
    executor = make_executor(fake, fault=calls.append)
    taken, backing_off, fresh = new_run(), new_run(), new_run()
    assert ledger.claim(taken.id, attempt=1, worker_id="other",
                        lease_seconds=30).status is ClaimStatus.CLAIMED
    assert ledger.claim(backing_off.id, attempt=1, worker_id="other",
                        lease_seconds=30).status is ClaimStatus.CLAIMED
    assert ledger.finish(backing_off.id, 1, Finish(
        RunStatus.QUEUED, error_code=ErrorCode.WORKER_LOST,
        next_attempt_at=utcnow() + timedelta(hours=1)))
    before = {r.id: current(store, r.id) for r in (taken, backing_off, fresh)}
    assert executor.execute(taken.id, 1) is None        # claimed already (a duplicate job)
    assert executor.execute(backing_off.id, 2) is None  # not due yet
    assert executor.execute(fresh.id, 2) is None        # not its next attempt
    assert executor.execute("0" * 36, 1) is None        # no such run
    assert {r: current(store, r) for r in before} == before
    assert fake.calls == []
    assert calls == ["before_claim"] * 4


def test_a_job_at_capacity_waits_for_a_slot(make_executor: ExecutorMaker, ledger: Ledger,
                                            make_manifests: ManifestMaker,
                                            new_run: NewRunMaker, store: Store) -> None:
    manifests = make_manifests(max_concurrency=1)
    fake = FakeSandbox()
    busy, waiting = new_run(), new_run()
    assert ledger.claim(busy.id, attempt=1, worker_id="other", lease_seconds=30,
                        max_concurrency=1).status is ClaimStatus.CLAIMED
    executor = make_executor(fake, manifests=manifests)
    assert executor.execute(waiting.id, 1) is None
    after = current(store, waiting.id)
    assert after.status is RunStatus.QUEUED
    assert fake.calls == []
    assert ledger.finish(busy.id, 1, Finish(RunStatus.SUCCEEDED))  # wakes the parked run
    assert executor.execute(waiting.id, 1) is RunStatus.SUCCEEDED


# The fault hook --------------------------------------------------------------------------

def test_the_fault_hook_is_called_at_each_point(make_executor: ExecutorMaker,
                                                new_run: NewRunMaker) -> None:
    calls: list[str] = []
    run = new_run()
    assert make_executor(FakeSandbox(), fault=calls.append).execute(
        run.id, 1) is RunStatus.SUCCEEDED
    assert calls == ["before_claim", "after_claim", "after_container_exit"]
    assert set(calls) == FAULT_POINTS


def test_a_fault_after_the_claim_leaves_the_run_to_the_reconciler(
        make_executor: ExecutorMaker, new_run: NewRunMaker, store: Store) -> None:
    def crash(point: str) -> None:
        if point == "after_claim":
            raise RuntimeError("killed after the claim")

    fake = FakeSandbox()
    run = new_run()
    with pytest.raises(RuntimeError):
        make_executor(fake, fault=crash).execute(run.id, 1)
    after = current(store, run.id)
    assert after.status is RunStatus.RUNNING and after.lease_expires_at is not None
    assert fake.calls == []
