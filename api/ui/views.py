"""Pure helpers of the dashboard's pages: what a page shows, computed from records.

Nothing here reads a database or a request, so each is unit-tested on its own: the
attempts' timeline geometry (SVG attributes, never inline styles), the limits a run
ran under, label filters, log text cut on a character boundary, and the webhook
delivery state when the run has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from api.ui.templating import NONE
from runner.errors import InvalidRequestError
from runner.manifest.model import Processor

TIMELINE_WIDTH = 720
TIMELINE_LABEL = 110  # the left column: "attempt 2"
TIMELINE_ROW = 26


@dataclass(frozen=True)
class Bar:
    """One attempt on the timeline: its row, x and width in SVG units, and its text."""

    number: int
    status: str
    x: float
    width: float
    y: float
    label: str


@dataclass(frozen=True)
class Timeline:
    bars: list[Bar]
    width: int
    height: int
    plot_x: int
    span_seconds: float


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def timeline(created_at: datetime, attempts: list[dict[str, Any]], *,
             now: datetime, width: int = TIMELINE_WIDTH) -> Timeline:
    """Each attempt as a bar from its start to its end (or to `now` while it runs),
    on one axis from the run's creation to its last moment."""
    origin = _aware(created_at)
    ends = [_aware(a["finished_at"] or now) for a in attempts]
    last = max([origin, *ends])
    span = max((last - origin).total_seconds(), 0.001)
    plot = width - TIMELINE_LABEL - 10
    bars = []
    for row, (attempt, end) in enumerate(zip(attempts, ends, strict=True)):
        start = _aware(attempt["started_at"])
        x = TIMELINE_LABEL + plot * max(0.0, (start - origin).total_seconds()) / span
        length = plot * max(0.0, (end - start).total_seconds()) / span
        took = max(0.0, (end - start).total_seconds())
        status = attempt.get("error_code") or attempt["status"]
        bars.append(Bar(number=attempt["number"], status=str(attempt["status"]),
                        x=round(x, 1), width=round(max(length, 2.0), 1),
                        y=row * TIMELINE_ROW + 4,
                        label=f"{status}, {took:.1f} s"))
    return Timeline(bars=bars, width=width, height=max(1, len(bars)) * TIMELINE_ROW + 22,
                    plot_x=TIMELINE_LABEL, span_seconds=span)


def limits_of(*, timeout_seconds: float, provenance: dict[str, Any] | None,
              processor: Processor | None) -> list[tuple[str, str]]:
    """The limits a run ran under: what the engine reports it applied (the provenance
    receipt), else the manifest's entry for its version; the run's own timeout."""
    applied = (provenance or {}).get("applied") or {}
    rows: list[tuple[str, str]] = [("timeout", f"{timeout_seconds:g} s")]
    limits = processor.limits if processor is not None else None
    cpus = applied.get("cpus") or (limits.cpus if limits else None)
    memory = applied.get("memory_bytes") or (limits.memory_bytes if limits else None)
    pids = applied.get("pids_limit") or (limits.pids if limits else None)
    if cpus:
        rows.append(("cpus", f"{float(cpus):g}"))
    if memory:
        rows.append(("memory", f"{int(memory) / 1024**2:g} MiB"))
    if pids:
        rows.append(("pids", str(pids)))
    if limits is not None:
        rows.append(("log bytes", f"{limits.log_bytes / 1024**2:g} MiB"))
        rows.append(("output bytes", f"{limits.output_bytes / 1024**2:g} MiB"))
    for path, options in sorted((applied.get("tmpfs") or {}).items()):
        rows.append((f"tmpfs {path}", str(options)))
    if applied:
        rows.append(("network", str(applied.get("network_mode") or NONE)))
        rows.append(("read-only root", "yes" if applied.get("read_only_rootfs") else "no"))
        rows.append(("user", str(applied.get("user") or NONE)))
        rows.append(("capabilities dropped", ", ".join(applied.get("cap_drop") or []) or NONE))
    return rows


def label_filters(values: list[str]) -> dict[str, str]:
    """`key=value` filters (empty fields are ignored).

    Raises:
        InvalidRequestError: a filter that is not key=value, or holds a NUL.
    """
    found: dict[str, str] = {}
    for item in values:
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key or len(item) > 320 or "\x00" in item:
            raise InvalidRequestError(f"label filter {item[:80]!r} is not key=value",
                                      field="label")
        found[key.strip()] = value.strip()
    return found


def timestamp(value: str | None, field: str) -> datetime | None:
    """A date-time from a filter field; one without a zone (what a browser's
    datetime-local input sends) is UTC, like everything the dashboard shows.

    Raises:
        InvalidRequestError: not an ISO 8601 date-time.
    """
    if not value or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequestError(f"{field}: not a date-time (2024-05-01T12:00)",
                                  field=field) from None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def complete_utf8(data: bytes) -> bytes:
    """`data` without a UTF-8 sequence cut at its end, so text read from byte offsets
    never shows a broken character where the next read would have completed it."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data  # ASCII: whole
        if byte >= 0xC0:  # the lead byte of the last sequence
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


def webhook_of(found: dict[str, Any] | None) -> dict[str, Any] | None:
    """The webhook delivery state to show (None for a run without a webhook).

    Only the documented fields are kept, so the page shows nothing else by mistake.
    """
    if not found:
        return None
    fields = ("url", "state", "attempts", "last_status_code", "last_error",
              "next_attempt_at", "delivered_at")
    return {name: found.get(name) for name in fields}
