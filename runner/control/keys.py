"""API keys: at least 256 random bits behind a readable prefix, stored only as a hash.

A key reads `rk_<id>_<secret>`: the id finds the row, the secret's SHA-256 is
compared in constant time, and the plaintext is shown once, at creation.

A key found valid is remembered by this process for KEY_CACHE_SECONDS (its id, role,
tenant and secret hash), so a busy client costs the database one lookup per key
every few seconds instead of one per request. The bound this sets on revocation: a
key revoked elsewhere (`runner keys revoke`, another API process) is refused by every
process within KEY_CACHE_SECONDS; one revoked through this process's `Keys.revoke`
at once. Only keys found valid are remembered: an unknown id, a wrong secret or a
revoked key is looked up again on every try (and counted as a failure by the API).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from runner.control.models import ApiKeyRow
from runner.control.rows import aware
from runner.control.store import Store, rows_changed
from runner.domain import Role, utcnow

KEY_PREFIX = "rk_"
# How long a valid key is taken on this process's word: the revocation bound above.
KEY_CACHE_SECONDS = 5.0
# Entries kept at most; past it the expired ones are dropped (only real keys get in).
KEY_CACHE_MAX = 10_000


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    role: Role


@dataclass(frozen=True)
class _Known:
    """A key found valid: what a later presentation is compared with, until `until`
    (time.monotonic())."""

    key: ApiKey
    secret_hash: str
    until: float


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Keys:
    """Create, list, revoke and check API keys."""

    # last_used_at is written at most this often per key: a write on every request
    # would double the database work of a busy client for a coarse "last seen" field.
    LAST_USED_PRECISION_SECONDS = 60.0

    def __init__(self, store: Store, *, cache_seconds: float = KEY_CACHE_SECONDS) -> None:
        self.store, self.cache_seconds = store, cache_seconds
        self._last_written: dict[str, float] = {}
        # Read and written from the API's worker threads: single dict operations only
        # (atomic under the GIL), and a stale entry is only ever replaced or dropped.
        self._known: dict[str, _Known] = {}

    def create(self, *, tenant: str, role: Role) -> tuple[ApiKey, str]:
        """A new key; the plaintext is returned once and only its hash is stored."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)  # 256 random bits
        with self.store.session() as session:
            session.add(ApiKeyRow(id=key_id, secret_hash=_hash_secret(secret), tenant=tenant,
                                  role=role.value, created_at=utcnow()))
        return ApiKey(id=key_id, tenant=tenant, role=role), f"{KEY_PREFIX}{key_id}_{secret}"

    def list(self, *, tenant: str | None = None) -> list[dict[str, Any]]:
        """Key metadata (never a secret or its hash)."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at)
        if tenant is not None:
            query = query.where(ApiKeyRow.tenant == tenant)
        with self.store.session() as session:
            return [{"id": r.id, "prefix": f"{KEY_PREFIX}{r.id}_", "tenant": r.tenant,
                     "role": r.role, "created_at": aware(r.created_at),
                     "last_used_at": aware(r.last_used_at),
                     "revoked_at": aware(r.revoked_at)} for r in session.scalars(query)]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key at once; False if there is no such live key."""
        key_id = key_id.removeprefix(KEY_PREFIX).split("_", 1)[0]
        self._known.pop(key_id, None)  # refused by this process from now on
        with self.store.session() as session:
            return rows_changed(session, update(ApiKeyRow).where(
                ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None),
            ).values(revoked_at=utcnow())) == 1

    def is_active(self, key_id: str) -> bool:
        """Whether the key still exists and is not revoked (a long-lived request, such as
        a log follow, asks again every few seconds)."""
        with self.store.session() as session:
            revoked = session.execute(select(ApiKeyRow.revoked_at)
                                      .where(ApiKeyRow.id == key_id)).one_or_none()
        return revoked is not None and revoked[0] is None

    @staticmethod
    def looks_like_key(presented: str) -> bool:
        """Whether `presented` has a key's shape, so `authenticate` would look it up."""
        return presented.startswith(KEY_PREFIX) and presented.count("_") >= 2

    def known(self, presented: str) -> ApiKey | None:
        """The key presented, if this process found it valid within `cache_seconds`
        and the secret matches; None means "not known here": `authenticate` decides."""
        if not self.looks_like_key(presented):
            return None
        key_id, _, secret = presented.removeprefix(KEY_PREFIX).partition("_")
        now = time.monotonic()
        known = self._known.get(key_id)
        if known is None or now >= known.until:
            return None
        return self._cached(known, secret, now)

    def _cached(self, known: _Known, secret: str, now: float) -> ApiKey | None:
        """`known`'s key if `secret` is its secret (compared in constant time); None
        for a wrong one, which needs no lookup: a key's hash never changes."""
        if not hmac.compare_digest(known.secret_hash, _hash_secret(secret)):
            return None
        if now - self._last_written.get(known.key.id, -1e9) >= self.LAST_USED_PRECISION_SECONDS:
            self._touch(known.key.id, now)
        return known.key

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key presented as a bearer token, or None if it is unknown or revoked
        (revoked elsewhere: within `cache_seconds`, see the module's docstring)."""
        if not self.looks_like_key(presented):
            return None
        key_id, _, secret = presented.removeprefix(KEY_PREFIX).partition("_")
        now = time.monotonic()
        known = self._known.get(key_id)
        if known is not None and now < known.until:
            return self._cached(known, secret, now)
        with self.store.session() as session:
            row = session.get(ApiKeyRow, key_id)
            expected = row.secret_hash if row is not None else _hash_secret(os.urandom(8).hex())
            valid = hmac.compare_digest(expected, _hash_secret(secret))
            if row is None or not valid or row.revoked_at is not None:
                self._known.pop(key_id, None)
                return None
            if now - self._last_written.get(row.id, -1e9) >= self.LAST_USED_PRECISION_SECONDS:
                row.last_used_at = utcnow()
                self._last_written[row.id] = now
            key = ApiKey(id=row.id, tenant=row.tenant, role=Role(row.role))
            secret_hash = row.secret_hash
        self._remember(_Known(key=key, secret_hash=secret_hash, until=now + self.cache_seconds))
        return key

    def _touch(self, key_id: str, now: float) -> None:
        """Write last_used_at of a key taken from the cache (as often as a looked-up
        one: LAST_USED_PRECISION_SECONDS)."""
        self._last_written[key_id] = now
        with self.store.session() as session:
            session.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id)
                            .values(last_used_at=utcnow()))

    def _remember(self, known: _Known) -> None:
        if self.cache_seconds <= 0:
            return
        if len(self._known) >= KEY_CACHE_MAX:
            now = time.monotonic()
            for key_id in [k for k, v in list(self._known.items()) if v.until <= now]:
                self._known.pop(key_id, None)
        self._known[known.key.id] = known
