"""`runner dev up` and `down`: the local development stack."""

from __future__ import annotations

from typing import Annotated

import typer

from runner.cli.common import command, settings

app = typer.Typer(help="The local development stack.", no_args_is_help=True)


@app.command("up")
@command
def dev_up(workers: Annotated[int, typer.Option(min=1, max=16)] = 2) -> None:
    """Start Redis, the registry, the API and workers; write var/dev/env."""
    from runner.authoring.devstack import DevStack

    DevStack(settings("dev")).up(workers=workers)


@app.command("down")
@command
def dev_down() -> None:
    """Stop what `runner dev up` started, and nothing else."""
    from runner.authoring.devstack import DevStack

    DevStack(settings("dev")).down()

