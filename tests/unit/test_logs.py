"""JSON log lines: values json cannot write natively come out readable and parseable."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
import structlog

from runner.domain import RunStatus
from runner.observability.logsetup import configure_logging, json_default


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(service="test", fmt="json")
    yield stream
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)


def test_datetimes_enums_and_paths_in_a_json_line(json_logs: io.StringIO) -> None:
    due = datetime(2026, 11, 23, 4, 5, 6, 789000, tzinfo=UTC)
    structlog.get_logger().info("run.transition", next_attempt_at=due, to=RunStatus.QUEUED,
                                manifest=Path("/etc/runner/manifest.yaml"))
    line = json.loads(json_logs.getvalue().strip().splitlines()[-1])
    assert line["next_attempt_at"] == "2026-11-23T04:05:06.789000Z"
    assert datetime.fromisoformat(line["next_attempt_at"]) == due
    assert line["to"] == "queued"
    assert line["manifest"] == "/etc/runner/manifest.yaml"
    assert {"ts", "level", "service", "event"} <= line.keys()


def test_json_default_keeps_other_offsets_and_plain_dates() -> None:
    plus_two = datetime(2026, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=2)))
    assert json_default(plus_two) == "2026-01-02T03:04:00+02:00"
    assert json_default(date(2026, 1, 2)) == "2026-01-02"
    assert json_default(datetime(2026, 1, 2, 3, 4)) == "2026-01-02T03:04:00"
