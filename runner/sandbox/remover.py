"""Container removals off the run's critical path: one daemon thread, in order."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class Remover:
    """Runs removals one after another in a daemon thread, in submission order."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._loop, name="remover", daemon=True).start()

    def submit(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                task()
            except Exception:  # one failed removal must not stop the rest
                log.exception("background_remove_failed")
            finally:
                self._tasks.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted removal is done; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while self._tasks.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True
