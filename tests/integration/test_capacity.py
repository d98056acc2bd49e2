"""A saturated processor costs nothing while it waits: 1,000 queued runs of a
`max_concurrency: 5` processor whose five slots are all held are parked (not
retried on a timer), so the database stays quiet and another tenant's run waits no
longer than it did before the backlog."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import make_url

from runner.control.lifecycle import ClaimStatus, Lifecycle
from runner.control.queue import RunQueue
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.domain import RunStatus
from runner.manifest import load_manifest
from runner.settings import Settings
from tests.integration.reliability import blocked_on_an_empty_queue, submit_rel, wait_terminal
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_until

StartWorker = Callable[..., WorkerProcess]
BACKLOG = 1000
CAP = 5


def queue_wait_seconds(store: Store, settings: Settings, samples: int = 5) -> float:
    """The worst wait, submit to start, of a few runs of another tenant, one at a time."""
    worst = 0.0
    for _ in range(samples):
        run = submit_rel(store, settings, "rel-echo", {"message": "other tenant"})
        final = wait_terminal(store, run.id, timeout=120)
        assert final.status is RunStatus.SUCCEEDED and final.started_at is not None
        worst = max(worst, (final.started_at - run.created_at).total_seconds())
    return worst


def commits_per_second(database_url: str, seconds: float = 5.0) -> float:
    """Transactions committed per second in the test database (pg_stat_database)."""
    url = make_url(database_url)
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    query = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        before = conn.execute(query).fetchone()[0]  # type: ignore[index]
        time.sleep(seconds)  # a rate is measured over time, not waited on
        conn.execute("SELECT pg_stat_clear_snapshot()")
        after = conn.execute(query).fetchone()[0]  # type: ignore[index]
    return (after - before) / seconds


def test_a_thousand_runs_at_capacity_stay_parked_and_starve_nobody(
        start_worker: StartWorker, store: Store, rel_settings: Settings) -> None:
    worker = start_worker("capacity")
    baseline_wait = queue_wait_seconds(store, rel_settings)
    idle_rate = commits_per_second(rel_settings.database_url)

    # Five runs hold the five slots for as long as the test lasts (a live lease, no
    # container): the processor is saturated.
    lifecycle = Lifecycle(store)
    manifest = load_manifest(rel_settings.manifest)
    queue = RunQueue.from_url(rel_settings.redis_url)
    parked = RunQueue.from_url(rel_settings.redis_url)
    for _ in range(CAP):
        holder = submit(Submission(tenant="holder", processor="capped5", version=None,
                                   input={}), manifest=manifest, store=store, queue=parked,
                        default_queue="parked-nobody-serves", stop_grace_seconds=1)
        got = lifecycle.claim(holder.id, attempt=1, worker_id="holder", lease_seconds=900,
                              max_concurrency=CAP)
        assert got.status is ClaimStatus.CLAIMED
    backlog = [submit(Submission(tenant="flood", processor="capped5", version=None,
                                 input={"n": n}), manifest=manifest, store=store, queue=queue,
                      default_queue=rel_settings.queue, stop_grace_seconds=1)
               for n in range(BACKLOG)]
    # The worker takes each job once and parks its run.
    wait_until(lambda: store.count_parked("capped5") == BACKLOG, timeout=240, interval=0.5,
               message=lambda: f"{store.count_parked('capped5')} of {BACKLOG} runs parked")
    wait_until(lambda: blocked_on_an_empty_queue(rel_settings.redis_url, rel_settings.queue),
               timeout=60, interval=0.2, message="the worker's queue never emptied")
    redeliveries_before = worker.log().count('"run_not_claimed"')
    busy_rate = commits_per_second(rel_settings.database_url)
    # Parked runs are not delivered again: before, each came back about once a second
    # (1,000 failed claims a second, each several statements).
    redelivered = worker.log().count('"run_not_claimed"') - redeliveries_before
    busy_wait = queue_wait_seconds(store, rel_settings)
    still_queued = sum(1 for run in backlog[:50]
                       if (r := store.get_run(run.id)) is not None
                       and r.status is RunStatus.QUEUED and r.attempt == 0)
    print(f"\nqueue wait of another tenant: {baseline_wait:.3f}s before the backlog, "
          f"{busy_wait:.3f}s with {BACKLOG} runs at capacity; database commits/s: "
          f"{idle_rate:.1f} idle, {busy_rate:.1f} at capacity")
    assert still_queued == 50  # nothing of the backlog ran: the cap held
    assert redelivered == 0
    assert busy_wait <= 3 * baseline_wait + 1.0
    # What remains is heartbeats and requeue passes (generous: other tests' processes
    # share this database); a spinning backlog costs thousands of commits a second.
    assert busy_rate <= 5 * idle_rate + 300
