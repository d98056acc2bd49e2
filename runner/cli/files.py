"""`runner files ...` and `submit --file NAME=PATH`: files for runs, through the API."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from runner.cli.common import api_client, command, fail, print_json
from runner.cli.progress import Transfers

app = typer.Typer(help="Upload files for runs (a run reads them at /run/in/NAME).",
                  no_args_is_help=True)

# The name a file has under /run/in (the API's rule, checked here before any upload).
RUN_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
FILE_ID = re.compile(r"sha256:[0-9a-f]{64}")


def parse_file_options(values: list[str]) -> dict[str, Path | str]:
    """`--file NAME=PATH` options as {NAME: PATH}, every one checked before any upload;
    `NAME=sha256:<64 hex>` names a file uploaded before (kept as the id, a str).

    Exits with one `error:` line on a bad form, a bad or repeated name, or a PATH that
    is not a regular file.
    """
    found: dict[str, Path | str] = {}
    for value in values:
        name, sep, raw = value.partition("=")
        if not sep or not name or not raw:
            fail(f"--file must be NAME=PATH, got {value!r}")
        if not RUN_FILE_NAME.fullmatch(name):
            fail(f"--file {value!r}: the name must be 1-128 of A-Z a-z 0-9 . _ - "
                 "and not start with a dot")
        if name in found:
            fail(f"--file {name}= is given twice")
        if FILE_ID.fullmatch(raw):
            found[name] = raw
            continue
        path = Path(raw).expanduser()
        if not path.is_file():
            fail(f"--file {value!r}: {path} is not a file")
        found[name] = path
    return found


def upload_run_files(client: Any, files: dict[str, Path | str],
                     bars: Transfers) -> dict[str, str]:
    """Upload each path (an id stays as it is); {NAME: file id} for `submit(files=...)`."""
    return {name: source if isinstance(source, str) else
            client.upload_file(source, progress=bars.track(f"upload {name}"))["id"]
            for name, source in files.items()}


@app.command("upload")
@command
def files_upload(
    path: Path,
    name: Annotated[str | None, typer.Option(help="The name to record (default: the "
                                                  "file's base name)")] = None,
    media_type: Annotated[str | None, typer.Option(help="Declared media type (default: "
                                                        "guessed from the name; the "
                                                        "server sniffs the bytes)")] = None,
) -> None:
    """Upload a file; prints the file object (`submit --file NAME=<its id>` uses it)."""
    if not path.is_file():
        fail(f"{path} is not a file")
    with api_client() as client, Transfers() as bars:
        print_json(client.upload_file(path, name=name, media_type=media_type,
                                      progress=bars.track(f"upload {path.name}")))


@app.command("show")
@command
def files_show(file_id: str) -> None:
    """Print an uploaded file's object as JSON."""
    with api_client() as client:
        print_json(client.get_file(file_id))


@app.command("download")
@command
def files_download(file_id: str, dest: Path) -> None:
    """Download an uploaded file's bytes to DEST (checked against the id's SHA-256)."""
    with api_client() as client, Transfers() as bars:
        written = client.file_content(file_id, dest, progress=bars.track(f"download {dest}"))
    typer.echo(str(written))
