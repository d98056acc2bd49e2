"""Copies a container's stdout and stderr to a sink in a thread, up to a byte cap.

Past the cap the pump stops reading (a flood would otherwise cost the worker CPU for
nothing) and appends one truncation line, so `dropped` is a lower bound.

The stream is the engine's `GET /containers/{id}/logs?follow=1`, read here in its
multiplexed framing (an 8-byte header per frame: stream, 3 zero bytes, big-endian
length). docker-py's `logs()` would first inspect the container to learn whether it
has a TTY, one more engine call per run for what the sandbox already knows: it
creates every container without one.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests

from runner.sandbox.spec import LogSink

_HEADER = struct.Struct(">BxxxL")
# No `tail`, `since` or `timestamps`: the whole log, as the processor wrote it.
_FOLLOW = {"stdout": "1", "stderr": "1", "follow": "1"}


def frames(raw: Any) -> Iterator[bytes]:
    """The payloads of a multiplexed (non-TTY) engine stream, in order, until it ends.

    `raw` is a file-like body (`read(n)`); a frame cut short ends the stream with
    what arrived of it.
    """
    while True:
        header = raw.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        _, length = _HEADER.unpack(header)
        if length:
            payload = raw.read(length)
            if not payload:
                return
            yield payload


def follow_logs(api: docker.APIClient, container_id: str) -> requests.Response:
    """The open follow stream of a container created without a TTY (no read timeout:
    a processor may be silent for as long as its timeout allows).

    Raises:
        docker.errors.APIError: the engine refused (a missing container is NotFound).
        requests.exceptions.RequestException: the engine could not be reached.
    """
    url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/logs"
    response: requests.Response = api.get(url, params=_FOLLOW, stream=True, timeout=None)
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as exc:
        response.close()
        raise docker.errors.create_api_error_from_http_exception(exc) from exc
    return response


class LogPump:
    """One container's output, streamed to `sink` until the cap or the end."""

    def __init__(self, api: docker.APIClient, container_id: str, cap: int, sink: LogSink) -> None:
        self.api, self.container_id, self.cap, self.sink = api, container_id, cap, sink
        self.bytes = 0
        self.dropped = 0
        self.truncated = False
        self.error: BaseException | None = None
        self._response: requests.Response | None = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{container_id[:12]}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._response = follow_logs(self.api, self.container_id)
            for chunk in frames(self._response.raw):
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
        response, self._response = self._response, None
        if response is not None:
            # Closing a stream whose connection already died may fail; that is harmless.
            with contextlib.suppress(Exception):
                response.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            # The engine keeps a follow stream open a moment past exit; cut it.
            self.close()
            self._thread.join(5)
