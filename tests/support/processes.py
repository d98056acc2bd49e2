"""`runner ...` child processes, each with its own log file: workers and APIs.

`RunnerProcess` is any `python -m <module> ...` child run from the repository root,
its stdout and stderr in a log file; `wait_ready` waits for a log line or for its
/healthz. `start_worker_process` and `start_api_process` start and wait for the two
services; `WorkerProcess` is a worker run with a `Settings` (the integration tests'),
through `tests.support.faulty_worker` when fault points are armed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from signal import SIGCONT, SIGKILL, SIGTERM
from typing import Any

from runner.settings import Settings
from tests.support.faults import FAULTS_ENV, Faults
from tests.support.net import free_port, http_status
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]  # the cwd of every child: `tests` importable


def proc_status(pid: int, field: str = "VmRSS") -> int:
    """A `/proc/<pid>/status` figure in KiB (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class RunnerProcess:
    """A `python -m runner ARGS` child (or `-m module`), its log file and its pid.

    `prefix` replaces the interpreter (a profiler in front of it, say); `url` is where
    it serves HTTP, if it does (an API, a worker's metrics port).
    """

    def __init__(self, name: str, args: Sequence[str], *, env: Mapping[str, str],
                 log_path: Path, module: str = "runner", url: str | None = None,
                 prefix: Sequence[str] | None = None, append: bool = False) -> None:
        self.name, self.log_path, self.url = name, log_path, url
        self._out = log_path.open("ab" if append else "wb")
        self.process = subprocess.Popen(
            [*(prefix or [sys.executable]), "-m", module, *args], cwd=ROOT, env=dict(env),
            stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    # What it logged ---------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def events(self, event: str, *, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """Its JSON log lines of `event` (with these field values), from character
        `since` of the log on (`len(process.log())` taken earlier, say)."""
        found = []
        for line in self.log()[since:].splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written, or another program's
            if record.get("event") == event and all(
                    record.get(k) == v for k, v in fields.items()):
                found.append(record)
        return found

    def memory_kib(self, field: str = "VmHWM") -> int:
        return proc_status(self.pid, field)

    def rss_kib(self) -> int:
        return proc_status(self.pid, "VmRSS")

    # Waiting and signals ------------------------------------------------------------

    def wait_ready(self, *, marker: str | None = None, url: str | None = None,
                   timeout: float = 60) -> None:
        """Wait until the log holds `marker`, or `url` + /healthz answers 200 (or, with
        neither, for nothing). A process that exits first or is not ready in time is
        stopped, and the error carries its log's tail."""
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode}"
                                   f" before it was ready:\n{self.tail()}")
            if marker is not None:
                return marker.encode() in self.log_path.read_bytes()
            if url is not None:
                return http_status(f"{url}/healthz") == 200
            return True

        try:
            wait_until(ready, timeout=timeout, interval=0.1,
                       message=lambda: f"{self.name} did not start:\n{self.tail()}")
        except BaseException:
            self.stop()
            raise

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def kill(self, sig: int = SIGKILL) -> None:
        """Send `sig` (SIGKILL by default: then wait until it is gone)."""
        self.signal(sig)
        if sig == SIGKILL:
            self.process.wait(10)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a worker drains its current run; SIGCONT first, in case a test left
        it stopped), SIGKILL if it is still there after `timeout`."""
        if self.alive():
            self.signal(SIGCONT)
            self.signal(SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(10)
        self._out.close()


def start_worker_process(env: Mapping[str, str], log_path: Path, *, name: str = "worker",
                         args: Sequence[str] = (), url: str | None = None,
                         prefix: Sequence[str] | None = None, append: bool = False,
                         timeout: float = 90) -> RunnerProcess:
    """`runner worker ARGS`, once it has logged `worker_started`."""
    process = RunnerProcess(name, ["worker", *args], env=env, log_path=log_path, url=url,
                            prefix=prefix, append=append)
    process.wait_ready(marker="worker_started", timeout=timeout)
    return process


def start_api_process(env: Mapping[str, str], log_path: Path, *, name: str = "api",
                      append: bool = False, timeout: float = 90) -> RunnerProcess:
    """`runner api` on a free loopback port (its `url`), once its /healthz answers."""
    port = free_port()
    process = RunnerProcess(name, ["api", "--port", str(port)], env=env, log_path=log_path,
                            url=f"http://127.0.0.1:{port}", append=append)
    process.wait_ready(url=process.url, timeout=timeout)
    return process


# Workers run with a Settings (the integration tests') ------------------------------------

SETTINGS_PASSED = ("database_url", "redis_url", "manifest", "queue", "registry",
                   "stop_grace_seconds", "worker_id", "lease_seconds", "heartbeat_seconds",
                   "drain_timeout_seconds", "reconcile_interval_seconds",
                   "reconcile_grace_seconds", "file_dir", "file_store")


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This environment, with the RUNNER_* variables that make a child process run
    with `settings` (JSON logs), and `extra`."""
    values = {f"RUNNER_{n.upper()}": str(getattr(settings, n)) for n in SETTINGS_PASSED}
    return {**os.environ, **values, "RUNNER_LOG_FORMAT": "json", **extra}


class WorkerProcess(RunnerProcess):
    """A real worker process with `settings`: `runner worker ARGS`, or, when `faults`
    names fault points, `python -m tests.support.faulty_worker ARGS` with those armed
    (it SIGKILLs itself at the first one it reaches)."""

    def __init__(self, settings: Settings, log_path: Path, *, args: list[str] | None = None,
                 env: dict[str, str] | None = None, wait_started: bool = True,
                 faults: Iterable[str] = (), timeout: float = 60) -> None:
        armed = Faults(frozenset(faults)).armed  # an unknown point fails here, not later
        extra = dict(env or {})
        if armed:
            module, command = "tests.support.faulty_worker", list(args or [])
            extra[FAULTS_ENV] = ",".join(sorted(armed))
        else:
            module, command = "runner", ["worker", *(args or [])]
        super().__init__(settings.worker_id, command, env={**child_env(settings), **extra},
                         log_path=log_path, module=module)
        if wait_started:
            self.wait_ready(marker="worker_started", timeout=timeout)
