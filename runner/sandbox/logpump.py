"""Copies a container's stdout and stderr to a sink in a thread, up to a byte cap.

Past the cap the pump stops reading (a flood would otherwise cost the worker CPU for
nothing) and appends one truncation line, so `dropped` is a lower bound.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import docker

from runner.sandbox.spec import LogSink


class LogPump:
    """One container's output, streamed to `sink` until the cap or the end."""

    def __init__(self, api: docker.APIClient, container_id: str, cap: int, sink: LogSink) -> None:
        self.api, self.container_id, self.cap, self.sink = api, container_id, cap, sink
        self.bytes = 0
        self.dropped = 0
        self.truncated = False
        self.error: BaseException | None = None
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{container_id[:12]}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._stream = self.api.logs(self.container_id, stream=True, follow=True,
                                         stdout=True, stderr=True)
            for chunk in self._stream:
                room = self.cap - self.bytes
                if len(chunk) > room:
                    if room > 0:
                        self.sink(chunk[:room])
                        self.bytes += room
                    self.dropped += len(chunk) - max(room, 0)
                    self.truncated = True
                    self.sink(f"\n[runner: output truncated at {self.cap} bytes]\n".encode())
                    break
                self.sink(chunk)
                self.bytes += len(chunk)
        except Exception as exc:  # noqa: BLE001 - reported to the caller after join
            self.error = exc
        finally:
            self.close()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            # Closing a stream whose connection already died may fail; that is harmless.
            with contextlib.suppress(Exception):
                stream.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            # The engine keeps a follow stream open a moment past exit; cut it.
            self.close()
            self._thread.join(5)
