"""The webhook sender: a daemon thread that sends due deliveries from the outbox.

Every worker process and every API process that has webhooks configured runs one
(never on a worker's attempt thread: a slow receiver delays no run). Each pass claims
one due delivery at a time (`webhooks.claim_next`), sends it and records the attempt;
a 2xx is delivered, anything else is retried with backoff until
RUNNER_WEBHOOK_RETRY_SECONDS after the run ended, then failed. A process that dies
mid-send leaves a claim that lapses by itself: the delivery is sent again by whichever
sender comes next (at least once; receivers dedupe by `Runner-Delivery`).

SSRF: the host is resolved once, every address is judged (`webhooks.pick_target`),
and the connection goes to the checked address, never to a second resolution: the
URL's host is replaced by that address, with `Host` (and, for https, the TLS server
name used for SNI and certificate checks) set to the original name. No proxy from the
environment, no redirects, no connection kept for another delivery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import structlog

from runner import __version__
from runner.control.outbox import (
    Delivery,
    DeliveryState,
    claim_next,
    ended_run,
    record_attempt,
)
from runner.control.reports import HasSessions
from runner.control.webhooks import (
    Resolver,
    backoff_seconds,
    delivery_body,
    matching_prefix,
    pick_target,
    signature,
    system_resolver,
)
from runner.domain import utcnow
from runner.errors import RunnerError
from runner.settings import Settings

log = structlog.get_logger(__name__)

USER_AGENT = f"container-runner/{__version__}"
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_CAP_SECONDS = 3600.0
# A claim outlives the slowest attempt (resolution, then the POST's timeout) by this.
LEASE_MARGIN_SECONDS = 30.0
Outcome = str  # "delivered", "retry" or "failed": the metric's label
Observe = Callable[[Outcome], None]


def _ignore(_outcome: Outcome) -> None:
    pass


class WebhookSender:
    """Sends the outbox's due deliveries, signed with `secret`; `start` runs it in a
    thread of its own (polling every `poll_seconds`, or at once on `wake`).

    `backoff_base`/`backoff_cap`, `resolve` and `transport` are for tests: a short
    backoff, a fake resolver, an `httpx.MockTransport`.
    """

    def __init__(self, store: HasSessions, *, prefixes: list[str], secret: str,
                 timeout_seconds: float = 5.0, retry_seconds: float = 86400.0,
                 poll_seconds: float = 1.0, backoff_base: float = BACKOFF_BASE_SECONDS,
                 backoff_cap: float = BACKOFF_CAP_SECONDS,
                 resolve: Resolver = system_resolver,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.store, self.prefixes, self.secret = store, list(prefixes), secret
        self.timeout_seconds, self.retry_seconds = timeout_seconds, retry_seconds
        self.poll_seconds = poll_seconds
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.resolve = resolve
        self.lease_seconds = timeout_seconds + LEASE_MARGIN_SECONDS
        self.observe: Observe = _ignore
        self._client = httpx.Client(
            transport=transport, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(timeout_seconds),
            limits=httpx.Limits(max_keepalive_connections=0))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, store: HasSessions, settings: Settings, *,
                      backoff_base: float = BACKOFF_BASE_SECONDS,
                      backoff_cap: float = BACKOFF_CAP_SECONDS,
                      resolve: Resolver = system_resolver,
                      transport: httpx.BaseTransport | None = None) -> WebhookSender | None:
        """The process's sender, or None when webhooks are off here (no allowlist or no
        secret): such a process leaves deliveries to the processes configured for them."""
        secret = settings.webhook_secret.get_secret_value()
        if not settings.webhook_prefixes or not secret:
            return None
        return cls(store, prefixes=settings.webhook_prefixes, secret=secret,
                   timeout_seconds=settings.webhook_timeout_seconds,
                   retry_seconds=settings.webhook_retry_seconds,
                   poll_seconds=settings.webhook_poll_seconds,
                   backoff_base=backoff_base, backoff_cap=backoff_cap, resolve=resolve,
                   transport=transport)

    # The thread --------------------------------------------------------------------

    def wake(self, _ended: object = None) -> None:
        """Look for due deliveries now (also a run-end listener: `Lifecycle(listeners=)`)."""
        self._wake.set()

    def start(self, *, observe: Observe | None = None) -> None:
        """Run in a daemon thread until `stop`; `observe` counts each attempt's outcome."""
        if observe is not None:
            self.observe = observe
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
            self._thread.start()
            log.info("webhook_sender_started", prefixes=len(self.prefixes))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the attempt in progress (a POST is bounded by its timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:  # the loop outlives a bad pass, and a database that is away
                self.run_once()
            except RunnerError as exc:
                log.warning("webhook_pass_failed", error=exc.message)
            except Exception:
                log.exception("webhook_pass_failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def run_once(self) -> int:
        """Send every delivery due now, one claim at a time; how many were attempted."""
        attempted = 0
        while not self._stop.is_set():
            delivery = claim_next(self.store, now=utcnow(), lease_seconds=self.lease_seconds)
            if delivery is None:
                break
            self.deliver(delivery)
            attempted += 1
        return attempted

    # One attempt -------------------------------------------------------------------

    def deliver(self, delivery: Delivery) -> Outcome:
        """Send a claimed delivery once and record how it went."""
        bound = log.bind(delivery_id=delivery.id, run_id=delivery.run_id)
        started = time.monotonic()
        status_code, error = self._attempt(delivery)
        now = utcnow()
        fields = {"attempt": delivery.attempts + 1, "status_code": status_code,
                  "duration_ms": round((time.monotonic() - started) * 1000, 1)}
        if error is None and status_code is not None and 200 <= status_code < 300:
            outcome: Outcome = "delivered"
            recorded = record_attempt(self.store, delivery, state=DeliveryState.DELIVERED,
                                      now=now, status_code=status_code)
            bound.info("webhook_delivered", **fields)
        else:
            error = error or f"answered {status_code}"
            deadline = delivery.created_at + timedelta(seconds=self.retry_seconds)
            if now >= deadline:
                outcome = "failed"
                recorded = record_attempt(self.store, delivery, state=DeliveryState.FAILED,
                                          now=now, status_code=status_code, error=error)
                bound.warning("webhook_failed", error=error, **fields)
            else:
                outcome = "retry"
                wait = backoff_seconds(delivery.attempts + 1, base=self.backoff_base,
                                       cap=self.backoff_cap)
                due = min(now + timedelta(seconds=wait), deadline)
                recorded = record_attempt(self.store, delivery, state=DeliveryState.PENDING,
                                          now=now, status_code=status_code, error=error,
                                          next_attempt_at=due)
                bound.info("webhook_retry", error=error, next_attempt_at=due.isoformat(),
                           **fields)
        if not recorded:  # another sender took it over after our claim lapsed
            bound.info("webhook_attempt_superseded")
        self.observe(outcome)
        return outcome

    def _attempt(self, delivery: Delivery) -> tuple[int | None, str | None]:
        """POST the delivery: (status code, None) when it answered, (None, why) when it
        was refused or could not be sent."""
        prefix = matching_prefix(delivery.url, self.prefixes)
        if prefix is None:
            return None, "not under any prefix of RUNNER_WEBHOOK_ALLOWED_URLS here"
        found = ended_run(self.store, delivery.run_id)
        if found is None:
            return None, "the run is gone"
        try:
            body = delivery_body(*found)
        except ValueError as exc:  # a value stored before inputs were strict JSON
            return None, f"the run does not encode as strict JSON: {exc}"
        parts = urlsplit(delivery.url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = pick_target(host, port, prefix=prefix, resolve=self.resolve)
        if target.address is None:
            return None, target.refused
        url = httpx.URL(delivery.url).copy_with(host=target.address)
        headers = {"Host": parts.netloc, "Content-Type": "application/json",
                   "User-Agent": USER_AGENT, "Runner-Delivery": delivery.id,
                   "Runner-Signature": signature(self.secret, body,
                                                 timestamp=int(time.time()))}
        # https: the TLS server name (SNI and the certificate's check) stays the host's.
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            with self._client.stream("POST", url, content=body, headers=headers,
                                     extensions=extensions) as response:
                return response.status_code, None  # the answer's body is never read
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
