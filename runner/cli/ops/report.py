"""`runner ops report`: the dashboard overview's figures as a Markdown report.

The same figures as the web dashboard's overview page (`runner.control.overview`),
read straight from the database like every `runner ops` command, written as Markdown
an operator can paste into an incident note or a weekly review.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from runner.cli.ops.common import duration, ops_app, ops_command, settings
from runner.control.overview import FAILING_MIN_RUNS, FAILING_RATE, Overview, Overviews
from runner.control.store import Store
from runner.domain import utcnow
from runner.errors import RunnerError
from runner.units import seconds_text

_BACKTICKS = re.compile(r"`+")


def _code(text: str) -> str:
    """`text` as a Markdown code span that survives any content, inside a table too:
    a fence longer than any backtick run in it, `|` escaped, no line breaks."""
    text = " ".join(text.splitlines()).replace("|", "\\|")
    fence = "`" * (max((len(m) for m in _BACKTICKS.findall(text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _moment(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else seconds_text(value)


def _percent(part: int | float | None, whole: int | float = 1) -> str:
    return "n/a" if part is None or not whole else f"{100 * part / whole:.1f} %"


def markdown(found: Overview, *, tenant: str | None, window: str | None = None) -> str:
    """The report of `found` as Markdown: the window and totals, a row per processor
    (runs, success rate, mean and p95 duration, retries, dead-letter rate, top error
    codes) and the failing processors. `window` names it (e.g. "24h") in the title."""
    rows = found.processors
    runs = sum(p.runs for p in rows)
    succeeded = sum(p.succeeded for p in rows)
    canceled = sum(p.canceled for p in rows)
    dead = sum(p.dead_letters for p in rows)
    title = f"the last {window}" if window else "a window"
    lines = [
        f"# Runs report: {title}", "",
        f"- Window: {_moment(found.since)} to {_moment(found.until)}",
        f"- Tenant: {'every tenant' if tenant is None else _code(tenant)}",
        f"- Runs ended: {runs} (succeeded {succeeded}, failed "
        f"{sum(p.failed for p in rows)}, canceled {canceled}; dead letters {dead})",
        f"- Success rate: {_percent(succeeded, runs - canceled)} (canceled runs not counted)",
        f"- Retries: {sum(p.retries for p in rows)}",
        f"- Now: {found.queued} queued (oldest {_seconds(found.oldest_queued_seconds)}), "
        f"{found.running} running", "",
        "## Failing processors", "",
    ]
    by_name = {p.processor: p for p in rows}
    if found.failing:
        for name in found.failing:
            figures = by_name[name]
            lines.append(f"- {_code(name)}: {figures.succeeded} of "
                         f"{figures.runs - figures.canceled} succeeded "
                         f"({_percent(figures.success_rate)})")
    else:
        lines.append(f"None (failing: {FAILING_MIN_RUNS} or more runs ended and under "
                     f"{FAILING_RATE:.0%} of them succeeded).")
    lines += ["", "## Per processor", ""]
    if not rows:
        lines.append("No run ended in this window.")
    else:
        lines += ["| Processor | Runs | Success rate | Mean | p95 | Retries | Dead letters "
                  "| Top error codes |",
                  "|---|--:|--:|--:|--:|--:|--:|---|"]
        for p in rows:
            errors = ", ".join(f"{_code(code)} {n}" for code, n in p.top_errors) or "n/a"
            lines.append(
                f"| {_code(p.processor)} | {p.runs} | {_percent(p.success_rate)} "
                f"| {_seconds(p.mean_seconds)} | {_seconds(p.p95_seconds)} | {p.retries} "
                f"| {_percent(p.dead_letters, p.runs - p.canceled)} ({p.dead_letters}) "
                f"| {errors} |")
        lines += ["", "Success and dead-letter rates leave canceled runs out; durations "
                  "are of the last attempt, of runs that ran a container."]
    return "\n".join(lines) + "\n"


@ops_app.command("report")
@ops_command
def report(since: Annotated[str, typer.Option(
               help="How far back, e.g. 90m, 24h, 7d.")] = "24h",
           tenant: Annotated[str | None, typer.Option(
               help="Only this tenant (default: every tenant).")] = None,
           output: Annotated[Path | None, typer.Option(
               help="Write the report to this file instead of printing it.")] = None
           ) -> None:
    """A Markdown report of the runs that ended within `--since`: totals, a row per
    processor, the failing processors, and the queue now."""
    cfg = settings()
    now = utcnow()
    start = now - timedelta(seconds=duration(since, "--since"))
    store = Store(cfg.database_url)
    try:
        found = Overviews(store).overview(tenant=tenant, since=start, until=now)
    finally:
        store.close()
    text = markdown(found, tenant=tenant, window=since.strip())
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunnerError(f"--output {output}: {exc.strerror or exc}") from exc
    typer.echo(f"wrote {output}", err=True)
