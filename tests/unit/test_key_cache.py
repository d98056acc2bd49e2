"""The cache of valid API keys (runner/control/keys.py): one lookup per key and cache
period, revocation within the bound it states, and nothing remembered that was
refused. On the real migrated schema (SQLite); the lookups are counted from the SQL
the engine sends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, select

from runner.control.keys import Keys
from runner.control.models import ApiKeyRow
from runner.control.store import Store
from runner.domain import Role


@pytest.fixture
def lookups(store: Store) -> Iterator[list[str]]:
    """Every SQL statement that reads the api_keys table, as the engine sends it."""
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "api_keys" in statement:
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", note)
    yield seen
    event.remove(store.engine, "before_cursor_execute", note)


def test_a_valid_key_is_looked_up_once_per_cache_period(store: Store,
                                                        lookups: list[str]) -> None:
    keys = Keys(store, cache_seconds=60)
    info, plain = keys.create(tenant="acme", role=Role.SUBMITTER)
    for _ in range(20):
        found = keys.authenticate(plain)
        assert found is not None
        assert (found.id, found.tenant, found.role) == (info.id, "acme", Role.SUBMITTER)
    assert keys.known(plain) == found
    assert len(lookups) == 1


def test_a_key_revoked_elsewhere_is_refused_once_the_cache_period_ends(store: Store) -> None:
    keys = Keys(store, cache_seconds=0.3)
    _, plain = keys.create(tenant="acme", role=Role.VIEWER)
    assert keys.authenticate(plain) is not None
    assert Keys(store).revoke(plain)  # another process, or `runner keys revoke`
    assert keys.authenticate(plain) is not None  # within the stated bound: still taken
    time.sleep(0.35)
    assert keys.known(plain) is None
    assert keys.authenticate(plain) is None
    assert keys.authenticate(plain) is None  # and refused ever after


def test_a_key_revoked_through_this_process_is_refused_at_once(store: Store) -> None:
    keys = Keys(store, cache_seconds=60)
    _, plain = keys.create(tenant="acme", role=Role.VIEWER)
    assert keys.authenticate(plain) is not None
    assert keys.revoke(plain)
    assert keys.known(plain) is None
    assert keys.authenticate(plain) is None


def test_a_wrong_secret_is_refused_even_for_a_cached_key(store: Store,
                                                          lookups: list[str]) -> None:
    keys = Keys(store, cache_seconds=60)
    info, plain = keys.create(tenant="acme", role=Role.ADMIN)
    assert keys.authenticate(plain) is not None
    guessed = f"rk_{info.id}_{'x' * 43}"
    assert keys.known(guessed) is None
    assert keys.authenticate(guessed) is None
    assert keys.authenticate(plain) is not None  # the right one still works


def test_refused_keys_are_not_remembered(store: Store, lookups: list[str]) -> None:
    """An unknown or revoked key is looked up on every try: nothing refused is cached,
    so a key that is refused now can never be let in from memory later."""
    keys = Keys(store, cache_seconds=60)
    _, plain = keys.create(tenant="acme", role=Role.VIEWER)
    key_id = plain.split("_")[1]
    unknown = f"rk_{'0' * 12}_{'y' * 43}"
    for _ in range(3):
        assert keys.authenticate(unknown) is None
    assert Keys(store).revoke(plain)
    for _ in range(3):
        assert keys.authenticate(plain) is None
    assert len(lookups) == 6
    assert keys.known(unknown) is None and keys.known(plain) is None
    with store.session() as session:
        assert session.scalar(select(ApiKeyRow.revoked_at).where(
            ApiKeyRow.id == key_id)) is not None


def test_last_used_at_is_written_from_the_cache_as_often_as_without_it(store: Store) -> None:
    keys = Keys(store, cache_seconds=60)
    keys.LAST_USED_PRECISION_SECONDS = 0.2
    info, plain = keys.create(tenant="acme", role=Role.VIEWER)

    def last_used() -> Any:
        with store.session() as session:
            return session.scalar(select(ApiKeyRow.last_used_at)
                                  .where(ApiKeyRow.id == info.id))

    assert keys.authenticate(plain) is not None
    first = last_used()
    assert first is not None
    assert keys.authenticate(plain) is not None  # from the cache, within the precision
    assert last_used() == first
    time.sleep(0.25)
    assert keys.authenticate(plain) is not None  # from the cache, past it
    assert last_used() > first
