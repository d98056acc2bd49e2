"""The transport: RQ on Redis. Redis carries run ids only; the database is the truth.

Each job is one attempt of one run (`run-<id>-<attempt>`), so a retry scheduled by
the attempt before it never collides with that attempt's own job. A job that is
lost (Redis flushed, a worker killed between dequeue and claim) is found and
enqueued again by the reconciler, and a job that arrives twice loses its claim.
"""

from __future__ import annotations

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job

from runner.errors import ServiceUnavailableError
from runner.store import Run

JOB_FUNCTION = "runner.worker.perform"
# The RQ job timeout sits well past the container deadline, so the runner's own
# timeout (SIGTERM, grace, SIGKILL) always fires first.
JOB_TIMEOUT_MARGIN_SECONDS = 300
HELD_STATES = {b"queued", b"deferred"}


def job_id(run_id: str, attempt: int) -> str:
    return f"run-{run_id}-{attempt}"


class RunQueue:
    """Puts run attempts on the RQ queue each run's processor is routed to."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queues: dict[str, Queue] = {}

    @classmethod
    def from_url(cls, url: str) -> RunQueue:
        return cls(Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                  health_check_interval=30))

    def _queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = Queue(name, connection=self.redis)
        return self._queues[name]

    def enqueue(self, run: Run, *, stop_grace_seconds: float = 5.0) -> None:
        """Queue the run's next attempt now.

        A retry waiting out its backoff is not put in Redis early: its next attempt
        time is in the database, and each worker's requeue pass enqueues it when due
        (RQ's own scheduler is not used: it forks a process that would inherit the
        worker's database connections).

        Raises:
            ServiceUnavailableError: Redis cannot be reached.
        """
        attempt = run.attempt + 1
        timeout = int(run.timeout_seconds + stop_grace_seconds + JOB_TIMEOUT_MARGIN_SECONDS)
        # A retry goes to the front: the run has waited its turn once already.
        options = {"job_id": job_id(run.id, attempt), "job_timeout": timeout,
                   "at_front": attempt > 1, "result_ttl": 0, "failure_ttl": 7 * 24 * 3600,
                   "description": f"run {run.id} attempt {attempt} ({run.processor})"}
        try:
            self._queue(run.queue).enqueue(JOB_FUNCTION, run.id, attempt, **options)
        except RedisError as exc:
            raise ServiceUnavailableError(f"queue unavailable: {exc}") from exc

    def holds(self, run: Run) -> bool:
        """True while Redis has the run's next attempt waiting to be picked up."""
        try:
            status = self.redis.hget(Job.key_for(job_id(run.id, run.attempt + 1)), "status")
        except RedisError as exc:
            raise ServiceUnavailableError(f"queue unavailable: {exc}") from exc
        return status in HELD_STATES

    def ping(self) -> None:
        """Raises: ServiceUnavailableError when Redis cannot be reached."""
        try:
            self.redis.ping()
        except RedisError as exc:
            raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc
