"""`runner submit` and `runner runs ...`: runs through the HTTP API."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from runner.cli.common import api_client, command, load_input, print_json

app = typer.Typer(help="Inspect runs through the API.", no_args_is_help=True)


def _follow(client: Any, run_id: str) -> dict[str, Any]:
    for chunk in client.follow_logs(run_id):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    run: dict[str, Any] = client.wait(run_id)
    return run


@command
def submit_command(
    processor: str,
    version: Annotated[str | None, typer.Option()] = None,
    input: Annotated[str | None, typer.Option("--input", help="JSON or @file")] = None,
    timeout: Annotated[int | None, typer.Option(help="Seconds, up to the manifest's")] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    follow: Annotated[bool, typer.Option(help="Stream logs, then print the run")] = False,
) -> None:
    """Submit a run; prints the run (or streams its logs with --follow)."""
    with api_client() as client:
        run = client.submit(processor, load_input(input), version=version,
                            timeout_seconds=timeout, idempotency_key=idempotency_key)
        if not follow:
            print_json(run)
            return
        final = _follow(client, run["id"])
        print_json(final)
        if final["status"] != "succeeded":
            raise typer.Exit(1)


@app.command("list")
@command
def runs_list(status: Annotated[str | None, typer.Option()] = None,
              processor: Annotated[str | None, typer.Option()] = None,
              limit: int = 20) -> None:
    """List recent runs."""
    with api_client() as client:
        page = client.runs(status=status, processor=processor, limit=limit)
    for run in page["items"]:
        typer.echo(f"{run['id']}  {run['status']:<11} {run['processor']} {run['version']}  "
                   f"{run['error_code'] or ''}")


@app.command("show")
@command
def runs_show(run_id: str) -> None:
    """Print a run as JSON."""
    with api_client() as client:
        print_json(client.run(run_id))


@app.command("cancel")
@command
def runs_cancel(run_id: str) -> None:
    """Cancel a run: a queued one never starts, a running one is stopped."""
    with api_client() as client:
        run = client.cancel(run_id)
    typer.echo(f"{run['id']}: {run['status']}"
               + (" (stop requested)" if run.get("cancel_requested") and
                  run["status"] == "running" else ""))


@app.command("replay")
@command
def runs_replay(run_id: str) -> None:
    """Start a new run with an ended run's processor version and input."""
    with api_client() as client:
        print_json(client.replay(run_id))


@app.command("logs")
@command
def runs_logs(run_id: str, follow: Annotated[bool, typer.Option()] = False) -> None:
    """Print a run's captured output."""
    with api_client() as client:
        if follow:
            _follow(client, run_id)
        else:
            sys.stdout.buffer.write(client.logs(run_id))


# Manifest and processors --------------------------------------------------
