"""`runner submit` and `runner runs ...`: runs through the HTTP API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from runner.cli.common import api_client, command, fail, load_input, print_json
from runner.cli.files import parse_file_options, upload_run_files
from runner.cli.progress import Transfers

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
    file: Annotated[list[str] | None, typer.Option(
        "--file", metavar="NAME=PATH",
        help="Upload PATH (or use an uploaded file's id, sha256:...); the run reads it "
             "at /run/in/NAME (repeatable)")] = None,
    reuse: Annotated[bool, typer.Option(
        help="Stand in an earlier succeeded run of the same image, input and files")] = False,
    reuse_max_age: Annotated[str | None, typer.Option(
        metavar="DURATION", help="--reuse, but only a run at most this old (1h, 30m)")] = None,
    webhook_url: Annotated[str | None, typer.Option(
        metavar="URL", help="POST the run here when it ends (signed; the operator's "
                            "RUNNER_WEBHOOK_ALLOWED_URLS must allow it)")] = None,
    follow: Annotated[bool, typer.Option(help="Stream logs, then print the run")] = False,
) -> None:
    """Submit a run; prints the run (or streams its logs with --follow)."""
    data = load_input(input)
    sources = parse_file_options(file or [])
    reused: bool | dict[str, str] | None = (
        {"max_age": reuse_max_age} if reuse_max_age else True if reuse else None)
    with api_client() as client:
        with Transfers() as bars:
            files = upload_run_files(client, sources, bars)
        run = client.submit(processor, data, version=version, timeout_seconds=timeout,
                            idempotency_key=idempotency_key, files=files or None,
                            reuse=reused, webhook_url=webhook_url)
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


@app.command("artifacts")
@command
def runs_artifacts(
    run_id: str,
    attempt: Annotated[int | None, typer.Option(min=1, help="Default: the last")] = None,
    download: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Download them all into DIR, subdirectories kept")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the listing as JSON")] = False,
) -> None:
    """List a run's artifacts (size, media type, SHA-256, name), or download them."""
    with api_client() as client:
        listing = client.artifacts(run_id, attempt=attempt)
        items = listing["items"]
        if download is None and as_json:
            print_json(listing)
            return
        if download is None:
            for item in items:
                typer.echo(f"{item['size']:>12}  {item['media_type']:<28} "
                           f"{item['sha256'].removeprefix('sha256:')[:12]}  {item['name']}")
            if not items:
                typer.echo(f"run {run_id} attempt {listing['attempt']}: no artifacts",
                           err=True)
            return
        from runner.client import artifact_target

        if download.exists() and not download.is_dir():
            fail(f"--download {download}: not a directory")
        for item in items:  # a name that would escape DIR refuses the lot, up front
            artifact_target(download, item["name"])
        with Transfers() as bars:  # the listing's attempt, even if a newer one starts
            for item in items:
                written = client.download_artifact(
                    run_id, item["name"], download, attempt=listing["attempt"],
                    sha256=item["sha256"], progress=bars.track(item["name"]))
                typer.echo(str(written))


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
