"""The command line: `runner ...`. One module per command group; `ops` beside them.

Exit 0 on success; otherwise one clear `error:` line on stderr. Commands import what
they need inside their body, so `runner --help` stays fast and a command for authors
does not load the database layer.

May import every layer: the CLI is the outermost shell, like `api/`.
"""

from __future__ import annotations

import sys

import typer

from runner.cli import dev, files, keys, manifest, processor, runs, services
from runner.cli.ops import ops_app
from runner.errors import RunnerError

app = typer.Typer(help="Run allowlisted processors in locked-down containers.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.command("api")(services.api_command)
app.command("worker")(services.worker_command)
app.command("reconcile")(services.reconcile_command)
app.command("submit")(runs.submit_command)
for sub, name in ((services.db_app, "db"), (keys.app, "keys"), (runs.app, "runs"),
                  (files.app, "files"), (manifest.app, "manifest"), (processor.app, "processor"),
                  (dev.app, "dev"), (ops_app, "ops")):
    app.add_typer(sub, name=name)


def main() -> None:
    try:
        app()
    except RunnerError as exc:  # settings errors raised before a command wrapper runs
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
