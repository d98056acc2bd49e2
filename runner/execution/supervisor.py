"""`runner worker --concurrency N`: N worker processes under a small supervisor.

It forwards SIGTERM and SIGINT to every child and restarts a child that dies, with a
growing delay when one keeps dying soon after its start (a bad setting, a taken
port), instead of a tight loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any

import structlog

from runner.errors import RunnerError
from runner.settings import Settings

log = structlog.get_logger(__name__)

RESTART_RESET_SECONDS = 60.0  # a worker up this long is healthy again: delay resets
RESTART_MAX_SECONDS = 30.0


def supervise(settings: Settings, *, concurrency: int, queues: list[str] | None) -> None:
    """Run `concurrency` worker processes; forward signals; restart one that dies."""
    args = [sys.executable, "-m", "runner", "worker"]
    for name in queues or []:
        args += ["--queue", name]
    children: dict[int, subprocess.Popen[Any]] = {}
    stopping = threading.Event()

    def spawn(index: int) -> None:
        env = {**os.environ, "RUNNER_WORKER_ID": f"{settings.worker_id}-{index}"}
        if settings.worker_port:  # each process its own metrics/health port
            env["RUNNER_WORKER_PORT"] = str(settings.worker_port + index - 1)
        children[index] = subprocess.Popen(args, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    started_at: dict[int, float] = {}
    failures: dict[int, int] = {}
    restart_at: dict[int, float] = {}
    for index in range(1, concurrency + 1):
        spawn(index)
        started_at[index] = time.monotonic()
    log.info("supervisor_started", workers=concurrency)
    while True:
        alive = [c for c in children.values() if c.poll() is None]
        if stopping.is_set() and not alive:
            break
        now = time.monotonic()
        for index, child in list(children.items()):
            code = child.poll()
            if code is None or stopping.is_set():
                continue
            if index not in restart_at:
                # A process that dies soon after its start (a bad setting, a taken port)
                # is restarted with a growing delay, not in a tight loop.
                quick = now - started_at[index] < RESTART_RESET_SECONDS
                failures[index] = failures.get(index, 0) + 1 if quick else 1
                delay = min(RESTART_MAX_SECONDS, 2 ** (failures[index] - 1))
                restart_at[index] = now + delay
                log.warning("worker_process_exited", index=index, code=code,
                            restart_in_s=delay)
            elif now >= restart_at[index]:
                del restart_at[index]
                spawn(index)
                started_at[index] = time.monotonic()
        time.sleep(0.2)
    log.info("supervisor_stopped")
    if any(c.returncode not in (0, -signal.SIGTERM, -signal.SIGINT) for c in children.values()):
        raise RunnerError("a worker process exited with an error")
