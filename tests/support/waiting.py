"""`wait_until`: the one polling loop of the test suites.

A test waits on something it can observe (a status in the database, a log line, a
container's state, a port that answers), never for a fixed time when an event would
do; `wait_until` is that wait, with a deadline and a message saying what never came.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

NO_VALUE = object()


class WaitTimeout(AssertionError, TimeoutError):
    """A `wait_until` gave up: an assertion failure to pytest, a TimeoutError to code
    that catches those. `last` is the predicate's last (falsy) value."""

    def __init__(self, message: str, last: object = NO_VALUE) -> None:
        super().__init__(message)
        self.last = last


def wait_until(predicate: Callable[[], T], *, timeout: float, interval: float = 0.05,
               message: str | Callable[[], str] | None = None) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and
    return that; after `timeout` seconds raise `WaitTimeout` with `message` (a string,
    or a callable building it at that moment, e.g. with a log's tail) and the
    predicate's last value when that says more than False or None.

    The predicate is always called at least once, and once more at the deadline. An
    exception it raises ends the wait at once (to fail fast when, say, the process
    being waited on has exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    text = message() if callable(message) else message
    if text is None:
        text = f"{getattr(predicate, '__qualname__', predicate)} never became true"
    detail = f"gave up after {timeout:g}s"
    if value is not None and not isinstance(value, bool):
        shown = repr(value)
        detail += f"; last value: {shown[:500]}{'...' if len(shown) > 500 else ''}"
    raise WaitTimeout(f"{text} ({detail})", value)
