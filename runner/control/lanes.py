"""Fair dequeue: each tenant's queued runs wait in lanes of their own, and a worker
takes tenants in turn, so one tenant's backlog of thousands delays another tenant's
next run by about one run per worker, not by the whole backlog.

A lane is a Redis list of RQ job ids, `runner:lane:<queue>:<priority>:<tenant>`. The
jobs themselves are RQ's (their hash, status, origin queue and registries are as RQ
writes them), so the reconciler's `holds` and everything else that reads a job stays
as it was; only where an id waits changes. `runner:lanes:<queue>` names the lanes
that ever held a run ("<priority>:<tenant>", written by the push itself), and a push
that makes a new lane rings `runner:bell:<queue>`, which blocked workers also wait
on, so they look again and see it.

A worker's `TenantTurns` orders its wait: the tenant whose turn it is first, its
lanes high, normal, low (priority orders a tenant's own runs), then the tenants after
it in name order, wrapping around. A tenant keeps the turn for its weight in runs
(RUNNER_TENANT_WEIGHTS, default 1), then passes it on. RQ's own FIFO list of the
queue (`rq:queue:<queue>`: runs queued by releases before this one, or with
RUNNER_FAIR_DEQUEUE=off) takes its turn like one more tenant.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.timeouts import BaseDeathPenalty

from runner.domain import Priority

LANE_PREFIX = "runner:lane:"
PRIORITY_ORDER = (Priority.HIGH, Priority.NORMAL, Priority.LOW)
LEGACY = ""  # the pseudo-tenant of the queue's own RQ list
# A blocked worker looks for new lanes at least this often, even when another worker
# took the bell that announced them.
LOOK_AGAIN_SECONDS = 5
BELL_TOKENS_KEPT = 8
TURN_SECONDS = 3600  # a shared turn nobody has moved for an hour is forgotten

# Push job ids (ARGV[4..]) onto a lane, in order (at its front, still in order, for
# retries); a lane's first push names it in the set and rings the bell.
_PUSH = """
if ARGV[2] == '1' then
  for i = #ARGV, 4, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end
else
  for i = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[3], '1')
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[3]), -1)
end
return 1
"""


class LanePusher:
    """Puts job ids on a tenant's lane (through a script registered once)."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_PUSH)

    def push(self, client: Redis | Pipeline, queue: str, tenant: str, priority: Priority,
             job_ids: Sequence[str], *, at_front: bool = False) -> None:
        """Queue `job_ids` on the lane, on `client` (a pipeline: with its other writes)."""
        if job_ids:
            self._script(keys=[lane_key(queue, tenant, priority), lanes_key(queue),
                               bell_key(queue)],
                         args=[f"{priority.value}:{tenant}", "1" if at_front else "0",
                               BELL_TOKENS_KEPT, *job_ids], client=client)


def lane_key(queue: str, tenant: str, priority: Priority) -> str:
    return f"{LANE_PREFIX}{queue}:{priority.value}:{tenant}"


def lanes_key(queue: str) -> str:
    return f"runner:lanes:{queue}"


def bell_key(queue: str) -> str:
    return f"runner:bell:{queue}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def lane_members(redis: Redis, queues: Sequence[str]) -> dict[str, dict[str, set[Priority]]]:
    """Per queue, each tenant that has a lane and the priorities of its lanes (one
    round trip)."""
    return _lanes_and(redis, queues, None)[0]


def _lanes_and(redis: Redis, queues: Sequence[str], key: str | None
               ) -> tuple[dict[str, dict[str, set[Priority]]], Any]:
    """`lane_members`, and the value of `key` (None without one), in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for name in queues:
        pipe.smembers(lanes_key(name))
    if key is not None:
        pipe.get(key)
    answers = pipe.execute()
    found: dict[str, dict[str, set[Priority]]] = {}
    for name, members in zip(queues, answers[:len(queues)], strict=True):
        tenants: dict[str, set[Priority]] = {}
        for member in members:
            priority, _, tenant = _text(member).partition(":")
            try:
                tenants.setdefault(tenant, set()).add(Priority(priority))
            except ValueError:  # not written by this code: leave it alone
                continue
        found[name] = tenants
    return found, answers[len(queues)] if key is not None else None


def queue_depths(redis: Redis, queues: Sequence[str]) -> dict[str, int]:
    """Runs waiting per queue: its lanes and its RQ list together (two round trips)."""
    members = lane_members(redis, queues)
    pipe = redis.pipeline(transaction=False)
    counted: list[str] = []
    for name in queues:
        pipe.llen(f"rq:queue:{name}")
        counted.append(name)
        for tenant, priorities in members[name].items():
            for priority in priorities:
                pipe.llen(lane_key(name, tenant, priority))
                counted.append(name)
    depths = dict.fromkeys(queues, 0)
    for name, length in zip(counted, pipe.execute(), strict=True):
        depths[name] += int(length)
    return depths


class TenantTurns:
    """Turn-taking among tenants (weights: runs per turn; default 1).

    The turn is shared by the workers that serve the same queues: it is kept in Redis
    (`turn_key`, read with the lanes, written after each dequeue), so when one worker
    serves a tenant the others pass it by too, and a tenant that has just queued a run
    waits for the next worker to get free, not for a particular one.
    """

    def __init__(self, weights: Mapping[str, int] | None = None) -> None:
        self.weights = dict(weights or {})
        self.current: str | None = None
        self.used = 0

    def state(self) -> str:
        """The turn as stored: "<used> <tenant>"."""
        return f"{self.used} {self.current}" if self.current is not None else ""

    def load(self, stored: bytes | str | None) -> None:
        """Take the turn stored by the last worker that dequeued (kept if unreadable)."""
        text = _text(stored) if stored else ""
        used, _, tenant = text.partition(" ")
        if used.isdigit() and tenant:
            self.current, self.used = tenant, int(used)

    def order(self, tenants: Iterable[str]) -> list[str]:
        """The tenants in the order this worker serves them next."""
        names = sorted(set(tenants))
        current = self.current
        if current is None:
            return names
        after = [t for t in names if t > current]
        before = [t for t in names if t < current]
        if current not in names:
            return after + before
        if self.used < self.weights.get(current, 1):
            return [current, *after, *before]
        return [*after, *before, current]

    def served(self, tenant: str) -> None:
        if tenant == self.current:
            self.used += 1
        else:
            self.current, self.used = tenant, 1


class LaneQueue(Queue):
    """An RQ queue whose workers take tenants in turn over its lanes (`turns`);
    without turns a dequeue is RQ's own."""

    def __init__(self, name: str = "default", *, turns: TenantTurns | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.turns = turns

    @classmethod
    def dequeue_any(cls, queues: Iterable[Queue], timeout: int | None, connection: Redis,
                    job_class: type[Job] | None = None, serializer: Any = None,
                    death_penalty_class: type[BaseDeathPenalty] | None = None,
                    ) -> tuple[Job, Queue] | None:
        """The next job of `queues` (in their order), tenants taking turns within each.

        `timeout` None: return at once (None when all are empty); else block up to
        `timeout` seconds, then raise DequeueTimeout, as RQ's does.
        """
        queues = list(queues)
        turns = next((q.turns for q in queues if isinstance(q, LaneQueue) and q.turns), None)
        if turns is None:
            return super().dequeue_any(queues, timeout, connection, job_class=job_class,
                                       serializer=serializer,
                                       death_penalty_class=death_penalty_class)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            keys, owners = _wait_order(connection, queues, turns)
            popped = _pop(connection, keys, deadline)
            if popped is None:
                if deadline is None:
                    return None
                if time.monotonic() >= deadline:
                    raise DequeueTimeout(timeout, keys)
                continue
            key, job_id = _text(popped[0]), _text(popped[1])
            if key not in owners:  # a bell: look for the new lane
                continue
            queue, tenant = owners[key]
            fetched = cls._fetch_dequeued_job(connection, queue.key, job_id,
                                              job_class=job_class, serializer=serializer,
                                              death_penalty_class=death_penalty_class)
            if fetched is None:  # the job is gone (expired, deleted): the next one
                continue
            turns.served(tenant)
            with contextlib.suppress(RedisError):  # the turn is a hint: never lose a job
                connection.set(turn_key([q.name for q in queues]), turns.state(),
                               ex=TURN_SECONDS)
            return fetched


def turn_key(queues: Sequence[str]) -> str:
    """Where the workers of one set of queues keep their shared turn."""
    return "runner:turn:" + ",".join(sorted(queues))


def _wait_order(connection: Redis, queues: list[Queue], turns: TenantTurns,
                ) -> tuple[list[str], dict[str, tuple[Queue, str]]]:
    """The keys to wait on, in order (each queue's lanes by turn and priority, its RQ
    list as one more tenant, then the bells), and which queue and tenant owns each."""
    names = [q.name for q in queues]
    members, stored = _lanes_and(connection, names, turn_key(names))
    turns.load(stored)
    keys: list[str] = []
    owners: dict[str, tuple[Queue, str]] = {}
    for queue in queues:
        tenants = members[queue.name]
        for tenant in turns.order([*tenants, LEGACY]):
            if tenant == LEGACY:
                lane_keys = [queue.key]
            else:
                lane_keys = [lane_key(queue.name, tenant, p) for p in PRIORITY_ORDER
                             if p in tenants[tenant]]
            for key in lane_keys:
                keys.append(key)
                owners[key] = (queue, tenant)
    keys.extend(bell_key(q.name) for q in queues)
    return keys, owners


def _pop(connection: Redis, keys: list[str], deadline: float | None) -> Any:
    """(key, value) from the first non-empty key, or None: at once without a deadline,
    else blocking until the deadline but at most LOOK_AGAIN_SECONDS."""
    if deadline is None:
        for key in keys:
            value = connection.lpop(key)
            if value is not None:
                return key, value
        return None
    wait = min(LOOK_AGAIN_SECONDS, max(1, math.ceil(deadline - time.monotonic())))
    return connection.blpop(keys, wait)
