"""The overview's SVG pictures (api/ui/charts.py): well-formed, accessible, escaped,
inert (no script, handler or link), one bar per figure, a placeholder without runs."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from api.ui.charts import durations_svg, runs_per_minute_svg
from runner.control.overview import MinuteCount, ProcessorFigures
from runner.units import seconds_text

SVG = "{http://www.w3.org/2000/svg}"
NOON = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
HOSTILE = '<script>alert("x")</script>&'


def figures(processor: str, p50: float | None = 1.2, p95: float | None = 3.4
            ) -> ProcessorFigures:
    return ProcessorFigures(
        processor=processor, runs=3, succeeded=3, failed=0, canceled=0, dead_letters=0,
        retries=0, success_rate=1.0, mean_seconds=p50, p50_seconds=p50, p95_seconds=p95,
        top_errors=[])


def parse(svg: str) -> ET.Element:
    """The parsed picture, after the checks every picture must pass."""
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img" and root.get("aria-label")
    assert root[0].tag == f"{SVG}title" and root[0].text == root.get("aria-label")
    assert "<script" not in svg.lower()
    for element in root.iter():
        assert element.tag != f"{SVG}script"
        for name in element.attrib:
            local = name.rpartition("}")[2].lower()
            assert not local.startswith("on"), f"event handler {name}"
            assert local != "href", f"a reference: {name}={element.attrib[name]}"
    return root


def of_class(root: ET.Element, tag: str, kind: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{SVG}{tag}") if kind in (e.get("class") or "").split()]


def test_runs_are_stacked_bars_per_minute_with_gaps() -> None:
    per_minute = [MinuteCount(NOON, "succeeded", 4), MinuteCount(NOON, "failed", 2),
                  MinuteCount(NOON + timedelta(minutes=3), "dead_letter", 1)]
    root = parse(runs_per_minute_svg(per_minute, since=NOON - timedelta(minutes=5),
                                     until=NOON + timedelta(minutes=5)))
    bars = of_class(root, "rect", "bar")
    assert [b.get("data-status") for b in bars] == ["succeeded", "failed", "dead_letter"]
    succeeded, failed, dead = bars
    # Stacked: the failed segment sits on the succeeded one, in the same column.
    assert succeeded.get("x") == failed.get("x") != dead.get("x")
    assert float(failed.get("y") or 0) + float(failed.get("height") or 0) == pytest.approx(
        float(succeeded.get("y") or 0))
    # The busiest minute (6) spans the plot; a single run is a sixth of it.
    assert float(dead.get("height") or 0) * 6 == pytest.approx(
        float(succeeded.get("height") or 0) + float(failed.get("height") or 0))
    assert {b.get("fill") for b in bars} == {"#2e7d32", "#c62828", "#6a1b9a"}
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert "6" in texts and "succeeded" in texts and "canceled" in texts  # y max, legend
    ticks = ["".join(t.itertext()) for t in of_class(root, "text", "tick")]
    assert "12:00" in ticks and 2 <= len(ticks) <= 7
    assert "7 runs" in (root.get("aria-label") or "")


def test_a_long_window_has_few_ticks_with_dates() -> None:
    since = NOON - timedelta(days=3)
    last = MinuteCount(NOON - timedelta(minutes=1), "succeeded", 1)
    root = parse(runs_per_minute_svg([last], since=since, until=NOON))
    ticks = ["".join(t.itertext()) for t in of_class(root, "text", "tick")]
    assert 2 <= len(ticks) <= 6 and all(len(t) == len("01-01 12:00") for t in ticks)
    assert len(of_class(root, "rect", "bar")) == 1


def test_minutes_outside_the_window_are_not_drawn() -> None:
    outside = [MinuteCount(NOON - timedelta(hours=2), "succeeded", 3),
               MinuteCount(NOON + timedelta(hours=2), "failed", 3)]
    svg = runs_per_minute_svg(outside, since=NOON - timedelta(hours=1), until=NOON)
    assert of_class(parse(svg), "text", "placeholder")


def test_statuses_from_data_are_escaped() -> None:
    svg = runs_per_minute_svg([MinuteCount(NOON, HOSTILE, 2)], since=NOON,
                              until=NOON + timedelta(minutes=10))
    root = parse(svg)
    [bar] = of_class(root, "rect", "bar")
    assert bar.get("data-status") == HOSTILE
    assert HOSTILE in ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_no_runs_is_a_placeholder() -> None:
    root = parse(runs_per_minute_svg([], since=NOON - timedelta(hours=1), until=NOON))
    [placeholder] = of_class(root, "text", "placeholder")
    assert placeholder.text == "no runs in this window"
    assert not of_class(root, "rect", "bar")
    root = parse(durations_svg([]))
    assert [t.text for t in of_class(root, "text", "placeholder")] == [
        "no runs in this window"]
    assert not list(root.iter(f"{SVG}rect"))


def test_durations_are_a_p50_and_a_p95_bar_per_processor_on_one_scale() -> None:
    root = parse(durations_svg([figures("fast", 1.2, 3.4), figures("slow", 3.0, 6.8),
                                figures("idle", None, None)]))
    p50, p95 = of_class(root, "rect", "p50"), of_class(root, "rect", "p95")
    assert len(p50) == len(p95) == 2
    widths = {float(e.get("width") or 0) for e in p95}
    # The slowest p95 spans the plot (720 - 16); the others are on that scale.
    assert max(widths) == pytest.approx(704)
    assert float(p50[0].get("width") or 0) == pytest.approx(704 * 1.2 / 6.8, abs=0.01)
    labels = ["".join(t.itertext()) for t in of_class(root, "text", "label")]
    assert labels == ["fast p50 1.2 s · p95 3.4 s", "slow p50 3.0 s · p95 6.8 s",
                      "idle no durations"]
    assert int(root.get("height") or 0) == 8 + 3 * 36 + 20


def test_processor_names_are_escaped() -> None:
    svg = durations_svg([figures(HOSTILE)])
    root = parse(svg)
    [label] = of_class(root, "text", "label")
    assert "".join(label.itertext()).startswith(HOSTILE)
    assert "<script>" not in svg and "&lt;script&gt;" in svg


@pytest.mark.parametrize(("seconds", "text"), [
    (0.354, "0.35 s"), (1.2, "1.2 s"), (42.0, "42.0 s"), (270.0, "4.5 min"),
    (7200.0, "2.0 h")])
def test_durations_read_like_people_write_them(seconds: float, text: str) -> None:
    assert seconds_text(seconds) == text
