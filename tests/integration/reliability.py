"""Helpers for the fault-injection tests: submit on the reliability queue, wait on the DB."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

import redis

from runner.control.queue import RunQueue
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.domain import Run, RunStatus
from runner.manifest import load_manifest
from runner.settings import Settings
from tests.support.net import free_port
from tests.support.waiting import wait_until


def submit_rel(store: Store, settings: Settings, processor: str,
               input: dict[str, Any] | None = None, **options: Any) -> Run:
    return submit(Submission(tenant="rel", processor=processor, version=None,
                             input=input or {}, **options),
                  manifest=load_manifest(settings.manifest), store=store,
                  queue=RunQueue.from_url(settings.redis_url), default_queue=settings.queue,
                  stop_grace_seconds=settings.stop_grace_seconds)


def wait_for(store: Store, run_id: str, *statuses: RunStatus, attempt: int | None = None,
             min_attempt: int = 0, timeout: float = 120) -> Run:
    seen: list[Run] = []

    def reached() -> Run | None:
        run = store.get_run(run_id)
        assert run is not None
        seen[:] = [run]
        if (run.status in statuses and (attempt is None or run.attempt == attempt)
                and run.attempt >= min_attempt):
            return run
        return None

    return wait_until(reached, timeout=timeout, message=lambda: (
        f"run {run_id} is {seen[-1].status} (attempt {seen[-1].attempt}), "
        f"wanted {statuses} attempt {attempt} (>= {min_attempt})"))


def wait_terminal(store: Store, run_id: str, timeout: float = 120) -> Run:
    return wait_for(store, run_id, *[s for s in RunStatus if s.terminal], timeout=timeout)


def blocked_on_an_empty_queue(redis_url: str, queue: str) -> bool:
    """Whether `queue` is empty and a worker is blocked waiting for its next job.

    A worker (one job at a time) blocks only once it has taken every job off its
    queue and handled each: every job before that point has had its chance to run.
    """
    client = redis.Redis.from_url(redis_url)
    try:
        if RunQueue(client).depths([queue])[queue]:
            return False
        return any("b" in c.get("flags", "") and c.get("cmd") in ("blmove", "blpop")
                   for c in client.client_list())
    finally:
        client.close()


class _Proxy:
    """A listening socket forwarding every connection to a target; a test cuts it
    (`down`: the listener and every open connection close) and restores it (`up`), or
    stalls it (`pause`: connections stay open and bytes wait) and lets it go (`resume`)."""

    def __init__(self) -> None:
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._flowing = threading.Event()
        self._flowing.set()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _listen(self) -> socket.socket:
        raise NotImplementedError

    def _connect(self) -> socket.socket:
        raise NotImplementedError

    def up(self) -> None:
        server = self._listen()
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            # shutdown wakes the thread blocked in accept(); close alone would leave
            # the kernel socket listening until that call returns.
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                target = self._connect()
            except OSError:
                client.close()
                continue
            self._conns += [client, target]
            for a, b in ((client, target), (target, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class DockerProxy(_Proxy):
    """A unix socket forwarding to the real engine."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.path = path or Path(f"/tmp/runner-docker-{secrets.token_hex(4)}.sock")

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def _listen(self) -> socket.socket:
        self.path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        return server

    def _connect(self) -> socket.socket:
        engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        engine.connect("/var/run/docker.sock")
        return engine

    def down(self) -> None:
        super().down()
        self.path.unlink(missing_ok=True)


class TcpProxy(_Proxy):
    """A loopback TCP port forwarding to `host:port` (a database, say)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.target = (host, port)
        self.port = free_port()

    def _listen(self) -> socket.socket:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        return server

    def _connect(self) -> socket.socket:
        conn = socket.create_connection(self.target, timeout=5)
        conn.settimeout(None)
        return conn
