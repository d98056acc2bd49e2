"""A fresh, migrated SQLite database per test, held in memory, in about a millisecond.

The database is a file on /dev/shm (a RAM filesystem; a temporary directory when
there is none): an in-process `sqlite://` memory database does not work here, as
each connection would get its own empty database, and the worker's threads (the
attempt guard's heartbeats, the log writer, the container recorder) each use their
own connection from the engine's pool. A file is shared by all of them, with the
same WAL and busy-timeout settings production's SQLite gets (`make_engine`).

Speed: the Alembic migrations run ONCE per test session, on a template database
(`runner.control.migrate.upgrade`); each test gets a copy of that file
(`shutil.copy`), so every test has the real migrated schema, not
`Base.metadata.create_all`, at the cost of a file copy.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runner.control.migrate import upgrade
from runner.control.store import Store

SHM = Path("/dev/shm")


def _ram_dir() -> Path:
    """A private directory on the RAM filesystem, or a temporary one without it."""
    base = SHM if SHM.is_dir() else None
    try:
        return Path(tempfile.mkdtemp(prefix="runner-tests-", dir=base))
    except OSError:  # /dev/shm present but not writable
        return Path(tempfile.mkdtemp(prefix="runner-tests-"))


class MemDatabases:
    """One migrated template per session; `fresh()` hands out copies of it."""

    def __init__(self) -> None:
        self.root = _ram_dir()
        self.template = self.root / "template.db"
        self._numbers = itertools.count(1)
        upgrade(f"sqlite:///{self.template}")

    def fresh_path(self) -> Path:
        path = self.root / f"test-{next(self._numbers)}.db"
        shutil.copy(self.template, path)
        return path

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Store]:
        """A `Store` on its own copy of the template; closed and deleted after."""
        path = self.fresh_path()
        store = Store(f"sqlite:///{path}")
        try:
            yield store
        finally:
            store.close()
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
