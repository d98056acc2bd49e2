"""Run-end notices over Redis pub/sub, so a held long poll answers as soon as its run
ends instead of checking the database over and over.

Best effort on both sides: a lost notice (Redis down, an API process restarting)
only means the API's slow check, a few times a second, sees the end instead.
"""

from __future__ import annotations

import asyncio
import threading
import time

import structlog
from redis import Redis
from redis.exceptions import RedisError

from runner.control.lifecycle import RunEnded

log = structlog.get_logger(__name__)


def channel(instance: str) -> str:
    """One channel per deployment (its instance name), like its containers' label."""
    return f"runner:run-ended:{instance}"


def announce(redis: Redis, instance: str, run_id: str) -> None:
    """Tell listening API processes that `run_id` ended (never raises)."""
    try:
        redis.publish(channel(instance), run_id)
    except RedisError as exc:
        log.debug("run_end_notice_lost", run_id=run_id, error=str(exc))


class RunEndNotice:
    """The run-end listener that publishes the notice (`Lifecycle(listeners=...)`)."""

    def __init__(self, redis: Redis, instance: str) -> None:
        self.redis, self.instance = redis, instance

    def __call__(self, ended: RunEnded) -> None:
        announce(self.redis, self.instance, ended.run_id)


Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Event]


class EndWatcher:
    """Wakes the long polls of one API process when their run's notice arrives.

    One subscriber thread per process, started on first use; it reconnects after a
    Redis outage.
    """

    def __init__(self, redis_url: str, instance: str) -> None:
        self.redis_url, self.channel = redis_url, channel(instance)
        self._waiters: dict[str, set[Waiter]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, run_id: str) -> asyncio.Event:
        """An event set when `run_id` ends; call from the event loop, then `unwatch`."""
        event = asyncio.Event()
        with self._lock:
            self._waiters.setdefault(run_id, set()).add((asyncio.get_running_loop(), event))
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="run-ends",
                                                daemon=True)
                self._thread.start()
        return event

    def unwatch(self, run_id: str, event: asyncio.Event) -> None:
        with self._lock:
            waiters = self._waiters.get(run_id, set())
            waiters.difference_update({w for w in waiters if w[1] is event})
            if not waiters:
                self._waiters.pop(run_id, None)

    def _wake(self, run_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(run_id, ()))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def _listen(self) -> None:
        while True:
            try:
                client = Redis.from_url(self.redis_url, socket_connect_timeout=5,
                                        socket_timeout=30)
                pubsub = client.pubsub(  # type: ignore[no-untyped-call]
                    ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                log.warning("run_end_notices_unavailable", error=str(exc))
                time.sleep(1)
