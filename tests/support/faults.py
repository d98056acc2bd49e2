"""Named fault points, so a test can kill a real worker at an exact step.

The executor calls its fault hook at each point of an attempt (`before_claim`,
`after_claim`, `after_container_exit`); production passes a hook that does nothing.
`Faults` is the test hook: at an armed point it logs `fault_injected` and SIGKILLs its
own process, as a crash there would. Only `python -m tests.support.faulty_worker`
installs it, with the points named in RUNNER_TEST_FAULT_POINTS.
"""

from __future__ import annotations

import os
import signal

import structlog

from runner.execution.ports import FAULT_POINTS

log = structlog.get_logger(__name__)

POINTS = FAULT_POINTS  # where the executor calls its hook
FAULTS_ENV = "RUNNER_TEST_FAULT_POINTS"  # comma separated, read by the faulty worker


def parse_points(text: str) -> frozenset[str]:
    """The points of a comma-separated list ("" arms none)."""
    return frozenset(p.strip() for p in text.split(",") if p.strip())


class Faults:
    """A fault hook (`run_worker(fault=...)`): SIGKILL this process at an armed point."""

    def __init__(self, armed: frozenset[str]) -> None:
        unknown = armed - POINTS
        if unknown:
            raise ValueError(f"unknown fault points {sorted(unknown)}; known: {sorted(POINTS)}")
        self.armed = armed

    def __call__(self, point: str) -> None:
        if point in self.armed:
            log.warning("fault_injected", point=point, pid=os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)
