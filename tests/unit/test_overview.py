"""The overview figures (runner/control/overview.py) on a migrated SQLite store: every
figure of a window, its minutes, its bounds and tenant, the failing rule, the queue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from runner.control import overview as overview_module
from runner.control.overview import MinuteCount, Overview, Overviews, percentile
from runner.control.store import Store
from runner.domain import Run, RunStatus
from tests.unit.conftest import NewRunMaker, past, set_run

NOON = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SINCE, UNTIL = NOON - timedelta(hours=1), NOON + timedelta(hours=1)


def ended(store: Store, new_run: NewRunMaker, status: RunStatus, *, seconds: float | None = 1,
          at: datetime = NOON, processor: str = "echo", tenant: str = "t", attempt: int = 1,
          error_code: str | None = None) -> Run:
    """A run that ended at `at` with `status`, its last attempt `seconds` long (None:
    never started)."""
    run = new_run(processor=processor, tenant=tenant)
    started = None if seconds is None else at - timedelta(seconds=seconds)
    set_run(store, run.id, status=status.value, created_at=at - timedelta(hours=2),
            started_at=started, finished_at=at, attempt=attempt, error_code=error_code)
    return run


def figures_of(store: Store, tenant: str | None = None, since: datetime = SINCE,
               until: datetime | None = UNTIL) -> Overview:
    return Overviews(store).overview(tenant=tenant, since=since, until=until)


def test_every_figure_of_a_processor_is_counted(store: Store, new_run: NewRunMaker) -> None:
    S = RunStatus
    for seconds in (1, 2, 3):
        ended(store, new_run, S.SUCCEEDED, seconds=seconds)
    ended(store, new_run, S.SUCCEEDED, seconds=4, attempt=3)
    ended(store, new_run, S.FAILED, seconds=10, attempt=2, error_code="nonzero_exit")
    ended(store, new_run, S.FAILED, seconds=30, error_code="nonzero_exit")
    ended(store, new_run, S.TIMED_OUT, seconds=5, error_code="timeout")
    ended(store, new_run, S.DEAD_LETTER, seconds=6, attempt=3, error_code="worker_lost")
    ended(store, new_run, S.CANCELED, seconds=None, error_code="canceled")

    [echo] = figures_of(store).processors
    assert (echo.processor, echo.runs, echo.succeeded, echo.failed, echo.canceled,
            echo.dead_letters) == ("echo", 9, 4, 4, 1, 1)
    assert echo.retries == 2 + 1 + 2
    assert echo.success_rate == pytest.approx(4 / 8)
    # Durations of the 8 runs that started: 1 2 3 4 5 6 10 30 (the canceled one did not).
    assert echo.mean_seconds == pytest.approx(61 / 8)
    assert echo.p50_seconds == pytest.approx(4.5)
    assert echo.p95_seconds == pytest.approx(10 + 20 * 0.65)
    # Codes of the failed runs only, most first, ties by name; not "canceled".
    assert echo.top_errors == [("nonzero_exit", 2), ("timeout", 1), ("worker_lost", 1)]


def test_only_runs_that_ended_inside_the_window_count(store: Store,
                                                      new_run: NewRunMaker) -> None:
    ended(store, new_run, RunStatus.SUCCEEDED, at=SINCE)  # the start is inside
    ended(store, new_run, RunStatus.SUCCEEDED, at=UNTIL - timedelta(microseconds=1))
    ended(store, new_run, RunStatus.SUCCEEDED, at=SINCE - timedelta(microseconds=1))
    ended(store, new_run, RunStatus.SUCCEEDED, at=UNTIL)  # the end is outside
    new_run()  # queued
    running = new_run()
    set_run(store, running.id, status="running", started_at=NOON)

    found = figures_of(store)
    assert [(p.processor, p.runs) for p in found.processors] == [("echo", 2)]
    assert (found.since, found.until) == (SINCE, UNTIL)
    assert sum(c.count for c in found.per_minute) == 2


def test_runs_are_counted_per_minute_and_status_in_utc(store: Store,
                                                       new_run: NewRunMaker) -> None:
    S = RunStatus
    ended(store, new_run, S.SUCCEEDED, at=NOON + timedelta(seconds=10))
    ended(store, new_run, S.SUCCEEDED, at=NOON + timedelta(seconds=59.999))
    ended(store, new_run, S.FAILED, at=NOON + timedelta(seconds=30))
    ended(store, new_run, S.SUCCEEDED, at=NOON + timedelta(minutes=3, seconds=59))
    # The same instants asked for in another time zone: the answer is in UTC.
    plus_two = timezone(timedelta(hours=2))
    found = figures_of(store, since=SINCE.astimezone(plus_two),
                       until=UNTIL.astimezone(plus_two))
    assert found.per_minute == [
        MinuteCount(minute=NOON, status="succeeded", count=2),
        MinuteCount(minute=NOON, status="failed", count=1),
        MinuteCount(minute=NOON + timedelta(minutes=3), status="succeeded", count=1),
    ]
    assert all(c.minute.tzinfo is not None and c.minute.utcoffset() == timedelta(0)
               for c in found.per_minute)
    assert found.since.utcoffset() == timedelta(0) and found.since == SINCE


def test_a_window_is_one_tenant_or_every_tenant(store: Store, new_run: NewRunMaker) -> None:
    for _ in range(2):
        ended(store, new_run, RunStatus.SUCCEEDED, processor="zeta", tenant="a")
    ended(store, new_run, RunStatus.SUCCEEDED, processor="alpha", tenant="a")
    for _ in range(2):
        ended(store, new_run, RunStatus.FAILED, processor="alpha", tenant="b")
    new_run(tenant="b")

    every = figures_of(store)
    # Most runs first, ties by name.
    assert [(p.processor, p.runs) for p in every.processors] == [("alpha", 3), ("zeta", 2)]
    assert every.queued == 1
    a = figures_of(store, tenant="a")
    assert [(p.processor, p.runs) for p in a.processors] == [("zeta", 2), ("alpha", 1)]
    assert a.queued == 0 and a.oldest_queued_seconds is None
    assert sum(c.count for c in a.per_minute) == 3
    b = figures_of(store, tenant="b")
    assert [(p.processor, p.failed) for p in b.processors] == [("alpha", 2)]
    assert b.queued == 1
    assert figures_of(store, tenant="nobody").processors == []


def test_a_processor_fails_with_three_runs_and_less_than_half_succeeded(
        store: Store, new_run: NewRunMaker) -> None:
    S = RunStatus
    plan = {
        "bad": [S.SUCCEEDED, S.FAILED, S.DEAD_LETTER],  # 1/3: failing
        "few": [S.FAILED, S.FAILED],  # 0/2: too few runs to say
        "half": [S.SUCCEEDED, S.SUCCEEDED, S.FAILED, S.TIMED_OUT],  # 0.5 is not below
        "idle": [S.CANCELED, S.CANCELED, S.CANCELED],  # no rate at all
        "worse": [S.FAILED] * 5,
    }
    for processor, statuses in plan.items():
        for status in statuses:
            ended(store, new_run, status, processor=processor)
    found = figures_of(store)
    assert found.failing == ["worse", "bad"]
    idle = next(p for p in found.processors if p.processor == "idle")
    assert idle.success_rate is None
    assert idle.mean_seconds is None and idle.p50_seconds is None and idle.p95_seconds is None


def test_the_queue_is_counted_now_whatever_the_window(store: Store,
                                                      new_run: NewRunMaker) -> None:
    empty = figures_of(store)
    assert (empty.queued, empty.running, empty.oldest_queued_seconds) == (0, 0, None)
    assert empty.per_minute == [] and empty.processors == [] and empty.failing == []
    old, young, running = new_run(), new_run(), new_run()
    set_run(store, old.id, created_at=past(600))
    set_run(store, young.id, created_at=past(60))
    set_run(store, running.id, status="running", created_at=past(900), started_at=past(5))
    parked = new_run()
    set_run(store, parked.id, parked_at=past(1))

    found = figures_of(store)  # a window long past
    assert (found.queued, found.running) == (3, 1)
    assert found.oldest_queued_seconds is not None
    assert 600 <= found.oldest_queued_seconds < 660


def test_durations_leave_out_reuse_hits_and_canceled_runs(store: Store,
                                                          new_run: NewRunMaker) -> None:
    ended(store, new_run, RunStatus.SUCCEEDED, seconds=8)
    hit = ended(store, new_run, RunStatus.SUCCEEDED, seconds=0)
    set_run(store, hit.id, reused_from=ended(store, new_run, RunStatus.SUCCEEDED,
                                             seconds=8, at=SINCE - timedelta(days=1)).id)
    ended(store, new_run, RunStatus.CANCELED, seconds=100)  # canceled while running
    [echo] = figures_of(store).processors
    assert (echo.runs, echo.succeeded, echo.canceled) == (3, 2, 1)
    assert (echo.mean_seconds, echo.p50_seconds, echo.p95_seconds) == (8, 8, 8)
    assert echo.success_rate == 1.0


def test_percentiles_use_only_the_most_recent_durations(
        store: Store, new_run: NewRunMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overview_module, "DURATION_SAMPLE", 2)
    for minute, seconds in enumerate([100, 100, 2, 4]):
        ended(store, new_run, RunStatus.SUCCEEDED, seconds=seconds,
              at=NOON + timedelta(minutes=minute))
    [echo] = figures_of(store).processors
    assert echo.runs == 4
    assert (echo.mean_seconds, echo.p50_seconds) == (3, 3)


def test_at_most_five_error_codes_are_named(store: Store, new_run: NewRunMaker) -> None:
    codes = ["a", "b", "c", "d", "e", "f"]
    for count, code in enumerate(codes, start=1):
        for _ in range(count):
            ended(store, new_run, RunStatus.DEAD_LETTER, error_code=code)
    [echo] = figures_of(store).processors
    assert echo.top_errors == [("f", 6), ("e", 5), ("d", 4), ("c", 3), ("b", 2)]
    assert echo.dead_letters == 21 and echo.success_rate == 0


def test_until_defaults_to_now(store: Store, new_run: NewRunMaker) -> None:
    ended(store, new_run, RunStatus.SUCCEEDED, at=past(30))
    ended(store, new_run, RunStatus.SUCCEEDED, at=past(7200))
    found = Overviews(store).overview(tenant=None, since=past(3600))
    assert [p.runs for p in found.processors] == [1]
    assert found.until <= datetime.now(UTC) and found.until - found.since >= timedelta(
        seconds=3600)


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 0.5, None),
    ([7.0], 0.95, 7.0),
    ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
    ([1.0, 2.0, 3.0, 4.0], 0.95, 3.85),
    ([1.0, 2.0, 3.0, 4.0], 0.0, 1.0),
    ([1.0, 2.0, 3.0, 4.0], 1.0, 4.0),
])
def test_percentiles_interpolate_between_ranks(values: list[float], q: float,
                                               expected: float | None) -> None:
    found = percentile(values, q)
    assert found == (None if expected is None else pytest.approx(expected))
