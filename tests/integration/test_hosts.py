"""Several worker hosts on one machine, each in a network namespace of its own with a
Docker engine of its own (tests/support/hosts.py), sharing one PostgreSQL and one
Redis that they reach only over their link."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from runner.control.models import LogChunkRow
from runner.control.queue import RunQueue, served_queues, unserved
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.domain import Run
from runner.manifest import ManifestSource
from runner.settings import Settings
from tests.integration.conftest import PG_URL, REDIS_URL, SESSION, write_manifest
from tests.support.hosts import Host, Hosts
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    services = {"postgres": urlsplit(PG_URL).port or 5432,
                "redis": urlsplit(REDIS_URL).port or 6379}
    made = Hosts(3, session=SESSION, services=services)
    try:
        yield made
    finally:
        made.close()
        assert made.leftovers() == [], "the hosts left something behind"


@pytest.fixture(scope="module")
def host_settings(settings: Settings, published: dict[str, dict[str, Any]],
                  tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The session's settings on a queue of the hosts' own (no other worker serves it),
    with short leases (a 5 s lease, a 1 s stop grace: a cut worker fences after 2 s),
    and a manifest whose `sleep` is retried once after a lost worker and whose
    `sleep-gpu` needs a host tagged gpu."""
    retry = {"max_attempts": 2, "backoff": {"initial": "0s", "max": "0s"},
             "on": ["worker_lost"]}
    entries = {"echo": published["echo"], "sleep": {**published["sleep"], "retry": retry},
               "sleep-gpu": {**published["sleep"], "name": "sleep-gpu", "require": ["gpu"]}}
    manifest = write_manifest(tmp_path_factory.mktemp("hosts") / "manifest.yaml", entries)
    return settings.model_copy(update={
        "queue": f"hosts-{SESSION}", "worker_id": f"hosts-{SESSION}", "manifest": manifest,
        "lease_seconds": 5.0, "heartbeat_seconds": 0.5, "stop_grace_seconds": 1.0,
        "reconcile_interval_seconds": 1.0, "reconcile_grace_seconds": 1.0})


@pytest.fixture
def workers(hosts: Hosts, host_settings: Settings, tmp_path: Path) -> Iterator[Hosts]:
    """One worker on each host (host3 tagged gpu), stopped after the test."""
    for host in hosts:
        tags = {"RUNNER_HOST_TAGS": "gpu"} if host.name == "host3" else {}
        host.start_worker(host_settings, tmp_path, extra=tags)
    try:
        yield hosts
    finally:
        for host in hosts:
            host.heal()
            host.stop_workers()


def submit_runs(store: Store, settings: Settings, processor: str, count: int,
                **input: Any) -> list[str]:
    manifests = ManifestSource(settings.manifest)
    queue = RunQueue.from_url(settings.redis_url)
    return [submit(Submission(tenant="acme", processor=processor, version=None, input=input),
                   manifest=manifests.current(), store=store, queue=queue,
                   default_queue=settings.queue, stop_grace_seconds=1).id
            for _ in range(count)]


def ended(store: Store, ids: list[str], timeout: float = 120) -> list[Run]:
    def done() -> list[Run]:  # empty (not done) until every run has ended
        runs = [store.get_run(i) for i in ids]
        return [r for r in runs if r is not None] if all(
            r is not None and r.status.terminal for r in runs) else []
    found: list[Run] = wait_until(done, timeout=timeout, message=f"runs {ids} did not end")
    return found


def host_of(hosts: Hosts, name: str) -> Host:
    return next(h for h in hosts if h.name == name)


def created_in(host: Host, run_ids: set[str], since: float) -> set[str]:
    """The runs whose containers this host's engine created since `since`."""
    done = host.engine.docker("events", "--since", str(int(since)), "--until",
                              str(int(time.time()) + 1), "--filter", "event=create",
                              "--format", "{{json .Actor.Attributes}}")
    found = set()
    for line in done.stdout.splitlines():
        run_id = json.loads(line).get("io.container-runner.run-id")
        if run_id in run_ids:
            found.add(run_id)
    return found


def test_a_host_reaches_only_its_link(hosts: Hosts) -> None:
    host = hosts[0]
    probe = ("import socket,sys\n"
             "def can(a, p):\n"
             "    s = socket.socket(); s.settimeout(2)\n"
             "    try: s.connect((a, p)); return True\n"
             "    except OSError: return False\n"
             f"print(can('127.0.0.1', {urlsplit(PG_URL).port}), "
             f"can('{host.gateway}', {urlsplit(PG_URL).port}))\n")
    done = subprocess.run([*host.prefix(), "-c", probe], capture_output=True, text=True,
                          timeout=30)
    assert done.stdout.split() == ["False", "True"], done.stdout + done.stderr


def test_runs_spread_over_the_hosts_and_each_runs_in_its_own_engine(
        workers: Hosts, host_settings: Settings, store: Store) -> None:
    since = time.time() - 1
    ids = submit_runs(store, host_settings, "sleep", 9, seconds=1)
    for run in ended(store, ids, timeout=180):
        assert run.status.value == "succeeded", run
        assert len(store.attempts(run.id)) == 1
    per_host = {host.name: created_in(host, set(ids), since) for host in workers}
    # Every run's container was made by exactly one engine: the one of its host.
    assert sorted(i for found in per_host.values() for i in found) == sorted(ids)
    for host in workers:
        ran_here = {i for i in ids if store.attempts(i)[0]["host_id"] == host.name}
        assert per_host[host.name] == ran_here, host.name
        assert ran_here, f"{host.name} ran nothing"
        assert host.engine.containers() == []


def running_on(store: Store, run_id: str) -> str | None:
    run = store.get_run(run_id)
    attempts = store.attempts(run_id)
    if run is None or run.status.value != "running" or not attempts:
        return None
    return str(attempts[-1]["host_id"])


def live_containers(host: Host, run_id: str) -> list[str]:
    done = host.engine.docker("ps", "-q", "--filter",
                              f"label=io.container-runner.run-id={run_id}", check=False)
    return done.stdout.split()


def test_a_cut_host_fences_its_run_which_is_retried_elsewhere_exactly_once(
        workers: Hosts, host_settings: Settings, store: Store) -> None:
    [run_id] = submit_runs(store, host_settings, "sleep", 1, seconds=8)
    def started_on() -> str | None:
        name = running_on(store, run_id)
        return name if name and live_containers(host_of(workers, name), run_id) else None

    name = wait_until(started_on, timeout=60, message="the run never started")
    assert name is not None
    cut = host_of(workers, name)
    cut_worker = cut.workers[0]
    logged = len(cut_worker.log())
    cut.cut()
    cut_at = time.monotonic()
    wait_until(lambda: not live_containers(cut, run_id), timeout=30, interval=0.05,
               message="the cut host never stopped its container")
    gone_after = time.monotonic() - cut_at
    # The container is gone before the lease (5 s after the last renewal) can expire.
    assert gone_after < host_settings.lease_seconds, gone_after
    final = ended(store, [run_id], timeout=120)[0]
    attempts = store.attempts(run_id)
    assert final.status.value == "succeeded", final
    assert [a["number"] for a in attempts] == [1, 2]
    assert attempts[0]["error_code"] == "worker_lost" and attempts[1]["host_id"] != name
    retry_after = (attempts[1]["started_at"] - attempts[0]["started_at"]).total_seconds()
    print(f"fencing: container gone {gone_after:.2f} s after the cut; the retry started "
          f"{retry_after:.2f} s after the first attempt (lease {host_settings.lease_seconds:g} s)")
    with store.session() as session:
        before = session.query(LogChunkRow).filter(LogChunkRow.run_id == run_id).count()
    cut.heal()
    wait_until(lambda: cut_worker.events("attempt_abandoned", since=logged, run_id=run_id),
               timeout=60, message="the healed worker never gave its attempt up")
    assert cut_worker.events("attempt_fenced", since=logged, run_id=run_id)
    with store.session() as session:
        after = session.query(LogChunkRow).filter(LogChunkRow.run_id == run_id).count()
    assert after == before  # the old worker wrote nothing once it was back
    assert store.attempts(run_id) == attempts and store.get_run(run_id) == final
    assert live_containers(cut, run_id) == []


def test_a_tagged_run_runs_only_on_a_host_with_the_tag_and_waits_for_it(
        workers: Hosts, host_settings: Settings, store: Store, tmp_path: Path) -> None:
    tagged = submit_runs(store, host_settings, "sleep-gpu", 3, seconds=0.2)
    for run in ended(store, tagged):
        assert run.status.value == "succeeded" and run.queue.endswith("@gpu"), run
        assert store.attempts(run.id)[0]["host_id"] == "host3"
    gpu_host = host_of(workers, "host3")
    gpu_host.cut()
    [waiting] = submit_runs(store, host_settings, "sleep-gpu", 1, seconds=0.2)
    # Untagged work goes on on the other hosts meanwhile; the tagged run waits.
    plain = submit_runs(store, host_settings, "sleep", 2, seconds=0.2)
    assert all(r.status.value == "succeeded" for r in ended(store, plain))
    still = store.get_run(waiting)
    assert still is not None and still.status.value == "queued"
    gpu_host.heal()
    done = ended(store, [waiting], timeout=120)[0]
    assert done.status.value == "succeeded"
    assert store.attempts(waiting)[0]["host_id"] == "host3"

    # With the only gpu host's worker gone, a gpu run is shown as unserved (the
    # runner_runs_unserved metric and runner ops status read this), then runs once a
    # worker with the tag is back.
    gpu_host.stop_workers()
    [orphan] = submit_runs(store, host_settings, "sleep-gpu", 1, seconds=0.2)
    redis = RunQueue.from_url(host_settings.redis_url).redis
    gpu_queue = f"{host_settings.queue}@gpu"
    assert unserved(store.queued_by_queue(), served_queues(redis)).get(gpu_queue) == 1
    gpu_host.start_worker(host_settings, tmp_path, extra={"RUNNER_HOST_TAGS": "gpu"})
    assert ended(store, [orphan])[0].status.value == "succeeded"
    assert gpu_queue not in unserved(store.queued_by_queue(), served_queues(redis))


def test_a_killed_host_loses_nothing_and_sweeps_its_engine_when_it_is_back(
        workers: Hosts, host_settings: Settings, store: Store, tmp_path: Path) -> None:
    [run_id] = submit_runs(store, host_settings, "sleep", 1, seconds=6)
    name = wait_until(lambda: running_on(store, run_id), timeout=60,
                      message="the run never started")
    assert name is not None
    dead = host_of(workers, name)
    wait_until(lambda: live_containers(dead, run_id), timeout=30)
    dead.kill()  # its workers, its engine and the container, all at once
    final = ended(store, [run_id], timeout=120)[0]
    attempts = store.attempts(run_id)
    assert final.status.value == "succeeded", final
    assert attempts[0]["error_code"] == "worker_lost" and attempts[1]["host_id"] != name
    assert len(attempts) == 2
    # Back up: its engine still holds the dead attempt's container, until the host's
    # reconciler removes it.
    dead.workers.clear()
    dead.engine.start()
    assert dead.engine.containers(), "the killed engine kept no container to sweep"
    dead.start_worker(host_settings, tmp_path)
    wait_until(lambda: not dead.engine.containers(), timeout=60,
               message="the restarted host never swept its engine")


def test_postgres_restarted_while_every_host_runs_ends_each_run_once(
        workers: Hosts, host_settings: Settings, store: Store) -> None:
    ids = submit_runs(store, host_settings, "sleep", 6, seconds=2)
    wait_until(lambda: sum(running_on(store, i) is not None for i in ids) >= 2, timeout=60,
               message="the hosts never started the runs")
    restart = subprocess.run(["bash", "scripts/services.sh", "restart", "postgres"],
                             capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parents[2])
    assert restart.returncode == 0, restart.stderr
    runs = ended(store, ids, timeout=180)
    for run in runs:
        attempts = store.attempts(run.id)
        # Each ended once: one final status; an attempt cut off by the restart was
        # retried (worker_lost) and the retry ended it, never two attempts at once.
        assert run.status.value == "succeeded", (run, attempts)
        assert [a["number"] for a in attempts] == list(range(1, len(attempts) + 1))
        assert all(a["finished_at"] is not None for a in attempts)
    for host in workers:
        wait_until(lambda h=host: not h.engine.containers(), timeout=60)
