"""The store's reports (runner/control/reports.py) on a SQLite file: each named query
answers with plain data, and counts what `runner ops` and `/metrics` show."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from api.metrics import ApiMetrics
from runner.control.lifecycle import ClaimStatus, Lifecycle
from runner.control.migrate import upgrade
from runner.control.store import Store
from runner.domain import ErrorCode, Finish, NewRun, Run, RunStatus, utcnow
from runner.manifest import ManifestSource

LATER = timedelta(seconds=1)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    store = Store(url)
    yield store
    store.close()


def submit(store: Store, processor: str = "p1", tenant: str = "t1", queue: str = "runner",
           **extra: Any) -> Run:
    run, created = store.create_run(NewRun(
        tenant=tenant, processor=processor, version="1.0", image="img@sha256:0",
        queue=queue, input={}, timeout_seconds=60, max_attempts=1,
        manifest_revision="rev", **extra))
    assert created
    return run


def start(store: Store, run: Run, *, output: bytes = b"") -> None:
    claim = Lifecycle(store).claim(run.id, attempt=1, worker_id="w1", lease_seconds=30)
    assert claim.status is ClaimStatus.CLAIMED
    if output:
        store.append_log(run.id, 1, offset=0, data=output)


def end(store: Store, run: Run, status: RunStatus, *, output: bytes = b"",
        error_code: str | None = None, log_truncated: bool = False) -> None:
    start(store, run, output=output)
    assert Lifecycle(store).finish(run.id, 1, Finish(status, error_code=error_code,
                                                     log_truncated=log_truncated))


def cancel(store: Store, run: Run) -> None:
    assert Lifecycle(store).end_queued(run.id, RunStatus.CANCELED, error_code=ErrorCode.CANCELED,
                                       message="canceled", stage="queue")


def test_runs_are_counted_by_status_processor_and_active_states(store: Store) -> None:
    assert store.count_runs_by_status() == {}
    submit(store)
    submit(store, "p2")
    start(store, submit(store))
    end(store, submit(store, "p2"), RunStatus.SUCCEEDED)
    cancel(store, submit(store))
    assert store.count_runs_by_status() == {"queued": 2, "running": 1, "succeeded": 1,
                                            "canceled": 1}
    active = ("queued", "running")
    assert store.count_runs_by_status(statuses=active) == {"queued": 2, "running": 1}
    assert store.count_runs_by_status(statuses=active, processor="p2") == {"queued": 1}
    assert store.count_runs_by_status(statuses=active, processor="p3") == {}


def test_queued_and_running_runs_are_snapshots(store: Store) -> None:
    a = submit(store)
    b = submit(store, "p2", "t2", queue="other")
    first, second = submit(store), submit(store, "p2")
    start(store, first)
    start(store, second)
    cancel(store, submit(store, queue="gone"))

    queued = store.queued_runs()
    assert sorted(r.id for r in queued) == sorted([a.id, b.id])
    assert all(isinstance(r, Run) and r.status is RunStatus.QUEUED for r in queued)
    running = store.running_runs()
    assert [r.id for r in running] == [first.id, second.id]  # the longest running first
    assert all(r.started_at is not None and r.started_at.tzinfo is not None
               and r.lease_expires_at is not None for r in running)

    assert sorted(store.queued_run_ids(processor="p1")) == [a.id]
    assert store.queued_run_ids(tenant="t2") == [b.id]
    assert store.queued_run_ids(processor="p1", tenant="t2") == []
    assert sorted(store.queued_run_ids()) == sorted([a.id, b.id])
    # Every queue any run was sent to, whatever became of the run.
    assert store.run_queues() == {"runner", "other", "gone"}


def test_dead_letters_are_listed_counted_and_joined_to_their_replays(store: Store) -> None:
    since = utcnow() - LATER
    boom = submit(store)
    end(store, boom, RunStatus.DEAD_LETTER, error_code="nonzero_exit")
    slow = submit(store, "p2", "t2")
    end(store, slow, RunStatus.DEAD_LETTER, error_code="timeout")
    also = submit(store)
    end(store, also, RunStatus.DEAD_LETTER, error_code="nonzero_exit")
    end(store, submit(store), RunStatus.FAILED, error_code="nonzero_exit")  # not a dead letter
    retried = submit(store, replay_of=boom.id)
    fixed = submit(store, "p2", "t2", replay_of=slow.id)
    end(store, fixed, RunStatus.SUCCEEDED)

    found = store.dead_letters(since=since)
    assert [r.id for r in found] == sorted([boom.id, slow.id, also.id])  # by id: by age
    assert all(isinstance(r, Run) and r.status is RunStatus.DEAD_LETTER for r in found)
    assert [r.id for r in store.dead_letters(since=since, processor="p2")] == [slow.id]
    assert [r.id for r in store.dead_letters(since=since, error_code="nonzero_exit")] == sorted(
        [boom.id, also.id])
    assert store.dead_letters(since=since, processor="p2", error_code="nonzero_exit") == []
    assert store.dead_letters(since=utcnow() + LATER) == []

    assert sorted(store.dead_letter_counts(since=since)) == [("p1", "nonzero_exit", 2),
                                                             ("p2", "timeout", 1)]
    assert store.dead_letter_counts(since=utcnow() + LATER) == []

    assert sorted(store.replays_of([boom.id, slow.id, also.id])) == sorted([
        (boom.id, retried.id, "queued"), (slow.id, fixed.id, "succeeded")])
    assert store.replays_of([also.id]) == []
    assert store.replays_of([]) == []


def test_stored_logs_are_measured_by_processor_run_and_truncation(store: Store) -> None:
    assert store.stored_log_bytes() == 0
    assert store.log_bytes_by_processor() == {}
    assert store.top_runs_by_log_bytes() == {}
    big, small, tiny = submit(store), submit(store, "p2"), submit(store, "p3")
    start(store, big, output=b"x" * 100)
    end(store, small, RunStatus.SUCCEEDED, output=b"y" * 50, log_truncated=True)
    end(store, tiny, RunStatus.FAILED, output=b"z" * 7)
    end(store, submit(store), RunStatus.SUCCEEDED, output=b"w" * 30)

    assert store.stored_log_bytes() == 187
    assert list(store.log_bytes_by_processor().items()) == [("p1", 130), ("p2", 50),
                                                            ("p3", 7)]
    assert store.log_bytes_by_processor(limit=1) == {"p1": 130}
    top = store.top_runs_by_log_bytes(limit=2)
    assert list(top.items()) == [(big.id, 100), (small.id, 50)]
    day_ago = utcnow() - timedelta(days=1)
    assert store.truncated_runs_by_processor(since=day_ago) == {"p2": 1}
    assert store.truncated_runs_by_processor(since=utcnow() + LATER) == {}
    assert store.database_bytes() is None  # SQLite: the caller measures the file


def test_logs_of_ended_runs_are_counted_then_deleted(store: Store) -> None:
    live, done, failed = submit(store), submit(store, "p2"), submit(store)
    start(store, live, output=b"a" * 10)
    end(store, done, RunStatus.SUCCEEDED, output=b"b" * 20)
    end(store, failed, RunStatus.FAILED, output=b"c" * 30)
    store.append_log(failed.id, 1, offset=30, data=b"late")  # fenced: the attempt ended
    cutoff = utcnow() + LATER

    assert store.logs_ended_before(cutoff=utcnow() - timedelta(hours=1)) == (0, 0)
    assert store.logs_ended_before(cutoff=cutoff) == (2, 50)
    assert store.logs_ended_before(cutoff=cutoff, processor="p2") == (1, 20)
    assert store.delete_logs_ended_before(cutoff=cutoff, processor="p2") == (1, 20)
    assert store.read_logs(done.id) == b""
    assert store.delete_logs_ended_before(cutoff=cutoff) == (1, 30)
    assert store.logs_ended_before(cutoff=cutoff) == (0, 0)
    assert store.delete_logs_ended_before(cutoff=cutoff) == (0, 0)
    # The running run keeps its output, and the runs themselves stay.
    assert store.stored_log_bytes() == 10
    assert store.read_logs(live.id) == b"a" * 10
    assert store.count_runs_by_status() == {"running": 1, "succeeded": 1, "failed": 1}


class _Down:
    def __getattr__(self, name: str) -> Any:
        raise ConnectionError(name)


def test_the_metrics_gauge_counts_runs_by_status(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text("version: 1\nprocessors: []\n")
    submit(store)
    submit(store)
    end(store, submit(store), RunStatus.SUCCEEDED)

    def gauges(services_store: Any) -> dict[str, dict[tuple[Any, ...], float]]:
        services = SimpleNamespace(manifests=ManifestSource(path), store=services_store,
                                   queue=SimpleNamespace(redis=_Down(),
                                                         depths=lambda names: _Down().x),
                                   settings=SimpleNamespace(queue="runner"))
        registry = ApiMetrics(services).registry  # type: ignore[arg-type]
        return {family.name: {tuple(s.labels.items()): s.value for s in family.samples}
                for family in registry.collect()
                if family.name in ("runner_runs", "runner_database_up")}

    assert gauges(store) == {
        "runner_runs": {(("status", "queued"),): 2, (("status", "succeeded"),): 1},
        "runner_database_up": {(): 1}}
    assert gauges(_Down()) == {"runner_runs": {}, "runner_database_up": {(): 0}}


def test_retention_deletes_old_ended_runs_in_batches_and_keeps_the_rest(store: Store) -> None:
    old = [submit(store) for _ in range(5)]
    for run in old:
        end(store, run, RunStatus.SUCCEEDED, output=b"old output")
    queued, running = submit(store), submit(store)
    start(store, running, output=b"live")
    recent = submit(store)
    end(store, recent, RunStatus.FAILED)
    cutoff = utcnow() + LATER  # every run that ended so far ended before it
    assert store.count_runs_ended_before(cutoff=cutoff) == 6
    assert store.prune_runs_ended_before(cutoff=cutoff, batch=4) == 4
    assert store.prune_runs_ended_before(cutoff=cutoff, batch=4) == 2
    assert store.prune_runs_ended_before(cutoff=cutoff, batch=4) == 0
    for run in [*old, recent]:
        assert store.get_run(run.id) is None
        assert store.attempts(run.id) == [] and store.read_logs(run.id) == b""
    # Queued and running runs are never deleted, whatever their age.
    assert store.get_run(queued.id) is not None
    assert store.read_logs(running.id) == b"live"


def test_retention_keeps_runs_that_ended_after_the_cutoff(store: Store) -> None:
    early = submit(store)
    end(store, early, RunStatus.SUCCEEDED)
    cutoff = utcnow()
    late = submit(store)
    end(store, late, RunStatus.SUCCEEDED)  # ends after the cutoff
    assert store.prune_runs_ended_before(cutoff=cutoff) == 1
    assert store.get_run(early.id) is None and store.get_run(late.id) is not None


def test_the_runs_gauge_counts_at_most_once_per_ttl(store: Store, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """Regression: every unauthenticated scrape ran a GROUP BY over all runs."""
    from api.metrics import RunsCollector

    calls: list[int] = []
    real = store.count_runs_by_status

    def counted(**kwargs: Any) -> dict[str, int]:
        calls.append(1)
        return real(**kwargs)

    monkeypatch.setattr(store, "count_runs_by_status", counted)
    collector = RunsCollector(store, ttl=3600)
    submit(store)
    for _ in range(20):
        families = list(collector.collect())
    assert len(calls) == 1
    assert families[0].samples[0].value == 1
