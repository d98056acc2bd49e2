"""`runner manifest validate`, `pin` and `diff`: the allowlist file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from runner.cli.common import command, fail, print_json, settings
from runner.errors import ManifestError

app = typer.Typer(help="The allowlist manifest.", no_args_is_help=True)


@app.command("validate")
@command
def manifest_validate(paths: list[Path]) -> None:
    """Check manifest files; each problem is printed as FILE:LINE: PATH: MESSAGE."""
    from runner.manifest import load_manifest

    failed = False
    for path in paths:
        try:
            manifest = load_manifest(path)
            typer.echo(f"{path}: ok, {len(manifest.processors)} processor(s), "
                       f"revision {manifest.revision[:19]}")
        except ManifestError as exc:
            failed = True
            for problem in exc.problems or [exc.message]:
                typer.echo(f"error: {problem}", err=True)
    if failed:
        raise typer.Exit(1)


@app.command("pin")
@command
def manifest_pin(
    image: Annotated[str, typer.Argument(help="repo@sha256:<digest> or repo:tag")],
    name: Annotated[str, typer.Option()],
    version: Annotated[str, typer.Option()],
    manifest: Annotated[Path | None, typer.Option(help="Default: $RUNNER_MANIFEST")] = None,
) -> None:
    """Pin an image for a processor version in a manifest (a tag is resolved to its digest)."""
    from runner.authoring.publish import registry_digest
    from runner.manifest import entry_for, pin

    path = manifest or settings().manifest
    if "@" not in image:
        repo, sep, tag = image.rpartition(":")
        if not sep or "/" in tag:
            fail(f"{image!r} is neither repo@sha256:<digest> nor repo:tag")
        image = f"{repo}@{registry_digest(repo, tag)}"
    pin(path, entry_for(name=name, version=version, image=image))
    typer.echo(f"{path}: pinned {name} {version} to {image}")


@app.command("diff")
def manifest_diff(
    old: Path, new: Path,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
) -> None:
    """Show added, removed and re-pinned processors between two manifests.

    Exit 0: no differences; 1: differences; 2: a manifest is missing or invalid (diff(1)).
    """
    from runner.manifest import load_manifest
    from runner.manifest.diff import EXIT_INVALID, diff_manifests

    try:
        manifests = [load_manifest(old), load_manifest(new)]
    except ManifestError as exc:
        for problem in exc.problems or [exc.message]:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(EXIT_INVALID) from exc
    result = diff_manifests(*manifests)
    if as_json:
        print_json(result.as_json())
    else:
        for line in result.lines():
            typer.echo(line)
        typer.echo(f"{old} -> {new}: {result.summary()}", err=True)
    raise typer.Exit(result.exit_code)

