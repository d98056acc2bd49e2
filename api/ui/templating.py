"""The dashboard's templates: Starlette's `Jinja2Templates` over a package loader.

Why this shape: `Jinja2Templates` is FastAPI/Starlette's own integration (it renders
with the request in the context and answers an `HTMLResponse`), and a
`PackageLoader` reads `api/ui/templates/` from the installed package, wherever it is
installed, instead of a path relative to the working directory. Autoescaping is on
for every template whatever its name (`autoescape=True`, not `select_autoescape`):
everything a processor or a client wrote (logs, labels, inputs, results, names, error
messages) is escaped, and no template marks data `|safe`. The one markup inserted
as is, the charts' SVG, is built and escaped by `api.ui.charts`.

`StrictUndefined` turns a misspelt variable into an error in the tests rather than
an empty cell in production.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined

from runner.domain import RunStatus

NONE = "\u2013"  # an en dash: what a page shows for no value
VIEW_VALUE_MAX_CHARS = 512 * 1024  # the most of an input or a result a page shows


def _moment(value: datetime | str | None) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def when(value: datetime | str | None) -> str:
    """A moment in UTC, to the second: 2024-05-01 12:00:03Z."""
    moment = _moment(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else NONE


def seconds(value: float | None) -> str:
    """A duration for people: 850 ms, 12.4 s, 3 m 05 s, 2 h 10 m."""
    if value is None:
        return NONE
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} m {int(value % 60):02d} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} m"


def between(start: datetime | str | None, end: datetime | str | None) -> str:
    """The duration from `start` to `end` (to now while it has not ended)."""
    began = _moment(start)
    if began is None:
        return NONE
    ended = _moment(end) or datetime.now(UTC)
    return seconds(max(0.0, (ended - began).total_seconds()))


def size(value: int | float | None) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 4.0 MiB."""
    if value is None:
        return NONE
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f}".removesuffix(
                ".0") + f" {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"  # pragma: no cover - the loop always returns


def pretty(value: Any) -> str:
    """A JSON value indented for reading (escaped by autoescape like any text), cut at
    VIEW_VALUE_MAX_CHARS so a huge result cannot make a huge page."""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    if len(text) > VIEW_VALUE_MAX_CHARS:
        return text[:VIEW_VALUE_MAX_CHARS] + "\n… (cut here; the API has the whole value)"
    return text


def short(value: str | None, length: int = 19) -> str:
    """The start of a long id or digest (the full one goes in a title attribute)."""
    if not value:
        return NONE
    return value if len(value) <= length else value[:length] + "…"


def build_templates() -> Jinja2Templates:
    env = Environment(loader=PackageLoader("api.ui", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=when, seconds=seconds, between=between, size=size,
                       pretty=pretty, short=short)
    env.globals.update(statuses=[s.value for s in RunStatus],
                       terminal={s.value for s in RunStatus if s.terminal})
    return Jinja2Templates(env=env)
