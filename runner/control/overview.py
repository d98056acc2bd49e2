"""The figures of a time window: what the dashboard's overview page and `runner ops
report` show (runs ended per minute, per processor outcomes and durations, the queue).

One read-only question over `runs`, asked of the store and answered with frozen
records, never ORM rows. The work is bounded whatever the table's size: counts are
aggregated in SQL (portable between SQLite and PostgreSQL, except the minute of a
timestamp, which each dialect spells its own way); only durations come back row by
row, at most `DURATION_SAMPLE` per processor, for percentiles computed in Python.
Every time is UTC.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, case, func, literal_column, select
from sqlalchemy.orm import Session

from runner.control.models import RunRow
from runner.control.rows import aware
from runner.control.store import Store
from runner.domain import RunStatus, utcnow

# The most recent durations per processor that percentiles (and the mean) are
# computed over: enough for a steady p95, small enough to hold in memory.
DURATION_SAMPLE = 50_000
TOP_ERRORS = 5
# A processor is failing with at least this many ended runs and a success rate below
# FAILING_RATE: fewer runs say too little to call it.
FAILING_MIN_RUNS = 3
FAILING_RATE = 0.5

FINAL = [s.value for s in RunStatus if s.terminal]
# The order statuses are listed in within a minute (and stacked in the chart).
STATUS_ORDER = {status: index for index, status in enumerate(FINAL)}
_UNSUCCESSFUL = (RunStatus.FAILED.value, RunStatus.TIMED_OUT.value,
                 RunStatus.DEAD_LETTER.value)


@dataclass(frozen=True)
class MinuteCount:
    """Runs that ended in one minute with one final status."""

    minute: datetime  # UTC, the start of the minute
    status: str  # a final RunStatus value
    count: int


@dataclass(frozen=True)
class ProcessorFigures:
    """How one processor's runs that ended in the window went."""

    processor: str
    runs: int  # ended in the window, in any final status
    succeeded: int
    failed: int  # failed, timed_out and dead_letter (canceled is counted apart)
    canceled: int
    dead_letters: int
    retries: int  # attempts beyond the first: the sum of attempt - 1
    success_rate: float | None  # succeeded / (runs - canceled); None when that is 0
    mean_seconds: float | None  # finished_at - started_at (last attempt), see durations
    p50_seconds: float | None
    p95_seconds: float | None
    top_errors: list[tuple[str, int]]  # error codes of the failed runs, most first, <= 5


@dataclass(frozen=True)
class Overview:
    """The figures of the window [since, until), and the queue as it is now."""

    since: datetime
    until: datetime
    per_minute: list[MinuteCount]  # only minutes with runs, oldest first
    processors: list[ProcessorFigures]  # most runs first, then by name
    queued: int  # now, not windowed
    running: int
    oldest_queued_seconds: float | None  # age of the oldest queued run (created_at)
    failing: list[str]  # FAILING_MIN_RUNS ended runs or more, success rate < FAILING_RATE


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) of sorted values, interpolated linearly between the two
    nearest ranks (numpy's default); None without values."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _utc(moment: datetime) -> datetime:
    """An aware UTC datetime (a naive one is taken to be UTC already)."""
    return (aware(moment) or moment).astimezone(UTC)


def _minute_of(dialect: str) -> ColumnElement[Any]:
    """The minute `finished_at` falls in, as SQL. The only dialect-specific SQL here:
    PostgreSQL truncates the UTC timestamp; SQLite (which stores UTC text) formats it.
    The arguments are literals, not parameters, so the SELECT and the GROUP BY are the
    same expression to PostgreSQL."""
    if dialect == "postgresql":
        return func.date_trunc(literal_column("'minute'"),
                               func.timezone(literal_column("'UTC'"), RunRow.finished_at))
    return func.strftime(literal_column("'%Y-%m-%d %H:%M'"), RunRow.finished_at)


def _as_minute(value: datetime | str) -> datetime:
    """A minute as `_minute_of` answers it (text on SQLite), as an aware datetime."""
    if isinstance(value, str):
        value = datetime.strptime(value, "%Y-%m-%d %H:%M")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Overviews:
    """The overview figures, asked of a store (`Overviews(store).overview(...)`)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def overview(self, *, tenant: str | None, since: datetime,
                 until: datetime | None = None) -> Overview:
        """The figures of runs that ended in [since, until) (until: now), and of the
        queued and running runs now; of one tenant, or of every tenant with None (the
        operators' report).

        Bounded work: counts, retries and error codes are aggregated in SQL; the
        minutes are grouped in SQL too. Durations (mean and percentiles) are computed
        in Python over at most the `DURATION_SAMPLE` (50,000) most recently ended runs
        per processor in the window, and only of runs that ran a container: started,
        not canceled, not a reuse hit (which runs nothing and lasts no time).

        Raises:
            ServiceUnavailableError: the database cannot be reached.
        """
        now = utcnow()
        since = _utc(since)
        until = now if until is None else _utc(until)
        ended = [RunRow.status.in_(FINAL), RunRow.finished_at.is_not(None),
                 RunRow.finished_at >= since, RunRow.finished_at < until]
        if tenant is not None:
            ended.append(RunRow.tenant == tenant)
        with self.store.session() as session:
            dialect = session.get_bind().dialect.name
            minute = _minute_of(dialect)
            minutes = session.execute(
                select(minute, RunRow.status, func.count()).where(*ended)
                .group_by(minute, RunRow.status)).all()
            counts = session.execute(
                select(RunRow.processor, RunRow.status, func.count(),
                       func.sum(case((RunRow.attempt > 1, RunRow.attempt - 1), else_=0)))
                .where(*ended).group_by(RunRow.processor, RunRow.status)).all()
            errors = session.execute(
                select(RunRow.processor, RunRow.error_code, func.count())
                .where(*ended, RunRow.status.in_(_UNSUCCESSFUL),
                       RunRow.error_code.is_not(None))
                .group_by(RunRow.processor, RunRow.error_code)).all()
            durations = self._durations(session, ended)
            queue = self._queue(session, tenant)
        per_minute = sorted(
            (MinuteCount(minute=_as_minute(m), status=status, count=int(n))
             for m, status, n in minutes),
            key=lambda c: (c.minute, STATUS_ORDER.get(c.status, len(STATUS_ORDER)), c.status))
        processors = _figures(counts, errors, durations)
        queued, running, oldest = queue
        return Overview(
            since=since, until=until, per_minute=per_minute, processors=processors,
            queued=queued, running=running,
            oldest_queued_seconds=None if oldest is None else max(
                0.0, (now - oldest).total_seconds()),
            failing=[p.processor for p in processors if _is_failing(p)])

    @staticmethod
    def _durations(session: Session, ended: list[ColumnElement[bool]]
                   ) -> dict[str, list[float]]:
        """Seconds of the last attempt of the most recent runs per processor that ran a
        container, at most DURATION_SAMPLE each, sorted (a window function: portable)."""
        rank = func.row_number().over(partition_by=RunRow.processor,
                                      order_by=RunRow.finished_at.desc()).label("rank")
        ranked = (select(RunRow.processor, RunRow.started_at, RunRow.finished_at, rank)
                  .where(*ended, RunRow.started_at.is_not(None),
                         RunRow.status != RunStatus.CANCELED.value,
                         RunRow.reused_from.is_(None))
                  .subquery())
        rows = session.execute(
            select(ranked.c.processor, ranked.c.started_at, ranked.c.finished_at)
            .where(ranked.c.rank <= DURATION_SAMPLE))
        found: dict[str, list[float]] = defaultdict(list)
        for processor, started, finished in rows:
            seconds = (_utc(finished) - _utc(started)).total_seconds()
            # Two hosts' clocks can disagree a little; a run never lasts less than 0.
            found[processor].append(max(0.0, seconds))
        return {processor: sorted(values) for processor, values in found.items()}

    @staticmethod
    def _queue(session: Session, tenant: str | None) -> tuple[int, int, datetime | None]:
        """(queued, running, creation of the oldest queued run) now."""
        active = RunRow.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value])
        query = select(RunRow.status, func.count(), func.min(RunRow.created_at)).where(active)
        if tenant is not None:
            query = query.where(RunRow.tenant == tenant)
        rows = {status: (int(n), oldest)
                for status, n, oldest in session.execute(query.group_by(RunRow.status))}
        queued, oldest = rows.get(RunStatus.QUEUED.value, (0, None))
        running = rows.get(RunStatus.RUNNING.value, (0, None))[0]
        return queued, running, None if oldest is None else _utc(oldest)


def _figures(counts: Sequence[Any], errors: Sequence[Any],
             durations: dict[str, list[float]]) -> list[ProcessorFigures]:
    """ProcessorFigures from the grouped rows: (processor, status, count, retries) and
    (processor, error code, count); most runs first, then by name."""
    by_status: dict[str, Counter[str]] = defaultdict(Counter)
    retries: Counter[str] = Counter()
    for processor, status, n, extra in counts:
        by_status[processor][status] += int(n)
        retries[processor] += int(extra or 0)
    codes: dict[str, Counter[str]] = defaultdict(Counter)
    for processor, code, n in errors:
        codes[processor][code] += int(n)
    figures = []
    for processor, tally in by_status.items():
        runs = sum(tally.values())
        canceled = tally[RunStatus.CANCELED.value]
        succeeded = tally[RunStatus.SUCCEEDED.value]
        judged = runs - canceled
        seconds = durations.get(processor, [])
        figures.append(ProcessorFigures(
            processor=processor, runs=runs, succeeded=succeeded,
            failed=sum(tally[s] for s in _UNSUCCESSFUL), canceled=canceled,
            dead_letters=tally[RunStatus.DEAD_LETTER.value], retries=retries[processor],
            success_rate=succeeded / judged if judged else None,
            mean_seconds=sum(seconds) / len(seconds) if seconds else None,
            p50_seconds=percentile(seconds, 0.5), p95_seconds=percentile(seconds, 0.95),
            top_errors=sorted(codes[processor].items(),
                              key=lambda item: (-item[1], item[0]))[:TOP_ERRORS]))
    return sorted(figures, key=lambda f: (-f.runs, f.processor))


def _is_failing(figures: ProcessorFigures) -> bool:
    return (figures.runs >= FAILING_MIN_RUNS and figures.success_rate is not None
            and figures.success_rate < FAILING_RATE)
