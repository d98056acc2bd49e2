"""`runner processor build`, `publish` and `run`: for processor authors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from runner.cli.common import command, docker_client, load_input, print_json, settings
from runner.manifest.yamlio import dump_manifest

app = typer.Typer(help="Build and publish processor images.", no_args_is_help=True)


@app.command("build")
@command
def processor_build(directory: Path,
                    local_base: Annotated[bool, typer.Option(
                        help="Use the locally built runner-base images")] = False,
                    base: Annotated[str | None, typer.Option(help="Base image")] = None) -> None:
    """Build a processor image from DIR (processor.yaml + files)."""
    from runner.authoring.publish import ProcessorDir, build

    cfg = settings()
    proc = ProcessorDir.load(directory)
    image_id = build(proc, registry=cfg.registry, client=docker_client(), base=base,
                     local_base=local_base)
    typer.echo(f"{proc.repository(cfg.registry)}:{proc.version} {image_id}")


@app.command("publish")
@command
def processor_publish(directory: Path,
                      local_base: Annotated[bool, typer.Option(
                          help="Use the locally built runner-base images")] = False,
                      base: Annotated[str | None, typer.Option(help="Base image")] = None,
                      pin_to: Annotated[Path | None, typer.Option(
                          "--pin", help="Also pin the entry in this manifest")] = None) -> None:
    """Build, push and print the allowlist entry pinning the pushed digest."""
    from runner.authoring.publish import publish
    from runner.manifest import pin

    cfg = settings()
    entry = publish(directory, registry=cfg.registry, client=docker_client(), base=base,
                    local_base=local_base)
    typer.echo(dump_manifest([entry]).rstrip())
    if pin_to is not None:
        pin(pin_to, entry)
        typer.echo(f"pinned in {pin_to}", err=True)


@app.command("run")
@command
def processor_run(
    directory: Path,
    input: Annotated[str | None, typer.Option("--input", help="JSON or @file")] = None,
    local_base: Annotated[bool, typer.Option(
        help="Use the locally built runner-base images")] = False,
    base: Annotated[str | None, typer.Option(help="Base image")] = None,
    manifest: Annotated[Path | None, typer.Option(
        help="Take the limits from this manifest's entry, not processor.yaml")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds, up to the limit")] = None,
    attempt: Annotated[int, typer.Option(min=1, help="RUNNER_ATTEMPT to set")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
) -> None:
    """Build DIR and run it once, locally, in the production sandbox (no API, Redis or DB).

    Prints the logs, the exit code, the outcome and the result; exit 0 only on success.
    """
    from runner.authoring.localrun import build_and_run, limits_text

    def built(image_id: str, processor: Any) -> None:
        limits = limits_text(processor.limits,
                             timeout_seconds=timeout or processor.limits.timeout_seconds)
        typer.echo(f"built {image_id[:19]}; running it once with {limits}", err=True)

    def stream(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()

    run = build_and_run(directory, load_input(input), settings=settings(), client=docker_client(),
                        base=base, local_base=local_base, manifest=manifest,
                        timeout_seconds=timeout, attempt=attempt,
                        on_log=None if as_json else stream,
                        on_built=None if as_json else built)
    if as_json:
        print_json(run.as_json())
    else:
        if run.logs and not run.logs.endswith(b"\n"):
            typer.echo("")
        body = run.as_json()
        typer.echo(f"exit code: {body['exit_code']}")
        typer.echo(f"outcome: {body['status']}" + (
            f" ({body['error_code']}: {body['error_message']})" if body["error_code"] else ""))
        typer.echo(f"in production: {body['in_production']}")
        typer.echo("result: " + json.dumps(body["result"]))
    if not run.succeeded:
        raise typer.Exit(1)


# Dev stack ----------------------------------------------------------------
