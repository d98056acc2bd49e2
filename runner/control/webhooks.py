"""Webhooks: which URLs a run may carry, where a delivery may connect (SSRF), what it
carries and how it is signed, and the wait between attempts (docs/api.md, "Webhooks").

Pure rules, no I/O but the one name resolution of `system_resolver`: the outbox rows
are `runner.control.outbox`, the sending loop `runner.control.delivery`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from runner.domain import Artifact, Run, RunStatus
from runner.errors import InvalidRequestError
from runner.settings import Settings

EVENT = "run.finished"
MAX_URL_CHARS = 2048
SIGNATURE_TOLERANCE_SECONDS = 300


# Which URLs a run may carry ---------------------------------------------------------

def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a webhook whatever the allowlist says, or None."""
    if len(url) > MAX_URL_CHARS:
        return f"is {len(url)} characters, over {MAX_URL_CHARS}"
    if any(not 0x21 <= ord(c) <= 0x7E for c in url) or "\\" in url:
        return "must be printable ASCII without spaces or backslashes (percent-encode)"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6 literal
        return "is not a URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if "#" in url:
        return "must not have a fragment (#...)"
    if "@" in parts.netloc:
        return "must not carry a user or password (user:pass@)"
    if not parts.hostname:
        return "has no host"
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError:
        return "has an invalid port"
    return None


def under_prefix(url: str, prefix: str) -> bool:
    """Whether `url` is under the operator's `prefix`: it starts with it, names the same
    host (so `https://hooks.example.com` never lets in `hooks.example.com.evil.net`),
    and, for a prefix without a path, the same port (unless it ends in ":": any port)."""
    if not url.startswith(prefix):
        return False
    got, allowed = urlsplit(url), urlsplit(prefix)
    if got.hostname != allowed.hostname:
        return False
    if allowed.path or allowed.query or allowed.netloc.endswith(":"):
        return True  # the prefix's authority ended before the match did
    return got.netloc.lower() == allowed.netloc.lower()


def matching_prefix(url: str, prefixes: Sequence[str]) -> str | None:
    """The first allowlist prefix `url` is under, or None."""
    return next((p for p in prefixes if under_prefix(url, p)), None)


@dataclass(frozen=True)
class WebhookRules:
    """What a submission's webhook_url is checked against: the operator's prefixes, and
    whether a secret to sign deliveries is configured (without one: no webhooks)."""

    prefixes: tuple[str, ...] = ()
    signed: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookRules:
        return cls(tuple(settings.webhook_prefixes),
                   bool(settings.webhook_secret.get_secret_value()))

    def check(self, url: str) -> str:
        """The URL as it is stored.

        Raises:
            InvalidRequestError: field `webhook_url`: malformed, webhooks are off here
                (no allowlist, or no secret), or not under an allowed prefix.
        """
        problem = url_problem(url)
        if problem is not None:
            raise InvalidRequestError(f"webhook_url {problem}", field="webhook_url")
        if not self.prefixes:
            raise InvalidRequestError(
                "webhook_url: this service sends no webhooks (the operator allowed no "
                "URL: RUNNER_WEBHOOK_ALLOWED_URLS is empty)", field="webhook_url")
        if not self.signed:
            raise InvalidRequestError(
                "webhook_url: webhooks are off until the operator sets "
                "RUNNER_WEBHOOK_SECRET (deliveries are always signed)", field="webhook_url")
        if matching_prefix(url, self.prefixes) is None:
            raise InvalidRequestError(
                "webhook_url is not under any URL prefix the operator allows "
                "(RUNNER_WEBHOOK_ALLOWED_URLS)", field="webhook_url")
        return url


# Where a delivery may connect (SSRF) ---------------------------------------------------

Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order, without repeats.

    Raises:
        OSError: the name does not resolve.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_refused(address: str) -> str | None:
    """Why a delivery may not connect to `address` (a kind of address), or None for a
    public one. IPv4-mapped IPv6 addresses are judged as the IPv4 address they hold."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved",
                 "private"):  # the narrowest name first: private covers several
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


def operator_named(prefix: str) -> bool:
    """Whether the prefix names its host as an IP literal or `localhost`: then the
    operator chose that address, private or loopback as it may be."""
    host = urlsplit(prefix).hostname or ""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Target:
    """Where a delivery connects: the checked address, or why there is none."""

    address: str | None
    refused: str | None = None


def pick_target(host: str, port: int, *, prefix: str, resolve: Resolver) -> Target:
    """Resolve `host` once and judge every address it has; connect to the first.

    Any private, loopback, link-local, multicast, reserved or unspecified address
    refuses the delivery, unless the matched `prefix` names the host itself as an IP
    literal or `localhost` (and `localhost` must then be loopback only).
    """
    try:
        addresses = resolve(host, port)
    except OSError as exc:
        return Target(None, f"cannot resolve {host}: {exc}")
    if not addresses:
        return Target(None, f"{host} resolves to no address")
    if operator_named(prefix) and host != "localhost":
        return Target(addresses[0])  # an IP literal: the operator's own choice
    for address in addresses:
        kind = address_refused(address)
        if host == "localhost" and operator_named(prefix):
            if kind == "loopback":
                continue
            return Target(None, f"localhost resolves to {address}, not a loopback "
                                "address; refused")
        if kind is not None:
            return Target(None, f"{host} resolves to {address}, a {kind} address; "
                                "refused (only a prefix naming it as an IP allows that)")
    return Target(addresses[0])


# What a delivery carries, and its signature ------------------------------------------

def _time(value: datetime | None) -> str | None:
    """A time as the API writes it (ISO 8601, UTC, `Z`)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def run_document(run: Run, artifacts: Sequence[Artifact]) -> dict[str, Any]:
    """The run object of a delivery: the fields and values of GET /v1/runs/{id}
    (`api.schemas.RunOut`, a unit test holds the names equal) without `attempts`,
    `last_log_lines`, `provenance` and `webhook`."""
    return {
        "id": run.id, "status": run.status.value, "processor": run.processor,
        "version": run.version, "image": run.image, "input": run.input,
        "result": run.result, "exit_code": run.exit_code, "error_code": run.error_code,
        "error_message": run.error_message, "attempt": run.attempt,
        "max_attempts": run.max_attempts, "labels": run.labels,
        "timeout_seconds": run.timeout_seconds, "log_bytes": run.log_bytes,
        "log_truncated": run.log_truncated, "manifest_revision": run.manifest_revision,
        "created_at": _time(run.created_at), "started_at": _time(run.started_at),
        "finished_at": _time(run.finished_at),
        "next_attempt_at": _time(run.next_attempt_at) if run.status is RunStatus.QUEUED
        else None,
        "error_stage": run.error_stage, "cancel_requested": run.cancel_requested_at is not None,
        "replay_of": run.replay_of, "files": run.files,
        "artifacts": [a.public() for a in artifacts], "reused_from": run.reused_from,
        "priority": run.priority.value,
    }


def delivery_body(run: Run, artifacts: Sequence[Artifact]) -> bytes:
    """The exact bytes POSTed (and signed)."""
    return json.dumps({"event": EVENT, "run": run_document(run, artifacts)},
                      separators=(",", ":"), allow_nan=False).encode()


def signature(secret: str, body: bytes, *, timestamp: int) -> str:
    """`Runner-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def signature_valid(header: str, body: bytes, secret: str, *,
                    tolerance: float = SIGNATURE_TOLERANCE_SECONDS,
                    now: float | None = None) -> bool:
    """What a receiver checks (docs/api.md has the same in ten lines): the MAC, and a
    timestamp within `tolerance` seconds of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        stamp = int(fields.get("t", ""))
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - stamp) > tolerance:
        return False
    expected = signature(secret, body, timestamp=stamp).partition(",v1=")[2]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def backoff_seconds(attempts: int, *, base: float, cap: float,
                    rng: Callable[[], float] = random.random) -> float:
    """The wait after failed attempt `attempts` (1, 2, ...): base doubling per attempt
    up to `cap`, each drawn between half of it and all of it (equal jitter), so
    receivers coming back from an outage are not hit by every sender at once."""
    full: float = min(cap, base * 2.0 ** max(0, attempts - 1))
    return full / 2 + full / 2 * rng()
