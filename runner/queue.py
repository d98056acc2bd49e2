"""The transport: RQ on Redis. Redis carries run ids only; the database is the truth."""

from __future__ import annotations

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from runner.errors import ServiceUnavailableError
from runner.store import Run

JOB_FUNCTION = "runner.worker.perform"
# The RQ job timeout sits well past the container deadline, so the runner's own
# timeout (SIGTERM, grace, SIGKILL) always fires first.
JOB_TIMEOUT_MARGIN_SECONDS = 300


def job_id(run_id: str) -> str:
    return f"run-{run_id}"


class RunQueue:
    """Puts run ids on the RQ queue each run's processor is routed to."""

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
        """Raises: ServiceUnavailableError when Redis cannot be reached."""
        timeout = int(run.timeout_seconds + stop_grace_seconds + JOB_TIMEOUT_MARGIN_SECONDS)
        try:
            self._queue(run.queue).enqueue(
                JOB_FUNCTION, run.id, job_id=job_id(run.id), job_timeout=timeout,
                result_ttl=0, failure_ttl=7 * 24 * 3600,
                description=f"run {run.id} ({run.processor} {run.version})",
            )
        except RedisError as exc:
            raise ServiceUnavailableError(f"queue unavailable: {exc}") from exc

    def ping(self) -> None:
        """Raises: ServiceUnavailableError when Redis cannot be reached."""
        try:
            self.redis.ping()
        except RedisError as exc:
            raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc
