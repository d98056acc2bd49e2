"""Several worker hosts on one machine, each in a network namespace of its own with a
Docker engine of its own (tests/support/hosts.py), sharing one PostgreSQL and one
Redis that they reach only over their link."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from runner.control.queue import RunQueue
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.manifest import ManifestSource
from runner.settings import Settings
from tests.integration.conftest import PG_URL, REDIS_URL, SESSION
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
def host_settings(settings: Settings) -> Settings:
    """The session's settings on a queue of the hosts' own (no other worker serves it)."""
    return settings.model_copy(update={"queue": f"hosts-{SESSION}",
                                       "worker_id": f"hosts-{SESSION}"})


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
        hosts: Hosts, host_settings: Settings, store: Store, tmp_path: Path) -> None:
    for host in hosts:
        host.start_worker(host_settings, tmp_path)
    try:
        since = time.time() - 1
        manifests = ManifestSource(host_settings.manifest)
        queue = RunQueue.from_url(host_settings.redis_url)
        runs = [submit(Submission(tenant="acme", processor="sleep", version=None,
                                  input={"seconds": 1}),
                       manifest=manifests.current(), store=store, queue=queue,
                       default_queue=host_settings.queue, stop_grace_seconds=1)
                for _ in range(9)]
        ids = {run.id for run in runs}

        def ended() -> bool:
            return all((r := store.get_run(i)) is not None and r.status.terminal for i in ids)

        wait_until(ended, timeout=180, message="the hosts did not finish their runs")
        by_worker: Counter[str] = Counter()
        for run_id in ids:
            final = store.get_run(run_id)
            assert final is not None and final.status.value == "succeeded", final
            attempts = store.attempts(run_id)
            assert len(attempts) == 1
            by_worker[attempts[0]["worker_id"]] += 1
        per_host = {host.name: created_in(host, ids, since) for host in hosts}
        # Every run's container was made by exactly one engine: the one of its worker.
        assert sorted(i for found in per_host.values() for i in found) == sorted(ids)
        for host in hosts:
            ran_here = {i for i in ids
                        if store.attempts(i)[0]["worker_id"].startswith(
                            f"{host_settings.worker_id}-{host.name}-")}
            assert per_host[host.name] == ran_here, host.name
            assert ran_here, f"{host.name} ran nothing: {by_worker}"
            assert host.engine.containers() == []
    finally:
        for host in hosts:
            host.stop_workers()
