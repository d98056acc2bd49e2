"""Dashboard sessions: server-side in Redis, a random id in an httpOnly cookie.

Why server-side: the cookie carries nothing but 256 random bits, so it can be ended
at once (sign-out deletes it; a revoked key ends every session made with it on the
next request), it never holds the API key or anything a browser script could use,
and it survives an API restart because Redis keeps it. Each session lives at most
RUNNER_UI_SESSION_SECONDS from sign-in (a Redis TTL, not renewed by use), and the
cookie's Max-Age says the same.

The Redis key holds the SHA-256 of the cookie's id, not the id itself, so whoever
reads Redis (a dump, MONITOR) cannot present a session. The values are what a page
needs: the key's id, tenant and role, the session's CSRF token and when it began.

The CSRF token is per session; every state-changing form carries it and the server
compares it in constant time (`csrf_ok`). The sign-in form, made before any session
exists, carries a token of its own that must match a short-lived cookie (a double
submit), so another site cannot sign a browser into a key of its choosing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from runner.domain import Role, utcnow
from runner.errors import ServiceUnavailableError

COOKIE = "runner_ui"
LOGIN_COOKIE = "runner_ui_login"  # the sign-in form's own CSRF token (double submit)
LOGIN_COOKIE_SECONDS = 3600
COOKIE_PATH = "/ui"


@dataclass(frozen=True)
class UiSession:
    """What a signed-in browser is, as stored in Redis."""

    key_id: str
    tenant: str
    role: Role
    csrf: str
    created_at: str

    def dumps(self) -> str:
        return json.dumps({**asdict(self), "role": self.role.value})

    @classmethod
    def loads(cls, text: str | bytes) -> UiSession | None:
        """The session stored as `text`, or None when it is not one (never raises)."""
        try:
            data = json.loads(text)
            return cls(key_id=str(data["key_id"]), tenant=str(data["tenant"]),
                       role=Role(data["role"]), csrf=str(data["csrf"]),
                       created_at=str(data["created_at"]))
        except (ValueError, KeyError, TypeError):
            return None


def new_token() -> str:
    """256 random bits, URL-safe: a session id or a CSRF token."""
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str, given: str | None) -> bool:
    """Whether a form's token is the session's: constant time, never for an empty one."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def cookie_options(*, https: bool, max_age: int) -> dict[str, Any]:
    """The attributes of every cookie the dashboard sets (`Response.set_cookie` kwargs):
    httpOnly (no script reads it), SameSite=Strict (no other site's page sends it),
    Path=/ui (the /v1 API never sees it), Secure over HTTPS."""
    return {"max_age": max_age, "path": COOKIE_PATH, "httponly": True,
            "samesite": "strict", "secure": https}


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a dashboard path only, never another site."""
    if (not target or not target.startswith("/ui/") or target.startswith("/ui//")
            or "\\" in target or any(ord(c) < 33 for c in target)):
        return "/ui/"
    return target


class SessionStore:
    """Sessions in Redis under `runner:<instance>:ui-session:<sha256 of the id>`."""

    def __init__(self, redis: Redis, *, instance: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.prefix = f"runner:{instance}:ui-session:"
        self.ttl = max(1, int(ttl_seconds))

    def _key(self, session_id: str) -> str:
        return self.prefix + hashlib.sha256(session_id.encode()).hexdigest()

    def create(self, *, key_id: str, tenant: str, role: Role) -> tuple[str, UiSession]:
        """A new session (a fresh id at every sign-in: no fixation); (id, session).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        session_id = new_token()
        session = UiSession(key_id=key_id, tenant=tenant, role=role, csrf=new_token(),
                            created_at=utcnow().isoformat())
        try:
            self.redis.set(self._key(session_id), session.dumps(), ex=self.ttl)
        except RedisError as exc:
            raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc
        return session_id, session

    def get(self, session_id: str | None) -> UiSession | None:
        """The live session of this id, or None (none, expired, or not an id of ours).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        if not session_id or len(session_id) > 128:
            return None
        try:
            stored = self.redis.get(self._key(session_id))
        except RedisError as exc:
            raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc
        return UiSession.loads(stored) if stored is not None else None

    def delete(self, session_id: str | None) -> None:
        """End a session (sign-out, a revoked key). Best effort: it expires anyway."""
        if not session_id or len(session_id) > 128:
            return
        with contextlib.suppress(RedisError):
            self.redis.delete(self._key(session_id))


class ActiveKeys:
    """`Keys.is_active` remembered for a few seconds per key, so a page that polls
    every second or two does not ask the database each time; a revoked key still ends
    its sessions within `seconds`."""

    def __init__(self, is_active: Callable[[str], bool], *, seconds: float = 3.0) -> None:
        self._is_active = is_active
        self.seconds = seconds
        self._checked: dict[str, tuple[float, bool]] = {}

    def __call__(self, key_id: str) -> bool:
        now = time.monotonic()
        seen = self._checked.get(key_id)
        if seen is not None and now - seen[0] < self.seconds:
            return seen[1]
        active = bool(self._is_active(key_id))
        if len(self._checked) > 10_000:  # many keys: start over rather than grow
            self._checked.clear()
        self._checked[key_id] = (now, active)
        return active
