"""Request rates and submission quotas, counted in Redis so every API process shares them.

Fixed one-second and one-minute windows: cheap (one pipelined INCR+EXPIRE per check)
and good enough to stop a burst. When Redis is down the rate limits let requests
through (logged); the hard cap on a tenant's active runs lives in the database.
"""

from __future__ import annotations

import math
import time

import structlog
from redis import Redis
from redis.exceptions import RedisError

from runner.errors import RateLimitedError

log = structlog.get_logger(__name__)


class RateLimiter:
    def __init__(self, redis: Redis, *, prefix: str = "runner:rate") -> None:
        self.redis, self.prefix = redis, prefix

    def hit(self, name: str, *, limit: int, window_seconds: int, what: str) -> None:
        """Count one event against `limit` per window; 0 disables the limit.

        Raises:
            RateLimitedError: over the limit, with `retry_after` in whole seconds.
        """
        if limit <= 0:
            return
        now = time.time()
        window = int(now // window_seconds)
        key = f"{self.prefix}:{name}:{window}"
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, window_seconds + 1)
            count = int(pipe.execute()[0])
        except RedisError as exc:
            log.warning("rate_limit_unavailable", name=name, error=str(exc))
            return
        if count > limit:
            retry_after = max(1, math.ceil((window + 1) * window_seconds - now))
            raise RateLimitedError(f"{what}: over {limit} per {window_seconds}s; "
                                   f"retry after {retry_after}s", retry_after=retry_after)
