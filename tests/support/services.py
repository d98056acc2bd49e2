"""Throwaway backing services: a Redis server, a scratch PostgreSQL database, and the
API served in-process.

Each is named or placed so it cannot disturb anything else on the shared servers (a
dev stack, another test session, a benchmark): a Redis server of its own on a free
loopback port, a database of its own on the shared PostgreSQL server.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import redis
import uvicorn

from api.app import create_app
from runner.control.migrate import upgrade
from runner.settings import Settings
from tests.support.net import free_port
from tests.support.waiting import wait_until


class RedisServer:
    """A throwaway redis-server on a free loopback port, with no persistence.

    `stop` and `start` again keep the port (and lose the data), as a restart does.
    """

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> None:
        process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.process = process
        client = redis.Redis(port=self.port)

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with status "
                                   f"{process.returncode}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, timeout=timeout,
                       message=f"redis-server on port {self.port} never answered")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


# PostgreSQL: a database of its own per session, stack or benchmark ------------------

def database_url(admin_url: str, name: str) -> str:
    """The URL of database `name` on the server of `admin_url`."""
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def create_database(admin_url: str, name: str, *, migrate: bool = True) -> str:
    """Create database `name` (and bring its schema up to date); its URL.

    On a failed migration the database is dropped again.
    """
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(admin_url, name)
    if migrate:
        try:
            upgrade(url)
        except BaseException:
            drop_database(admin_url, name)
            raise
    return url


def drop_database(admin_url: str, name: str) -> None:
    """Drop database `name`, closing any connection still open to it."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def scratch_database(admin_url: str, name: str, *, migrate: bool = True) -> Iterator[str]:
    """A fresh database `name` for the block (its URL), dropped at the end."""
    url = create_database(admin_url, name, migrate=migrate)
    try:
        yield url
    finally:
        drop_database(admin_url, name)


# The API in this process ---------------------------------------------------------------

class ApiServer:
    """The real app under uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, settings: Settings, app: Any = None, *, timeout: float = 30) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            app or create_app(settings), host="127.0.0.1", port=self.port,
            log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

        def started() -> bool:
            if self.server.started:
                return True
            if not self.thread.is_alive():
                raise RuntimeError(f"the API server on port {self.port} stopped at start")
            return False

        wait_until(started, timeout=timeout, message="the API server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
