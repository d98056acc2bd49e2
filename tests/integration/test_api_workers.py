"""`runner api --workers N`: several real API processes behind one port (uvicorn's
supervisor), each with its own app built from the environment."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runner.control.keys import KEY_CACHE_SECONDS, Keys
from runner.control.store import Store
from runner.domain import Role
from runner.settings import Settings
from tests.support.net import free_port
from tests.support.processes import RunnerProcess, child_env
from tests.support.waiting import wait_until

WORKERS = 2


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def serving(pid: int) -> list[int]:
    """The API processes under the supervisor `pid` (multiprocessing may add a helper
    of its own, which serves nothing and is left out)."""
    return [c for c in children(pid)
            if "multiprocessing.resource_tracker" not in Path(f"/proc/{c}/cmdline")
            .read_bytes().decode(errors="replace")]


@pytest.fixture
def multi_api(settings: Settings, tmp_path: Path) -> Iterator[RunnerProcess]:
    port = free_port()
    api = RunnerProcess("api-workers", ["api", "--port", str(port), "--workers", str(WORKERS)],
                        env=child_env(settings, RUNNER_KEY_REQUESTS_PER_SECOND="0",
                                      RUNNER_AUTH_FAILURES_PER_MINUTE="0"),
                        log_path=tmp_path / "api.log", url=f"http://127.0.0.1:{port}")
    api.wait_ready(url=api.url)
    yield api
    api.stop()


def test_workers_serve_one_port_from_several_processes(multi_api: RunnerProcess,
                                                       store: Store) -> None:
    _, key = Keys(store).create(tenant="acme", role=Role.VIEWER)
    processes = wait_until(lambda: len(serving(multi_api.pid)) == WORKERS
                           and serving(multi_api.pid), timeout=30,
                           message="the worker processes did not start")
    before = {pid: cpu_ticks(pid) for pid in processes}
    for _ in range(300):  # a new connection each: the kernel spreads them
        response = httpx.get(f"{multi_api.url}/v1/processors",
                             headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["X-Request-ID"]
    worked = {pid: cpu_ticks(pid) - before[pid] for pid in processes}
    assert all(ticks > 0 for ticks in worked.values()), worked


def test_a_key_revoked_elsewhere_is_refused_by_every_process_within_the_bound(
        multi_api: RunnerProcess, store: Store) -> None:
    _, key = Keys(store).create(tenant="acme", role=Role.VIEWER)
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(20):  # each process has it in its cache now, most likely
        assert httpx.get(f"{multi_api.url}/v1/processors", headers=headers,
                         timeout=30).status_code == 200
    assert Keys(store).revoke(key)
    time.sleep(KEY_CACHE_SECONDS + 0.5)
    for _ in range(20):
        assert httpx.get(f"{multi_api.url}/v1/processors", headers=headers,
                         timeout=30).status_code == 401


def test_stopping_the_command_stops_every_process(multi_api: RunnerProcess) -> None:
    processes = wait_until(lambda: len(serving(multi_api.pid)) == WORKERS
                           and serving(multi_api.pid), timeout=30,
                           message="the worker processes did not start")
    multi_api.stop()
    assert multi_api.process.returncode is not None
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in processes),
               timeout=20, message="an API process outlived the command")
