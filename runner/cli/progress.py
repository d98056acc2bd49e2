"""Progress bars on stderr for uploads, downloads and batches of runs.

Shown only when stderr is a terminal (and a transfer is at least 1 MiB), so scripts,
pipes and small files see nothing on stderr but errors; stdout keeps the JSON.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client (and httpx) load only when a command talks to the API
    from runner.client import Progress

MIN_BYTES = 1024 * 1024


class _Bars:
    """What both kinds of bars share: a rich Progress made on demand, stopped on exit."""

    _bars: Any = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None


class Transfers(_Bars):
    """`with Transfers() as bars: client.upload_file(p, progress=bars.track("up p"))`.

    A bar appears on a transfer's first report of a known total of at least
    `min_bytes`; rich is imported only then.
    """

    def __init__(self, *, enabled: bool | None = None, min_bytes: int = MIN_BYTES) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.min_bytes = min_bytes
        self._bars: Any = None  # a rich.progress.Progress once one transfer needs a bar

    def track(self, label: str) -> Progress:
        """A progress callback for one transfer, labelled `label`."""
        task: Any = None

        def update(done: int, total: int | None) -> None:
            nonlocal task
            if task is None:
                if not self.enabled or total is None or total < self.min_bytes:
                    return
                task = self._start().add_task(label, total=total)
            self._bars.update(task, completed=done)

        return update

    def _start(self) -> Any:
        if self._bars is None:
            from rich.progress import DownloadColumn, TransferSpeedColumn

            self._bars = _started_bars(DownloadColumn(), TransferSpeedColumn())
        return self._bars

    def __enter__(self) -> Transfers:
        return self


class Batch(_Bars):
    """`with Batch("submit") as bar: client.submit_many(items, on_progress=bar.update)`:
    one bar of items done on stderr, from the first report on (rich loads only then)."""

    def __init__(self, label: str, *, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: Any = None
        self._task: Any = None

    def update(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self._bars is None:
            from rich.progress import MofNCompleteColumn

            self._bars = _started_bars(MofNCompleteColumn())
            self._task = self._bars.add_task(self.label, total=total)
        self._bars.update(self._task, completed=done, total=total)

    def __enter__(self) -> Batch:
        return self


def _started_bars(*counts: Any) -> Any:
    """A started rich Progress on stderr: label, bar, `counts`, time remaining."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), *counts,
                    TimeRemainingColumn(), console=Console(stderr=True))
    bars.start()
    return bars
