"""`runner submit` (one run, or `--batch` a JSON Lines file of them) and `runner runs
...`: runs through the HTTP API.

A batch file is read twice, line by line: first to refuse the whole file on one bad
line before anything is sent, then to send it a chunk at a time (stdin, which cannot
be read twice, is copied to a spooled temporary file first).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from runner.cli.common import api_client, command, fail, load_input, print_json
from runner.cli.files import parse_file_options, upload_run_files
from runner.cli.progress import Batch, Transfers
from runner.domain import Priority
from runner.errors import RunnerError

app = typer.Typer(help="Inspect runs through the API.", no_args_is_help=True)

IDEMPOTENCY_KEY_MAX = 128  # characters, the API's cap
SPOOL_BYTES = 8 * 1024 * 1024  # stdin past this goes to a temporary file on disk


def parse_labels(values: list[str]) -> dict[str, str]:
    """`--label KEY=VALUE` options as a dict; exits with one `error:` line on a bad
    form or a repeated key (the API checks the rest)."""
    labels: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            fail(f"--label must be KEY=VALUE, got {value!r}")
        if key in labels:
            fail(f"--label {key}= is given twice")
        labels[key] = text
    return labels


def line_key(key: str | None, line: int) -> str | None:
    """Line `line`'s idempotency key under `--idempotency-key key`: "key:line", so the
    same command sent again names the same runs, line by line."""
    return None if key is None else f"{key}:{line}"


def batch_lines(stream: IO[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line of a JSON Lines stream: (its 1-based line number, its object).

    Raises:
        RunnerError: "line N: ..." at the first line that is not a JSON object in UTF-8.
    """
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise RunnerError(f"line {number}: not UTF-8 text") from None
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:  # not JSON, or an integer of more than 4,300 digits
            raise RunnerError(f"line {number}: not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise RunnerError(f"line {number}: not a JSON object (each line is one "
                              "run's input)")
        yield number, value


def _rereadable(source: str) -> IO[bytes]:
    """`source` (a path, or "-" for stdin) open to be read from its start twice: stdin,
    or what cannot seek (a pipe), is copied to a spooled temporary file first."""
    try:
        stream = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
        if source != "-" and stream.seekable():
            return stream
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
        shutil.copyfileobj(stream, spool)
        if source != "-":
            stream.close()
    except OSError as exc:
        fail(f"--batch {source}: {exc.strerror or exc}")
    spool.seek(0)
    return spool


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
    idempotency_key: Annotated[str | None, typer.Option(
        help="The same key (and body) returns the same run; with --batch, line N is "
             "given the key K:N")] = None,
    file: Annotated[list[str] | None, typer.Option(
        "--file", metavar="NAME=PATH",
        help="Upload PATH (or use an uploaded file's id, sha256:...); the run reads it "
             "at /run/in/NAME (repeatable)")] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", metavar="KEY=VALUE", help="A label on the run (repeatable)")] = None,
    priority: Annotated[Priority | None, typer.Option(
        help="Its order among your own queued runs (default normal)")] = None,
    reuse: Annotated[bool, typer.Option(
        help="Stand in an earlier succeeded run of the same image, input and files")] = False,
    reuse_max_age: Annotated[str | None, typer.Option(
        metavar="DURATION", help="--reuse, but only a run at most this old (1h, 30m)")] = None,
    webhook_url: Annotated[str | None, typer.Option(
        metavar="URL", help="POST the run here when it ends (signed; the operator's "
                            "RUNNER_WEBHOOK_ALLOWED_URLS must allow it)")] = None,
    follow: Annotated[bool, typer.Option(help="Stream logs, then print the run")] = False,
    batch: Annotated[str | None, typer.Option(
        metavar="FILE.jsonl", help="One run per line, each line a JSON object: its input "
                                   "(- reads stdin); the other options apply to every "
                                   "line")] = None,
    chunk_size: Annotated[int, typer.Option(
        min=1, max=1000, help="--batch: runs per request")] = 500,
) -> None:
    """Submit a run; prints the run (or streams its logs with --follow). With --batch,
    prints a JSON line per input line and exits 1 if any was refused."""
    labels = parse_labels(label or [])
    reused: bool | dict[str, str] | None = (
        {"max_age": reuse_max_age} if reuse_max_age else True if reuse else None)
    if batch is not None:
        if input is not None or file or follow:
            fail("--batch takes each run's input from its line: it cannot be combined "
                 "with --input, --file or --follow")
        body = {key: value for key, value in (
            ("processor", processor), ("version", version), ("timeout_seconds", timeout),
            ("labels", labels or None), ("priority", priority.value if priority else None),
            ("reuse", reused), ("webhook_url", webhook_url)) if value is not None}
        _submit_batch(batch, body, key=idempotency_key or None, chunk_size=chunk_size)
        return
    data = load_input(input)
    sources = parse_file_options(file or [])
    with api_client() as client:
        with Transfers() as bars:
            files = upload_run_files(client, sources, bars)
        run = client.submit(processor, data, version=version, timeout_seconds=timeout,
                            labels=labels or None, idempotency_key=idempotency_key,
                            files=files or None, reuse=reused, webhook_url=webhook_url,
                            priority=priority.value if priority else None)
        if not follow:
            print_json(run)
            return
        final = _follow(client, run["id"])
        print_json(final)
        if final["status"] != "succeeded":
            raise typer.Exit(1)


def _submit_batch(source: str, body: dict[str, Any], *, key: str | None,
                  chunk_size: int) -> None:
    """Submit each line of `source` as a run of `body` plus the line's input (and key):
    the whole file is checked before anything is sent. Exits 1 if any run was refused."""
    from runner.client import BatchInterruptedError

    with _rereadable(source) as stream:
        total = last = 0
        try:
            for number, _ in batch_lines(stream):
                total, last = total + 1, number
        except (RunnerError, OSError) as exc:
            fail(f"--batch {source}: {getattr(exc, 'message', exc)}; nothing was sent")
        if not total:
            fail(f"--batch {source}: no lines; nothing was sent")
        if key is not None and len(f"{key}:{last}") > IDEMPOTENCY_KEY_MAX:
            fail(f"--idempotency-key: with --batch each line's key is K:N, which must be "
                 f"at most {IDEMPOTENCY_KEY_MAX} characters")
        stream.seek(0)
        lines: list[int] = []  # the line number of each item sent, in order

        def items() -> Iterator[dict[str, Any]]:
            for number, data in batch_lines(stream):
                lines.append(number)
                keyed = {"idempotency_key": line_key(key, number)} if key else {}
                yield {**body, "input": data, **keyed}

        with api_client() as client:
            try:
                with Batch(f"submit {body['processor']}") as bar:
                    bar.update(0, total)
                    results = client.submit_many(items(), chunk_size=chunk_size,
                                                 total=total, on_progress=bar.update)
            except BatchInterruptedError as exc:
                _report(lines, exc.results, total)
                raise
    if _report(lines, results, total):
        raise typer.Exit(1)


def _report(lines: list[int], results: list[dict[str, Any]], total: int) -> int:
    """One JSON line on stdout per answered line, then a summary on stderr; how many
    of them were refused."""
    refused = 0
    for number, entry in zip(lines, results, strict=False):
        if "id" in entry:
            shown = {"line": number, "id": entry["id"], "status": entry["status"]}
        else:
            refused += 1
            shown = {"line": number, "error": entry.get("error", entry)}
        typer.echo(json.dumps(shown))
    summary = f"submitted {len(results) - refused} of {total} runs"
    summary += f"; {refused} refused" if refused else ""
    summary += f"; {total - len(results)} not answered" if len(results) < total else ""
    typer.echo(summary, err=True)
    return refused


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
