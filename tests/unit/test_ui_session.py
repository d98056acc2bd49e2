"""The dashboard's session and CSRF rules (api/ui/session.py), without a server."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from api.ui.session import (
    ActiveKeys,
    SessionStore,
    UiSession,
    cookie_options,
    csrf_ok,
    new_token,
    safe_next,
)
from runner.domain import Role


class DictRedis:
    """The three Redis calls a session store makes, kept in a dict."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.ttls: dict[str, int] = {}

    def set(self, key: str, value: str, *, ex: int) -> None:
        self.values[key], self.ttls[key] = value.encode(), ex

    def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


def store(redis: Any, ttl: float = 3600) -> SessionStore:
    return SessionStore(redis, instance="inst", ttl_seconds=ttl)


def test_a_csrf_token_matches_only_itself_and_never_when_empty() -> None:
    token = new_token()
    assert csrf_ok(token, token)
    assert not csrf_ok(token, token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert not csrf_ok(token, None)
    assert not csrf_ok(token, "")
    assert not csrf_ok("", "")


def test_tokens_are_256_random_bits_and_differ() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) == 43 for t in tokens)


@pytest.mark.parametrize("https", [True, False])
def test_the_cookie_is_http_only_same_site_strict_on_ui_and_secure_over_https(
        https: bool) -> None:
    assert cookie_options(https=https, max_age=60) == {
        "max_age": 60, "path": "/ui", "httponly": True, "samesite": "strict",
        "secure": https}


def test_a_session_is_stored_under_the_hash_of_its_id_with_the_ttl() -> None:
    redis = DictRedis()
    sessions = store(redis, ttl=120)
    session_id, session = sessions.create(key_id="k1", tenant="acme", role=Role.VIEWER)
    key = "runner:inst:ui-session:" + hashlib.sha256(session_id.encode()).hexdigest()
    assert list(redis.values) == [key] and redis.ttls[key] == 120
    assert session_id.encode() not in redis.values[key]  # the id itself is not kept
    assert sessions.get(session_id) == session
    assert session.role is Role.VIEWER and session.csrf and session.created_at


def test_each_sign_in_makes_a_new_id_and_its_own_csrf_token() -> None:
    sessions = store(DictRedis())
    first_id, first = sessions.create(key_id="k1", tenant="acme", role=Role.ADMIN)
    second_id, second = sessions.create(key_id="k1", tenant="acme", role=Role.ADMIN)
    assert first_id != second_id and first.csrf != second.csrf


def test_a_deleted_unknown_or_malformed_session_is_none() -> None:
    redis = DictRedis()
    sessions = store(redis)
    session_id, _ = sessions.create(key_id="k1", tenant="acme", role=Role.SUBMITTER)
    sessions.delete(session_id)
    assert sessions.get(session_id) is None
    assert sessions.get(None) is None and sessions.get("") is None
    assert sessions.get("x" * 500) is None
    redis.values["runner:inst:ui-session:" + hashlib.sha256(b"bad").hexdigest()] = b"{"
    assert sessions.get("bad") is None
    assert UiSession.loads('{"key_id": "k", "tenant": "t", "role": "root", "csrf": "c", '
                           '"created_at": "now"}') is None


@pytest.mark.parametrize(("target", "expected"), [
    ("/ui/runs?status=failed", "/ui/runs?status=failed"),
    ("/ui/runs/abc", "/ui/runs/abc"),
    (None, "/ui/"),
    ("", "/ui/"),
    ("https://evil.example/ui/", "/ui/"),
    ("//evil.example/", "/ui/"),
    ("/ui//evil.example", "/ui/"),
    ("/ui/\\evil", "/ui/"),
    ("/v1/runs", "/ui/"),
    ("/ui/runs\r\nSet-Cookie: x=1", "/ui/"),
])
def test_after_sign_in_only_a_dashboard_path_is_followed(target: str | None,
                                                          expected: str) -> None:
    assert safe_next(target) == expected


def test_a_key_check_is_remembered_for_a_few_seconds_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    answers = {"k1": True}
    now = [100.0]
    monkeypatch.setattr("api.ui.session.time.monotonic", lambda: now[0])
    active = ActiveKeys(lambda key: (asked.append(key), answers[key])[1], seconds=3)
    assert active("k1") and active("k1") and asked == ["k1"]
    answers["k1"] = False  # revoked
    now[0] += 2.9
    assert active("k1")  # still remembered
    now[0] += 0.2
    assert not active("k1") and asked == ["k1", "k1"]
