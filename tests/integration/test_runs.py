"""Runs end to end: API -> Redis -> a real worker process -> Docker -> the database."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from runner.client import RunnerClient
from runner.control.store import Store
from runner.sandbox import ATTEMPT_LABEL, INSTANCE_LABEL, MANAGED_LABEL, RUN_LABEL, WORKER_LABEL
from runner.settings import Settings
from tests.integration.conftest import containers_left, running_container
from tests.support.processes import WorkerProcess

Run = Callable[..., dict[str, Any]]


def test_echo_end_to_end(run_and_wait: Run, client: RunnerClient, store: Store,
                         docker_client: docker.DockerClient) -> None:
    run = run_and_wait("echo", {"message": "hello", "n": 2}, labels={"suite": "e2e"})
    assert run["status"] == "succeeded", run
    assert run["exit_code"] == 0 and run["error_code"] is None
    assert run["result"] == {"echo": {"message": "hello", "n": 2}}
    assert run["image"].startswith("127.0.0.1:5000/processors/echo@sha256:")
    assert run["attempt"] == 1 and run["labels"] == {"suite": "e2e"}
    assert run["started_at"] and run["finished_at"] and not run["log_truncated"]
    logs = client.logs(run["id"]).decode()
    assert f"echo run={run['id']} attempt=1" in logs
    assert "message=hello\n" in logs and "n=2\n" in logs
    # Stored, not just relayed: the database holds the same.
    stored = store.get_run(run["id"])
    assert stored is not None and stored.result == run["result"]
    assert store.read_logs(run["id"]).decode() == logs
    attempts = store.attempts(run["id"])
    assert len(attempts) == 1 and attempts[0]["container_id"]
    assert attempts[0]["image_id"].startswith("sha256:")
    assert containers_left(docker_client, run["id"]) == []


def test_live_container_is_locked_down(client: RunnerClient, worker: WorkerProcess,
                                       docker_client: docker.DockerClient,
                                       settings: Settings,
                                       published: dict[str, dict[str, Any]]) -> None:
    run = client.submit("sleep", {"seconds": 30}, timeout_seconds=5)
    container = running_container(docker_client, run["id"])
    attrs = docker_client.api.inspect_container(container.id)
    host, config = attrs["HostConfig"], attrs["Config"]
    # Limits from the manifest: sleep has cpus 0.1, memory 16Mi, pids 8.
    assert host["NanoCpus"] == 100_000_000
    assert host["Memory"] == 16 * 1024**2
    assert host["MemorySwap"] == host["Memory"]
    assert host["PidsLimit"] == 8
    # Isolation.
    assert host["NetworkMode"] == "none"
    assert attrs["NetworkSettings"]["Networks"].keys() <= {"none"}
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    assert host["Init"] is True
    assert config["User"] == "65532:65532"
    assert set(host["Tmpfs"]) == {"/tmp"}
    assert "size=" in host["Tmpfs"]["/tmp"] and "noexec" in host["Tmpfs"]["/tmp"]
    # Nothing from the host is mounted, least of all the Docker socket.
    assert not host.get("Binds")
    assert [m["Type"] for m in attrs["Mounts"]] == ["volume"]
    assert attrs["Mounts"][0]["Destination"] == "/run"
    assert all("docker.sock" not in str(m) for m in attrs["Mounts"])
    # Capped log driver.
    assert host["LogConfig"]["Type"] == "json-file"
    assert int(host["LogConfig"]["Config"]["max-size"]) > 0
    # Who it is: labels and a deterministic name.
    assert config["Labels"][MANAGED_LABEL] == "true"
    assert config["Labels"][INSTANCE_LABEL] == settings.instance
    assert config["Labels"][RUN_LABEL] == run["id"]
    assert config["Labels"][ATTEMPT_LABEL] == "1"
    assert config["Labels"][WORKER_LABEL] == settings.worker_id
    assert attrs["Name"] == f"/runner-{run['id']}-1"
    # Exactly the pinned image runs: its id carries the manifest's digest.
    image = docker_client.api.inspect_image(attrs["Image"])
    assert published["sleep"]["image"] in image["RepoDigests"]
    assert config["Env"] and f"RUNNER_RUN_ID={run['id']}" in config["Env"]
    final = client.wait(run["id"], timeout=60)
    assert final["status"] == "timed_out"


def test_sleep_forever_times_out_and_is_removed(run_and_wait: Run,
                                                docker_client: docker.DockerClient) -> None:
    started = time.monotonic()
    run = run_and_wait("sleep", {}, timeout_seconds=2)
    elapsed = time.monotonic() - started
    assert run["status"] == "timed_out", run
    assert run["error_code"] == "timeout"
    assert elapsed < 60  # 2 s + 1 s grace, generously bounded for a loaded machine
    assert containers_left(docker_client, run["id"]) == []


def test_memory_hog_is_oom_killed(run_and_wait: Run) -> None:
    run = run_and_wait("memhog", {"megabytes": 512})
    assert run["status"] == "failed", run
    assert run["error_code"] == "oom_killed"


def test_exit_code_is_reported(run_and_wait: Run) -> None:
    run = run_and_wait("exit", {"code": 3})
    assert (run["status"], run["error_code"], run["exit_code"]) == (
        "failed", "nonzero_exit", 3)


def test_exit_zero_without_result(run_and_wait: Run) -> None:
    run = run_and_wait("exit", {"code": 0})
    assert (run["status"], run["result"]) == ("succeeded", None)


def test_log_flood_is_capped_and_worker_memory_bounded(run_and_wait: Run,
                                                       client: RunnerClient,
                                                       worker: WorkerProcess) -> None:
    before = worker.memory_kib("VmHWM")
    run = run_and_wait("logflood", {"megabytes": 256})
    after = worker.memory_kib("VmHWM")
    assert run["status"] == "succeeded", run
    assert run["log_truncated"] is True
    logs = client.logs(run["id"])
    cap = 1024 * 1024
    assert cap <= len(logs) <= cap + 200
    assert logs[:cap].count(b"x") + logs[:cap].count(b"\n") == cap
    assert logs.endswith(b"[runner: output truncated at 1048576 bytes]\n")
    assert run["log_bytes"] == len(logs)
    # 256 MiB went through the engine; the worker's peak memory may not follow it.
    assert after - before < 64 * 1024, f"worker peak RSS grew {after - before} KiB"


@pytest.mark.parametrize(("mode", "code"), [
    ("symlink", "invalid_output"), ("dir", "invalid_output"),
    ("notjson", "invalid_output"), ("big", "output_too_large"),
])
def test_bad_result_files_are_refused(run_and_wait: Run, tmp_path: Path, mode: str,
                                      code: str) -> None:
    sentinel = tmp_path / "host-secret.json"
    sentinel.write_text('{"secret": "host"}')
    missing = Path(f"/tmp/runner-must-not-exist-{uuid.uuid4().hex}")
    target = str(sentinel) if mode == "symlink" else str(missing)
    run = run_and_wait("badresult", {"mode": mode, "target": target})
    assert (run["status"], run["error_code"], run["result"]) == ("failed", code, None), run
    assert sentinel.read_text() == '{"secret": "host"}'
    assert not missing.exists()


def test_symlink_to_a_missing_host_path_creates_nothing(run_and_wait: Run) -> None:
    missing = Path(f"/tmp/runner-must-not-exist-{uuid.uuid4().hex}")
    run = run_and_wait("badresult", {"mode": "symlink", "target": str(missing)})
    assert run["error_code"] == "invalid_output"
    assert not missing.exists()


def test_good_result_of_the_same_processor(run_and_wait: Run) -> None:
    run = run_and_wait("badresult", {"mode": "ok"})
    assert (run["status"], run["result"]) == ("succeeded", {"ok": True})


def test_follow_streams_until_the_run_ends(client: RunnerClient, worker: WorkerProcess) -> None:
    run = client.submit("echo", {"message": "followed"})
    streamed = b"".join(client.follow_logs(run["id"]))
    final = client.run(run["id"])
    assert final["status"] == "succeeded"
    assert b"message=followed\n" in streamed
    assert streamed == client.logs(run["id"])


def test_long_poll_answers_when_the_run_ends(client: RunnerClient, worker: WorkerProcess,
                                             api_url: str, keys: dict[str, str]) -> None:
    run = client.submit("sleep", {"seconds": 2})
    headers = {"Authorization": f"Bearer {keys['viewer']}"}
    began = time.monotonic()
    held = httpx.get(f"{api_url}/v1/runs/{run['id']}", params={"wait": 0.5},
                     headers=headers, timeout=30)
    assert held.json()["status"] in ("queued", "running")
    assert 0.45 <= time.monotonic() - began < 5
    ended = httpx.get(f"{api_url}/v1/runs/{run['id']}", params={"wait": 60},
                      headers=headers, timeout=90)
    assert ended.json()["status"] == "succeeded"
    assert time.monotonic() - began < 30
    too_long = httpx.get(f"{api_url}/v1/runs/{run['id']}", params={"wait": 61},
                         headers=headers)
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "wait"
