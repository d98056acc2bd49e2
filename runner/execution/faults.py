"""Named fault points, so tests can kill a real worker at an exact step.

`RUNNER_FAULT_POINTS=after_container_exit` makes the worker SIGKILL itself when it
reaches that point. Unset (the default and the only production setting), a fault
point is a set lookup and nothing else.
"""

from __future__ import annotations

import os
import signal

import structlog

log = structlog.get_logger(__name__)

POINTS = frozenset({"before_claim", "after_claim", "after_container_exit"})


class Faults:
    def __init__(self, armed: frozenset[str] = frozenset()) -> None:
        unknown = armed - POINTS
        if unknown:
            raise ValueError(f"unknown fault points: {sorted(unknown)}")
        self.armed = armed

    def point(self, name: str) -> None:
        if name in self.armed:
            log.warning("fault_injected", point=name, pid=os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)
