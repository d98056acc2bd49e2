"""Pure helpers of the dashboard's pages (api/ui/views.py, api/ui/templating.py) and the
templates' own rules: autoescaped, no inline script or style."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from api.ui.templating import build_templates, pretty, seconds, size, when
from api.ui.views import (
    complete_utf8,
    label_filters,
    limits_of,
    timeline,
    timestamp,
    webhook_of,
)
from runner.errors import InvalidRequestError

TEMPLATES = Path(__file__).resolve().parents[2] / "api" / "ui" / "templates"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def attempt(number: int, start: float, end: float | None, status: str = "failed",
            error_code: str | None = None) -> dict[str, object]:
    return {"number": number, "status": status, "error_code": error_code,
            "started_at": T0 + timedelta(seconds=start),
            "finished_at": None if end is None else T0 + timedelta(seconds=end)}


def test_the_timeline_places_each_attempt_by_its_start_and_length() -> None:
    drawn = timeline(T0, [attempt(1, 0, 10, error_code="timeout"),
                          attempt(2, 20, None, "running")],
                     now=T0 + timedelta(seconds=40), width=720)
    first, second = drawn.bars
    plot = 720 - drawn.plot_x - 10
    assert first.x == drawn.plot_x and first.width == pytest.approx(plot / 4, abs=0.1)
    assert second.x == pytest.approx(drawn.plot_x + plot / 2, abs=0.1)
    assert second.width == pytest.approx(plot / 2, abs=0.1)  # to now: still running
    assert first.label == "timeout, 10.0 s" and second.y > first.y
    assert drawn.span_seconds == 40


def test_a_zero_length_attempt_is_still_visible() -> None:
    (bar,) = timeline(T0, [attempt(1, 0, 0)], now=T0).bars
    assert bar.width >= 2


def test_text_read_from_byte_offsets_stops_before_a_cut_character() -> None:
    text = "log é € 😀".encode()
    assert complete_utf8(text) == text
    assert complete_utf8(text[:-1]) == "log é € ".encode()
    assert complete_utf8(text[:-3]) == "log é € ".encode()
    assert complete_utf8("é".encode()[:1]) == b""
    assert complete_utf8(b"") == b""


def test_label_filters_are_key_value_and_empty_ones_are_ignored() -> None:
    assert label_filters(["a=b", " ", "c = d=e"]) == {"a": "b", "c": "d=e"}
    for bad in (["novalue"], ["=x"], ["a=\x00"]):
        with pytest.raises(InvalidRequestError):
            label_filters(bad)


def test_a_date_time_without_a_zone_is_utc() -> None:
    assert timestamp("2024-05-01T12:00", "f") == T0
    assert timestamp("2024-05-01T14:00+02:00", "f") == T0
    assert timestamp("", "f") is None
    with pytest.raises(InvalidRequestError, match="created_after"):
        timestamp("yesterday", "created_after")


def test_the_limits_come_from_the_receipt_first() -> None:
    rows = dict(limits_of(timeout_seconds=30, processor=None, provenance={"applied": {
        "cpus": 0.5, "memory_bytes": 128 * 1024**2, "pids_limit": 16,
        "network_mode": "none", "read_only_rootfs": True, "user": "65532:65532",
        "cap_drop": ["ALL"], "tmpfs": {"/tmp": "size=64m"}}}))
    assert rows["timeout"] == "30 s" and rows["cpus"] == "0.5"
    assert rows["memory"] == "128 MiB" and rows["pids"] == "16"
    assert rows["network"] == "none" and rows["tmpfs /tmp"] == "size=64m"
    assert limits_of(timeout_seconds=5, processor=None, provenance=None) == [
        ("timeout", "5 s")]


def test_the_webhook_state_is_shown_only_when_the_run_has_one() -> None:
    assert webhook_of(None) is None
    shown = webhook_of({"url": "https://h/x", "state": "delivered", "secret": "never"})
    assert shown is not None and shown["state"] == "delivered" and "secret" not in shown


def test_values_are_formatted_for_people() -> None:
    assert when(T0) == "2024-05-01 12:00:00Z" and when(None) == "\u2013"
    assert seconds(0.25) == "250 ms" and seconds(75) == "1 m 15 s"
    assert size(512) == "512 B" and size(4 * 1024**2) == "4 MiB"
    assert size(1536) == "1.5 KiB"
    assert pretty({"b": 1, "a": [1]}).startswith('{\n  "a"')


def test_every_template_escapes_what_it_is_given() -> None:
    env = build_templates().env
    assert env.autoescape is True
    rendered = env.from_string("{{ value }}").render(value="<script>alert(1)</script>")
    assert rendered == "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.html")), ids=lambda p: p.name)
def test_no_template_holds_inline_script_style_or_unescaped_data(path: Path) -> None:
    source = path.read_text()
    assert not re.search(r"<script(?![^>]*\ssrc=)", source)
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", source)
    assert "|safe" not in source and "autoescape false" not in source
