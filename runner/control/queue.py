"""The transport: RQ on Redis. Redis carries run ids only; the database is the truth.

Each job is one attempt of one run (`run-<id>-<attempt>`), so a retry scheduled by
the attempt before it never collides with that attempt's own job. A job that is
lost (Redis flushed, a worker killed between dequeue and claim) is found and
enqueued again by the reconciler, and a job that arrives twice loses its claim.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.utils import utcparse

from runner.control.lanes import LanePusher, queue_depths
from runner.domain import Priority, Run
from runner.errors import ServiceUnavailableError

JOB_FUNCTION = "runner.execution.worker.perform"
# The RQ job timeout sits well past the container deadline, so the runner's own
# timeout (SIGTERM, grace, SIGKILL) always fires first.
JOB_TIMEOUT_MARGIN_SECONDS = 300
FAILURE_TTL_SECONDS = 7 * 24 * 3600
HELD_STATES = {b"queued", b"deferred"}
# A job a worker has just dequeued ("started") is held too, for as long as a claim can
# take (milliseconds; seconds on a starved machine): past that, a run still queued in
# the database means its worker died between dequeue and claim, and the job is lost.
STARTED_HOLD_SECONDS = 5.0


def job_id(run_id: str, attempt: int) -> str:
    return f"run-{run_id}-{attempt}"


# Routing by capability: a processor that `require`s host tags is queued on its base
# queue suffixed with the sorted tag set ("runner@gpu+large-memory"); a worker serves
# the queue of every subset of its host's RUNNER_HOST_TAGS, so a run reaches only
# hosts that have all of its tags, and an untagged run any host. Six tags at most
# (64 queues per base), as the manifest schema allows.
TAG_SEPARATOR, TAG_JOINER = "@", "+"
MAX_HOST_TAGS = 6


def tagged_queue(base: str, tags: Sequence[str]) -> str:
    """The queue of runs on `base` that need every one of `tags`."""
    wanted = sorted(set(tags))
    return f"{base}{TAG_SEPARATOR}{TAG_JOINER.join(wanted)}" if wanted else base


def queue_tags(name: str) -> tuple[str, frozenset[str]]:
    """A queue's base and the tag set it needs (empty for an untagged queue)."""
    base, _, tags = name.partition(TAG_SEPARATOR)
    return base, frozenset(t for t in tags.split(TAG_JOINER) if t)


def host_queues(bases: Sequence[str], host_tags: Sequence[str]) -> list[str]:
    """Every queue a host with `host_tags` serves on `bases`: each base with each
    subset of its tags, the most demanding first (so tagged work, which only such
    hosts can take, is not left behind untagged work anyone can do).

    Raises:
        ValueError: more than MAX_HOST_TAGS tags.
    """
    tags = sorted(set(host_tags))
    if len(tags) > MAX_HOST_TAGS:
        raise ValueError(f"a host has at most {MAX_HOST_TAGS} tags, not {len(tags)}")
    subsets = [combo for size in range(len(tags), -1, -1)
               for combo in itertools.combinations(tags, size)]
    return [tagged_queue(base, combo) for base in bases for combo in subsets]


def can_serve(host_tags: Iterable[str], queue: str) -> bool:
    """Whether a host with `host_tags` serves `queue`."""
    return queue_tags(queue)[1] <= frozenset(host_tags)


def served_queues(redis: Redis) -> set[str]:
    """The queues some registered worker serves now (RQ drops a dead worker's
    registration once its heartbeat lapses).

    Raises:
        ServiceUnavailableError: Redis cannot be reached.
    """
    try:
        return {name for worker in Worker.all(connection=redis)
                for name in worker.queue_names()}
    except RedisError as exc:
        raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc


def unserved(queued: Mapping[str, int], served: Collection[str]) -> dict[str, int]:
    """Of the queued runs per queue, those on a queue no live worker serves: runs that
    wait for a host that is not there (a tag no host has, every such host down)."""
    return {queue: count for queue, count in queued.items()
            if count and queue not in served}


def _held(status: bytes | None, started_at: bytes | None, now: datetime) -> bool:
    """Whether a job with this status and start time counts as held (see `holds`)."""
    if status in HELD_STATES:
        return True
    if status != b"started" or not started_at:
        return False
    text = started_at.decode() if isinstance(started_at, bytes) else str(started_at)
    try:
        started = utcparse(text)  # RQ's own reader of the timestamps it writes
    except ValueError:
        return False
    return (now - started).total_seconds() < STARTED_HOLD_SECONDS


class RunQueue:
    """Puts run attempts on the RQ queue each run's processor is routed to: in the
    run's tenant lane (`fair`, runner/control/lanes.py), or on the queue's one FIFO
    list (RUNNER_FAIR_DEQUEUE=off, as releases before 0009 did)."""

    def __init__(self, redis: Redis, *, fair: bool = True) -> None:
        self.redis, self.fair = redis, fair
        self._lanes = LanePusher(redis)

    @classmethod
    def from_url(cls, url: str, *, fair: bool = True) -> RunQueue:
        return cls(Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                  health_check_interval=30), fair=fair)

    def enqueue(self, run: Run, *, stop_grace_seconds: float = 5.0) -> None:
        """Queue the run's next attempt now (a retry at the front of its lane: the run
        has waited its turn once already).

        A retry waiting out its backoff is not put in Redis early: its next attempt
        time is in the database, and each worker's requeue pass enqueues it when due
        (RQ's own scheduler is not used: it forks a process that would inherit the
        worker's database connections).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        self.enqueue_many([run], stop_grace_seconds=stop_grace_seconds)

    def enqueue_many(self, runs: Sequence[Run], *, stop_grace_seconds: float = 5.0) -> None:
        """Queue each run's next attempt, all in one transaction of one round trip.

        Each job is RQ's own: its hash is what `Job.to_dict` writes for RQ's enqueue
        (status queued, origin the run's queue), so RQ's workers, registries and
        `Job.fetch` read it as theirs. Only the pushes differ: one per lane, of all
        its ids, instead of several commands per job.

        Raises:
            ServiceUnavailableError: Redis cannot be reached (then none is queued; the
                database has them all, and the reconciler queues them).
        """
        if not runs:
            return
        now = datetime.now(UTC)
        pushes: dict[tuple[str, str, Priority, bool], list[str]] = {}
        try:
            pipe = self.redis.pipeline()
            for run in runs:
                attempt = run.attempt + 1
                job = Job.create(
                    JOB_FUNCTION, args=(run.id, attempt), connection=self.redis,
                    id=job_id(run.id, attempt), origin=run.queue, status=JobStatus.QUEUED,
                    timeout=int(run.timeout_seconds + stop_grace_seconds
                                + JOB_TIMEOUT_MARGIN_SECONDS),
                    result_ttl=0, failure_ttl=FAILURE_TTL_SECONDS,
                    description=f"run {run.id} attempt {attempt} ({run.processor})")
                job.enqueued_at = now
                pipe.hset(job.key, mapping=job.to_dict())
                lane = (run.tenant, run.priority) if self.fair else (None, Priority.NORMAL)
                pushes.setdefault((run.queue, *lane, attempt > 1), []).append(job.id)
            pipe.sadd(Queue.redis_queues_keys, *{f"rq:queue:{q}" for q, *_ in pushes})
            for (name, tenant, priority, front), ids in pushes.items():
                if tenant is None:  # RUNNER_FAIR_DEQUEUE=off: RQ's own list
                    (pipe.lpush(f"rq:queue:{name}", *reversed(ids)) if front
                     else pipe.rpush(f"rq:queue:{name}", *ids))
                else:
                    self._lanes.push(pipe, name, tenant, priority, ids, at_front=front)
            pipe.execute()
        except RedisError as exc:
            raise ServiceUnavailableError(f"queue unavailable: {exc}") from exc

    def depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Runs waiting on each queue (all its lanes and its RQ list).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        try:
            return queue_depths(self.redis, queues)
        except RedisError as exc:
            raise ServiceUnavailableError(f"queue unavailable: {exc}") from exc

    def enqueue_once(self, run: Run, *, stop_grace_seconds: float = 5.0,
                     window_seconds: float = 10.0) -> bool:
        """`enqueue` unless another process enqueued this same due attempt within
        `window_seconds`; False if it did.

        Every worker runs the requeue pass, so two of them can find the same due run
        absent from Redis at once; without this both would enqueue it, and the job
        would be delivered twice (harmless to the run, which only one claim can win,
        but each duplicate costs a worker a dequeue and RQ a failed cleanup).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        due = run.next_attempt_at or run.created_at
        key = f"runner:requeue:{job_id(run.id, run.attempt + 1)}:{due.isoformat()}"
        try:
            first = self.redis.set(key, b"1", nx=True, px=int(window_seconds * 1000))
        except RedisError as exc:
            raise ServiceUnavailableError(f"queue unavailable: {exc}") from exc
        if not first:
            return False
        self.enqueue(run, stop_grace_seconds=stop_grace_seconds)
        return True

    def holds(self, run: Run) -> bool:
        """True while Redis has the run's next attempt waiting to be picked up, or a
        worker picked it up a moment ago and is claiming it."""
        return bool(self.holding([run]))

    def holding(self, runs: Sequence[Run]) -> set[str]:
        """The ids of `runs` that Redis holds (as `holds` tells one), in one round trip.

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        return self.holding_keys([(run.id, run.attempt) for run in runs])

    def holding_keys(self, keys: Sequence[tuple[str, int]]) -> set[str]:
        """`holding` for (run id, attempt) pairs: one round trip per 1,000.

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        held: set[str] = set()
        now = datetime.now(UTC)
        for start in range(0, len(keys), 1000):
            part = keys[start:start + 1000]
            try:
                pipe = self.redis.pipeline(transaction=False)
                for run_id, attempt in part:
                    pipe.hmget(Job.key_for(job_id(run_id, attempt + 1)),
                               ["status", "started_at"])
                found = pipe.execute()
            except RedisError as exc:
                raise ServiceUnavailableError(f"queue unavailable: {exc}") from exc
            held.update(run_id for (run_id, _), (status, started_at)
                        in zip(part, found, strict=True) if _held(status, started_at, now))
        return held

    def try_lock(self, name: str, token: str, *, seconds: float) -> bool:
        """Take the short named lock `name` for `token`; False if another holds it.

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        try:
            return bool(self.redis.set(name, token, nx=True, px=int(seconds * 1000)))
        except RedisError as exc:
            raise ServiceUnavailableError(f"queue unavailable: {exc}") from exc

    def unlock(self, name: str, token: str) -> None:
        """Release `name` if `token` still holds it (best effort: it expires anyway)."""
        with contextlib.suppress(RedisError):
            if self.redis.get(name) == token.encode():
                self.redis.delete(name)

    def ping(self) -> None:
        """Raises: ServiceUnavailableError when Redis cannot be reached."""
        try:
            self.redis.ping()
        except RedisError as exc:
            raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc
