"""Fixtures of the core's unit tests: a fresh migrated SQLite store per test (in RAM,
tests/support/memdb.py), the lifecycle and ledger on it, and a manifest whose echo
entry pins the image the test runs are created with. No Docker, Redis or PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from runner.control.ledger import Ledger
from runner.control.lifecycle import Lifecycle, RunEnded
from runner.control.models import RunRow
from runner.control.store import Store
from runner.domain import NewRun, Run, utcnow
from runner.manifest import Manifest, ManifestSource, parse_manifest
from tests.support.memdb import MemDatabases

IMAGE = "reg/echo@sha256:" + "a" * 64
OTHER_IMAGE = "reg/echo@sha256:" + "c" * 64
# Retries exit 75 and lost workers, three attempts, and no backoff wait at all (a
# retried run is due at once, so a test can claim its next attempt right away).
DEFAULT_RETRY = '{max_attempts: 3, backoff: {initial: 0s, max: 0s}, on: ["exit:75", worker_lost]}'


def manifest_text(*, image: str = IMAGE, retry: str = DEFAULT_RETRY,
                  max_concurrency: int | None = None, name: str = "echo",
                  version: str = "1.0.0") -> str:
    """Manifest YAML with one processor entry (by default: echo 1.0.0 pinning IMAGE)."""
    concurrency = f"\n    max_concurrency: {max_concurrency}" if max_concurrency else ""
    return f"""\
version: 1
processors:
  - name: {name}
    version: "{version}"
    image: {image}
    limits: {{cpus: 0.5, memory: 64Mi, timeout: 30s, log_bytes: 1Mi}}
    retry: {retry}{concurrency}
"""


def set_run(store: Store, run_id: str, **values: Any) -> None:
    """Write columns of a run directly (e.g. a lease forced into the past)."""
    with store.session() as session:
        session.execute(update(RunRow).where(RunRow.id == run_id).values(**values))


def past(seconds: float = 60) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def memdb() -> Iterator[MemDatabases]:
    databases = MemDatabases()
    yield databases
    databases.close()


@pytest.fixture
def store(memdb: MemDatabases) -> Iterator[Store]:
    with memdb.fresh() as fresh:
        yield fresh


@pytest.fixture
def events() -> list[RunEnded]:
    """Every run end the lifecycle told its listeners about, in order."""
    return []


@pytest.fixture
def lifecycle(store: Store, events: list[RunEnded]) -> Lifecycle:
    return Lifecycle(store, listeners=[events.append])


@pytest.fixture
def ledger(store: Store, lifecycle: Lifecycle) -> Ledger:
    return Ledger(store, lifecycle)


NewRunMaker = Callable[..., Run]


@pytest.fixture
def new_run(store: Store) -> NewRunMaker:
    """Create a queued run of echo 1.0.0 (fields of `NewRun` may be overridden)."""

    def make(**overrides: Any) -> Run:
        fields: dict[str, Any] = {
            "tenant": "t", "processor": "echo", "version": "1.0.0", "image": IMAGE,
            "queue": "q", "input": {"x": 1}, "timeout_seconds": 30, "max_attempts": 3,
            "manifest_revision": "rev"}
        fields.update(overrides)
        run, created = store.create_run(NewRun(**fields))
        assert created
        return run

    return make


@pytest.fixture
def manifest() -> Manifest:
    return parse_manifest(manifest_text())


ManifestMaker = Callable[..., ManifestSource]


@pytest.fixture
def make_manifests(tmp_path: Path) -> ManifestMaker:
    """A `ManifestSource` on a fresh file of `manifest_text(**options)`."""
    numbers = iter(range(1, 1_000_000))

    def make(**options: Any) -> ManifestSource:
        path = tmp_path / f"manifest-{next(numbers)}.yaml"
        path.write_text(manifest_text(**options))
        return ManifestSource(path)

    return make


@pytest.fixture
def manifests(make_manifests: ManifestMaker) -> ManifestSource:
    return make_manifests()
