"""Request rates and submission quotas, counted in Redis so every API process shares them.

Fixed one-second and one-minute windows: cheap (one pipelined INCR+EXPIRE per check)
and good enough to stop a burst. When Redis is down the rate limits let requests
through (logged); the hard cap on a tenant's active runs lives in the database.

Failures (failed authentications from one address) are counted the same way, but
the one that reaches the limit blocks the name for a whole window from that moment
(`strike`, `check_block`), so what is refused does not depend on where a clock
window happens to end.

`admit` is `check_block` followed by `hit` on several counters, in one round trip (a
Lua script, so the order and the stop at the first refusal are exactly theirs): what
every authenticated request pays.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from redis import Redis
from redis.exceptions import RedisError

from runner.errors import RateLimitedError

log = structlog.get_logger(__name__)


# KEYS[1]: the block key, or "" for none; KEYS[2..]: the counters of this window.
# ARGV: for each counter, its limit then its expiry in seconds.
# Returns {0, 0} when admitted, {-1, ms left} when blocked, {i, count} when counter i
# (1-based) went over its limit; counters after a refusal are not counted, as a
# sequence of `hit` calls would leave them.
_ADMIT = """
if KEYS[1] ~= '' then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then return {-1, left} end
end
for i = 2, #KEYS do
  local count = redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[2 * i - 2])
  if count > tonumber(ARGV[2 * i - 3]) then return {i - 1, count} end
end
return {0, 0}
"""


def _over(what: str, limit: int, window_seconds: int, now: float) -> RateLimitedError:
    """The refusal of an event past `limit` in the clock window holding `now`."""
    retry_after = max(1, math.ceil((int(now // window_seconds) + 1) * window_seconds - now))
    return RateLimitedError(f"{what}: over {limit} per {window_seconds}s; "
                            f"retry after {retry_after}s", retry_after=retry_after)


def _blocked(what: str, left_ms: int) -> RateLimitedError:
    """The refusal of a name blocked for `left_ms` more milliseconds."""
    retry_after = max(1, math.ceil(left_ms / 1000))
    return RateLimitedError(f"{what}; retry after {retry_after}s", retry_after=retry_after)


@dataclass(frozen=True)
class Limit:
    """`limit` events of `name` per window of `window_seconds` (0: no limit); `what`
    names them in the refusal."""

    name: str
    limit: int
    window_seconds: int
    what: str


class RateLimiter:
    def __init__(self, redis: Redis, *, prefix: str = "runner:rate") -> None:
        self.redis, self.prefix = redis, prefix
        self._admit = redis.register_script(_ADMIT)  # loaded on first use (EVALSHA)

    def admit(self, limits: Sequence[Limit], *, block: str | None = None,
              block_what: str = "") -> None:
        """`check_block(block)` (when given), then `hit` on each of `limits` in order,
        in one round trip; a refusal stops there, so later limits count nothing.

        Raises:
            RateLimitedError: `block` is blocked (`block_what`, the seconds left), or a
                limit is over (its `what`, the seconds to the end of its window).
        """
        active = [limit for limit in limits if limit.limit > 0]
        if block is None and not active:
            return
        now = time.time()
        keys = [f"{self.prefix}:block:{block}" if block is not None else ""]
        args: list[int] = []
        for limit in active:
            window = int(now // limit.window_seconds)
            keys.append(f"{self.prefix}:{limit.name}:{window}")
            args += [limit.limit, limit.window_seconds + 1]
        try:
            which, value = (int(x) for x in self._admit(keys=keys, args=args))
        except RedisError as exc:
            log.warning("rate_limit_unavailable", name=keys[-1], error=str(exc))
            return
        if which < 0:
            raise _blocked(block_what, value)
        if which > 0:
            over = active[which - 1]
            raise _over(over.what, over.limit, over.window_seconds, now)

    def hit(self, name: str, *, limit: int, window_seconds: int, what: str) -> None:
        """Count one event against `limit` per window; 0 disables the limit.

        Raises:
            RateLimitedError: over the limit, with `retry_after` in whole seconds.
        """
        if limit <= 0:
            return
        now = time.time()
        window = int(now // window_seconds)
        count = self._count(name, window, window_seconds)
        if count is None:
            return
        if count > limit:
            raise _over(what, limit, window_seconds, now)

    def take(self, name: str, n: int, *, limit: int, window_seconds: int) -> int:
        """Count up to `n` events against `limit` per window, as many as still fit:
        how many were taken (all `n` with the limit off or Redis down). A batch of runs
        counts its items, not its one request; the part refused is given back, so a
        refused item costs the tenant nothing."""
        if limit <= 0 or n <= 0:
            return max(n, 0)
        window = int(time.time() // window_seconds)
        count = self._count(name, window, window_seconds, by=n)
        if count is None:
            return n
        taken = max(0, min(n, limit - (count - n)))
        if taken < n:
            try:
                self.redis.decrby(f"{self.prefix}:{name}:{window}", n - taken)
            except RedisError as exc:
                log.warning("rate_limit_unavailable", name=name, error=str(exc))
        return taken

    def retry_after(self, window_seconds: int) -> int:
        """Whole seconds until the current window of `window_seconds` ends."""
        now = time.time()
        return max(1, math.ceil((int(now // window_seconds) + 1) * window_seconds - now))

    def check_block(self, name: str, *, what: str) -> None:
        """Refuse while `name` is blocked by `strike`; counts nothing.

        Raises:
            RateLimitedError: blocked, with `retry_after`: the whole seconds left.
        """
        try:
            left_ms = int(self.redis.pttl(f"{self.prefix}:block:{name}"))
        except RedisError as exc:
            log.warning("rate_limit_unavailable", name=name, error=str(exc))
            return
        if left_ms > 0:  # -2: no block; -1 (no expiry) is never set
            raise _blocked(what, left_ms)

    def strike(self, name: str, *, limit: int, window_seconds: int) -> None:
        """Count one failure of `name`; the `limit`-th in a window blocks `name` for
        `window_seconds` from now. 0 disables it."""
        if limit <= 0:
            return
        count = self._count(name, int(time.time() // window_seconds), window_seconds)
        if count is None or count < limit:
            return
        try:
            self.redis.set(f"{self.prefix}:block:{name}", count, ex=window_seconds, nx=True)
        except RedisError as exc:
            log.warning("rate_limit_unavailable", name=name, error=str(exc))

    def _count(self, name: str, window: int, window_seconds: int, *,
               by: int = 1) -> int | None:
        """`by` more events of `name` in clock window `window`: the count so far, or
        None when Redis cannot be reached (logged; the caller lets the request through)."""
        key = f"{self.prefix}:{name}:{window}"
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.incrby(key, by)
            pipe.expire(key, window_seconds + 1)
            return int(pipe.execute()[0])
        except RedisError as exc:
            log.warning("rate_limit_unavailable", name=name, error=str(exc))
            return None
