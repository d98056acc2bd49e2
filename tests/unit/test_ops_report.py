"""`runner ops report` (typer's CliRunner on a migrated SQLite store): the Markdown
it prints or writes, a tenant's window, and one `error:` line when it cannot run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runner.cli import app
from runner.cli.ops.report import markdown
from runner.control.overview import Overviews
from runner.control.store import Store
from runner.domain import RunStatus
from tests.unit.conftest import NewRunMaker, past, set_run

cli = CliRunner()


def ended(store: Store, new_run: NewRunMaker, status: RunStatus, *, processor: str = "echo",
          tenant: str = "t", seconds: float = 2, ago: float = 600, attempt: int = 1,
          error_code: str | None = None) -> None:
    run = new_run(processor=processor, tenant=tenant)
    set_run(store, run.id, status=status.value, started_at=past(ago + seconds),
            finished_at=past(ago), attempt=attempt, error_code=error_code)


@pytest.fixture
def database(store: Store, new_run: NewRunMaker, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A deployment's database as `runner ops report` finds it through its settings."""
    monkeypatch.setenv("RUNNER_DATABASE_URL", store.url)
    S = RunStatus
    for status in (S.SUCCEEDED, S.SUCCEEDED, S.SUCCEEDED, S.FAILED):
        ended(store, new_run, status, error_code="nonzero_exit" if status is S.FAILED else None)
    ended(store, new_run, S.DEAD_LETTER, processor="bad|name", attempt=3,
          error_code="worker_lost")
    ended(store, new_run, S.FAILED, processor="bad|name", error_code="oom_killed")
    ended(store, new_run, S.SUCCEEDED, processor="bad|name")
    ended(store, new_run, S.SUCCEEDED, processor="other", tenant="u")
    ended(store, new_run, S.SUCCEEDED, ago=3 * 86400)  # outside 24h, inside 7d
    new_run()
    return store


def test_the_report_prints_totals_a_row_per_processor_and_the_failing(
        database: Store) -> None:
    result = cli.invoke(app, ["ops", "report"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("# Runs report: the last 24h\n")
    assert "- Tenant: every tenant" in text
    assert "- Runs ended: 8 (succeeded 5, failed 3, canceled 0; dead letters 1)" in text
    assert "- Success rate: 62.5 %" in text
    assert "- Retries: 2" in text
    assert "- Now: 1 queued" in text and "0 running" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    # A `|` of a name is escaped, so the table keeps its columns.
    assert rows == [
        "| `echo` | 4 | 75.0 % | 2.0 s | 2.0 s | 0 | 0.0 % (0) | `nonzero_exit` 1 |",
        "| `bad\\|name` | 3 | 33.3 % | 2.0 s | 2.0 s | 2 | 33.3 % (1) "
        "| `oom_killed` 1, `worker_lost` 1 |",
        "| `other` | 1 | 100.0 % | 2.0 s | 2.0 s | 0 | 0.0 % (0) | n/a |",
    ]
    failing = text.split("## Failing processors\n\n", 1)[1].split("\n\n", 1)[0]
    assert failing == "- `bad\\|name`: 1 of 3 succeeded (33.3 %)"
    assert result.stderr == ""


def test_a_tenant_and_a_longer_window_in_days(database: Store) -> None:
    result = cli.invoke(app, ["ops", "report", "--since", "7d", "--tenant", "t"])
    assert result.exit_code == 0, result.output
    assert "- Tenant: `t`" in result.stdout
    assert "- Runs ended: 8 (succeeded 5" in result.stdout  # 4 + 3 + the old one
    assert "`other`" not in result.stdout


def test_the_report_is_written_to_a_file(database: Store, tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    result = cli.invoke(app, ["ops", "report", "--since", "90m", "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr == f"wrote {target}\n"
    assert target.read_text().startswith("# Runs report: the last 90m\n")


def test_an_empty_window_says_so(store: Store) -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    found = Overviews(store).overview(tenant=None, since=since,
                                      until=since + timedelta(hours=1))
    text = markdown(found, tenant=None)
    assert "- Runs ended: 0 (succeeded 0, failed 0, canceled 0; dead letters 0)" in text
    assert "- Success rate: n/a " in text
    assert "No run ended in this window." in text
    assert "- Now: 0 queued (oldest n/a), 0 running" in text
    assert "- Window: 2026-01-01 00:00:00 UTC to 2026-01-01 01:00:00 UTC" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "yesterday"], "error: --since: not a duration: 'yesterday'"),
    (["--output", "/nonexistent-dir/r.md"], "error: --output /nonexistent-dir/r.md: "),
])
def test_a_bad_option_is_one_error_line(database: Store, args: list[str],
                                        message: str) -> None:
    result = cli.invoke(app, ["ops", "report", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_an_unreachable_database_is_one_error_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_DATABASE_URL", f"sqlite:///{tmp_path}/missing/dir/runner.db")
    result = cli.invoke(app, ["ops", "report"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: database unavailable: ")
    assert result.stderr.count("\n") == 1 and result.stdout == ""
