"""Run-end notices over the real Redis: they wake the watchers of their run and of
their deployment only."""

from __future__ import annotations

import asyncio

import redis

from runner.control.notify import EndWatcher, announce
from tests.integration.conftest import REDIS_URL, SESSION


def test_a_notice_wakes_the_watchers_of_its_run_only() -> None:
    publisher = redis.Redis.from_url(REDIS_URL)
    watcher = EndWatcher(REDIS_URL, f"notify-{SESSION}")

    async def woken(event: asyncio.Event, *, deployment: str, run: str,
                    tries: int) -> bool:
        for _ in range(tries):
            announce(publisher, deployment, run)
            try:
                await asyncio.wait_for(event.wait(), timeout=0.1)
                return True
            except TimeoutError:
                continue
        return False

    async def go() -> tuple[bool, bool, bool, bool]:
        ready = watcher.watch("run-ready")  # the subscriber thread subscribes first
        subscribed = await woken(ready, deployment=f"notify-{SESSION}", run="run-ready",
                                 tries=100)
        mine, other_run = watcher.watch("run-a"), watcher.watch("run-b")
        # Another deployment's notices for run-a, then ours for a marker run, on the
        # same connection: once the marker's notice has woken its watcher, whatever
        # the earlier ones could have woken is woken (one subscriber, in order).
        for _ in range(3):
            announce(publisher, f"elsewhere-{SESSION}", "run-a")
        marker = watcher.watch("run-marker")
        delivered = await woken(marker, deployment=f"notify-{SESSION}", run="run-marker",
                                tries=50)
        foreign = mine.is_set()
        own = await woken(mine, deployment=f"notify-{SESSION}", run="run-a", tries=50)
        for run, event in (("run-ready", ready), ("run-a", mine), ("run-b", other_run),
                           ("run-marker", marker)):
            watcher.unwatch(run, event)
        return (subscribed and delivered and not foreign, own, other_run.is_set(),
                bool(watcher._waiters))

    only_own_deployment, woken_by_own, other_woken, left = asyncio.run(go())
    assert only_own_deployment and woken_by_own
    assert not other_woken and not left


def test_announce_never_raises_without_redis() -> None:
    announce(redis.Redis(port=1, socket_connect_timeout=0.2), "x", "run")
