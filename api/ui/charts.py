"""The overview page's pictures as inline SVG: figures in, markup out.

Pure functions, no I/O and no JavaScript, so a page stays plain HTML that any browser
(or a test's XML parser) reads. Every text taken from data (processor names,
statuses) is XML-escaped; the markup holds no script, no event handler and no link,
so it is safe to inline under the dashboard's Content-Security-Policy. Hover text is
SVG's own `<title>`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from html import escape

from runner.control.overview import STATUS_ORDER, MinuteCount, ProcessorFigures
from runner.units import seconds_text

# One fixed colour per final status, so a colour means the same on every page.
STATUS_COLOURS = {
    "succeeded": "#2e7d32",
    "failed": "#c62828",
    "timed_out": "#ef6c00",
    "canceled": "#9e9e9e",
    "dead_letter": "#6a1b9a",
}
OTHER_COLOUR = "#546e7a"
P50_COLOUR, P95_COLOUR = "#1565c0", "#90caf9"
TEXT_STYLE = 'font-family="sans-serif" font-size="11" fill="#333"'
NO_RUNS = "no runs in this window"
# Candidate spacings of the time axis' ticks, in minutes; the first giving at most
# MAX_TICKS ticks is used.
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440, 2880, 10080)
MAX_TICKS = 6
MINUTE = timedelta(minutes=1)


def _num(value: float) -> str:
    """A coordinate, short: two decimals at most."""
    return f"{round(value, 2):g}"


def _svg(width: float, height: float, label: str, body: list[str]) -> str:
    """The outer element: an image for assistive technology, named by `label`."""
    text = escape(label)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(width)}" '
            f'height="{_num(height)}" viewBox="0 0 {_num(width)} {_num(height)}" '
            f'role="img" aria-label="{text}"><title>{text}</title>{"".join(body)}</svg>')


def _placeholder(width: float, height: float, label: str) -> str:
    return _svg(width, height, f"{label}: {NO_RUNS}", [
        f'<text class="placeholder" x="{_num(width / 2)}" y="{_num(height / 2)}" '
        f'text-anchor="middle" {TEXT_STYLE}>{NO_RUNS}</text>'])


def _utc(moment: datetime) -> datetime:
    """Aware UTC (a naive moment is taken to be UTC already)."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _floor_minute(moment: datetime) -> datetime:
    return _utc(moment).replace(second=0, microsecond=0)


def _colour(status: str) -> str:
    return STATUS_COLOURS.get(status, OTHER_COLOUR)


def _status_key(status: str) -> tuple[int, str]:
    return STATUS_ORDER.get(status, len(STATUS_ORDER)), status


def _ticks(start: datetime, minutes: int) -> list[int]:
    """Offsets (in minutes from `start`) of the time axis' ticks: on round times."""
    step = next((s for s in TICK_STEPS if minutes // s + 1 <= MAX_TICKS), TICK_STEPS[-1])
    first = int(start.timestamp() // 60)
    return [offset for offset in range(minutes + 1) if (first + offset) % step == 0]


def runs_per_minute_svg(per_minute: Sequence[MinuteCount], *, since: datetime,
                        until: datetime, width: int = 720, height: int = 200) -> str:
    """Runs ended per minute of [since, until), stacked by final status, with a legend,
    a time axis (HH:MM, with the date for windows over a day) and the busiest minute's
    count; a minute without runs is a gap. No runs: a placeholder saying so."""
    label = "Runs ended per minute by status"
    start = _floor_minute(since)
    minutes = max(1, math.ceil((_utc(until) - start) / MINUTE))
    stacks: dict[int, dict[str, int]] = defaultdict(dict)
    for item in per_minute:
        offset = int((_floor_minute(item.minute) - start) / MINUTE)
        if 0 <= offset < minutes and item.count > 0:
            stacks[offset][item.status] = stacks[offset].get(item.status, 0) + item.count
    if not stacks:
        return _placeholder(width, height, label)
    left, right, top, bottom = 40.0, 8.0, 22.0, 22.0
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / minutes
    bar = slot * 0.8 if slot >= 3 else slot
    peak = max(sum(stack.values()) for stack in stacks.values())
    body: list[str] = []
    # Legend: every known status, then any other that appears.
    seen = {status for stack in stacks.values() for status in stack}
    x = left
    for status in sorted(set(STATUS_COLOURS) | seen, key=_status_key):
        name = escape(status)
        body.append(f'<rect class="legend" x="{_num(x)}" y="6" width="10" height="10" '
                    f'fill="{_colour(status)}"/><text x="{_num(x + 14)}" y="15" '
                    f'{TEXT_STYLE}>{name}</text>')
        x += 24 + 6.5 * len(status)
    # Axes: the baseline, 0 and the busiest minute's count.
    base = top + plot_h
    body.append(f'<line x1="{_num(left)}" y1="{_num(base)}" x2="{_num(left + plot_w)}" '
                f'y2="{_num(base)}" stroke="#999" stroke-width="1"/>')
    body.append(f'<text x="{_num(left - 4)}" y="{_num(base)}" text-anchor="end" '
                f'{TEXT_STYLE}>0</text><text x="{_num(left - 4)}" y="{_num(top + 8)}" '
                f'text-anchor="end" {TEXT_STYLE}>{peak}</text>')
    stamp = "%m-%d %H:%M" if minutes > 1440 else "%H:%M"
    for offset in _ticks(start, minutes):
        tx = left + offset * slot
        # The last tick's label ends at the edge instead of running off it.
        anchor = "end" if tx > left + plot_w - 20 else "middle"
        body.append(f'<line x1="{_num(tx)}" y1="{_num(base)}" x2="{_num(tx)}" '
                    f'y2="{_num(base + 4)}" stroke="#999" stroke-width="1"/>'
                    f'<text class="tick" x="{_num(tx)}" y="{_num(base + 16)}" '
                    f'text-anchor="{anchor}" {TEXT_STYLE}>'
                    f'{(start + offset * MINUTE).strftime(stamp)}</text>')
    # The bars: one segment per status of a minute, stacked from the baseline up.
    for offset in sorted(stacks):
        y = base
        when = (start + offset * MINUTE).strftime("%Y-%m-%d %H:%M")
        for status, count in sorted(stacks[offset].items(), key=lambda i: _status_key(i[0])):
            tall = count / peak * plot_h
            y -= tall
            body.append(f'<rect class="bar" data-status="{escape(status)}" '
                        f'x="{_num(left + offset * slot + (slot - bar) / 2)}" y="{_num(y)}" '
                        f'width="{_num(bar)}" height="{_num(tall)}" fill="{_colour(status)}">'
                        f'<title>{when} UTC: {count} {escape(status)}</title></rect>')
    total = sum(sum(stack.values()) for stack in stacks.values())
    return _svg(width, height, f"{label}: {total} runs, at most {peak} in a minute", body)


def durations_svg(processors: Sequence[ProcessorFigures], *, width: int = 720) -> str:
    """One row per processor: a bar to its p50 over a lighter bar to its p95, on one
    scale shared by every row, labelled with the name and both figures. No processor:
    a placeholder saying so."""
    label = "Run durations per processor, p50 and p95"
    row, top, bottom, left, right = 36.0, 8.0, 20.0, 8.0, 8.0
    if not processors:
        return _placeholder(width, top + row + bottom, label)
    height = top + row * len(processors) + bottom
    plot_w = width - left - right
    figures = [v for p in processors for v in (p.p50_seconds, p.p95_seconds) if v is not None]
    scale = max(figures, default=0.0) or 1.0
    body: list[str] = []
    for index, figure in enumerate(processors):
        y = top + index * row
        name = escape(figure.processor)
        p50, p95 = figure.p50_seconds, figure.p95_seconds
        if p50 is None or p95 is None:
            numbers = "no durations"
        else:
            numbers = f"p50 {seconds_text(p50)} · p95 {seconds_text(p95)}"
        body.append(f'<text class="label" x="{_num(left)}" y="{_num(y + 13)}" {TEXT_STYLE}>'
                    f'<tspan font-weight="bold">{name}</tspan> {numbers}</text>')
        for kind, value, colour in (("p95", p95, P95_COLOUR), ("p50", p50, P50_COLOUR)):
            if value is None:
                continue
            body.append(f'<rect class="{kind}" x="{_num(left)}" y="{_num(y + 18)}" '
                        f'width="{_num(max(value / scale * plot_w, 1))}" height="12" '
                        f'fill="{colour}"><title>{name} {kind} '
                        f'{seconds_text(value)}</title></rect>')
    base = top + row * len(processors)
    body.append(f'<text x="{_num(left)}" y="{_num(base + 12)}" {TEXT_STYLE}>0 s</text>'
                f'<text x="{_num(left + plot_w)}" y="{_num(base + 12)}" text-anchor="end" '
                f'{TEXT_STYLE}>{seconds_text(scale)}</text>')
    return _svg(width, height, label, body)
