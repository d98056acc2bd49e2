"""The reconciler fences an expired attempt before it kills anything: PostgreSQL is
stalled (a proxy holds every byte, connections stay open) past the lease with ten runs
in flight, and the lease renewals that were waiting land in the middle of a
reconciler pass. Every run must end succeeded, retried at most as `worker_lost`;
none may lose its container to the reconciler and end `internal_error` or
`nonzero_exit` (what killing first, then fencing, did)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from runner.control.ledger import Ledger
from runner.control.lifecycle import Lifecycle
from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.domain import Run, RunStatus, utcnow
from runner.execution.reconciler import Reconciler
from runner.execution.wiring import sandbox_config
from runner.manifest import ManifestSource
from runner.sandbox import Sandbox
from runner.settings import Settings
from tests.integration.reliability import TcpProxy, submit_rel, wait_terminal
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_until

StartWorker = Callable[..., WorkerProcess]

RUNS = 10
WORKERS = 3


class RenewedMidPass(Ledger):
    """The real ledger; right after a pass reads the expired leases, the stalled
    database is let go and the test waits until a waiting renewal has landed."""

    def __init__(self, store: Store, proxy: TcpProxy) -> None:
        super().__init__(store, Lifecycle(store))
        self.proxy = proxy
        self.read: list[Run] = []

    def expired_leases(self) -> list[Run]:
        found = super().expired_leases()
        if found and not self.read:
            self.read = found
            self.proxy.resume()

            def renewed() -> bool:
                now = utcnow()
                return any((r := self.store.get_run(run.id)) is not None
                           and r.lease_expires_at is not None and r.lease_expires_at > now
                           for run in found)

            wait_until(renewed, timeout=30, interval=0.05,
                       message="no stalled worker renewed its lease after the stall")
        return found


@pytest.fixture
def db_proxy(rel_settings: Settings) -> Iterator[TcpProxy]:
    url = make_url(rel_settings.database_url)
    assert url.host is not None and url.port is not None
    proxy = TcpProxy(url.host, url.port)
    proxy.up()
    yield proxy
    proxy.resume()
    proxy.down()


def test_a_stalled_database_past_the_lease_loses_no_container(
        start_worker: StartWorker, store: Store, rel_settings: Settings,
        db_proxy: TcpProxy) -> None:
    through_proxy = make_url(rel_settings.database_url).set(
        host="127.0.0.1", port=db_proxy.port).render_as_string(hide_password=False)
    # The workers' own reconcilers also go through the stalled proxy; the test's pass
    # below, on a direct connection, is the one that finds the expired leases.
    for index in range(WORKERS):
        # Same deployment name as a direct connection's, so the pass below sees (and
        # could kill) their containers.
        start_worker(f"fenced-{index}", env={"RUNNER_DATABASE_URL": through_proxy,
                                             "RUNNER_INSTANCE_NAME": rel_settings.instance})
    runs = [submit_rel(store, rel_settings, "slow", {"seconds": 4}) for _ in range(RUNS)]

    def running() -> list[Run]:
        found = [r for run in runs if (r := store.get_run(run.id)) is not None
                 and r.status is RunStatus.RUNNING]
        return found if len(found) >= WORKERS else []

    in_flight = wait_until(running, timeout=120, message="the workers never all ran a run")
    db_proxy.pause()

    def leases_expired() -> bool:
        now = utcnow()
        return all((r := store.get_run(run.id)) is not None and r.lease_expires_at is not None
                   and r.lease_expires_at < now for run in in_flight)

    wait_until(leases_expired, timeout=rel_settings.lease_seconds + 30, interval=0.1,
               message="the stalled workers' leases never expired")
    ledger = RenewedMidPass(store, db_proxy)
    reconciler = Reconciler(
        ledger=ledger, queue=RunQueue.from_url(rel_settings.redis_url),
        sandbox=Sandbox.from_env(sandbox_config(rel_settings)),
        manifests=ManifestSource(rel_settings.manifest),
        grace_seconds=rel_settings.reconcile_grace_seconds,
        stop_grace_seconds=rel_settings.stop_grace_seconds, lock_seconds=30)
    reconciler.run_once()
    assert ledger.read, "the pass read no expired lease"

    finals = [wait_terminal(store, run.id, timeout=240) for run in runs]
    attempts: dict[str, list[dict[str, Any]]] = {r.id: store.attempts(r.id) for r in finals}
    summary = {r.id: (r.status.value, [a["error_code"] for a in attempts[r.id]])
               for r in finals}
    assert all(r.status is RunStatus.SUCCEEDED for r in finals), summary
    codes = {a["error_code"] for tried in attempts.values() for a in tried}
    assert codes <= {None, "worker_lost"}, summary
