"""`runner api`, `worker`, `reconcile` and `db upgrade`: start the services."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from runner.cli.common import command, fail, settings

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


@command
def api_command(host: Annotated[str | None, typer.Option()] = None,
                port: Annotated[int | None, typer.Option()] = None,
                workers: Annotated[int, typer.Option(
                    min=1, max=64, help="API processes serving the one port")] = 1) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from api.app import create_app

    cfg = settings("api")
    serve = functools.partial(uvicorn.run, host=host or cfg.api_host,
                              port=port or cfg.api_port, log_level="warning",
                              access_log=False, log_config=None)
    if workers == 1:
        serve(create_app(cfg))
        return
    # uvicorn's supervisor binds the port and starts `workers` processes, each
    # building its own app (pools, caches, limits) from the same environment: see
    # docs/scaling.md for the per-process caps that then multiply. What would stop
    # every one of them is checked here first, to fail once with one clear line.
    from runner.control.migrate import require_current_schema
    from runner.manifest import ManifestSource

    require_current_schema(cfg.database_url)
    ManifestSource(cfg.manifest)
    serve("api.app:app_from_environment", factory=True, workers=workers)


@command
def worker_command(
    queue: Annotated[list[str] | None, typer.Option(help="Queues in priority order.")] = None,
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
    concurrency: Annotated[int, typer.Option(min=1, max=64,
                                             help="Worker processes to run.")] = 1,
) -> None:
    """Run RQ workers that execute runs in containers."""
    from runner.execution.supervisor import supervise
    from runner.execution.worker import run_worker

    cfg = settings("worker")
    if concurrency > 1:
        if burst:
            fail("--burst works with a single worker process (--concurrency 1)")
        supervise(cfg, concurrency=concurrency, queues=queue)
    else:
        run_worker(cfg, queues=queue, burst=burst)


@command
def reconcile_command() -> None:
    """One reconciler pass: recover expired leases, lost jobs, leftover containers."""
    from runner.execution.wiring import build_reconciler

    reconciler = build_reconciler(settings("reconciler"))
    report = reconciler.run_once()
    if report.skipped:
        typer.echo("another reconciler holds the lock; nothing done")
        return
    swept = reconciler.sweep_files_now().swept_blobs + report.swept_blobs
    typer.echo(f"expired leases: {len(report.expired)}, requeued: {len(report.requeued)}, "
               f"containers removed: {len(report.removed_containers)}, "
               f"runs pruned: {report.pruned}, files pruned: {report.pruned_files}, "
               f"blobs swept: {swept}")


@db_app.command("upgrade")
@command
def db_upgrade() -> None:
    """Apply the database migrations."""
    from runner.control.migrate import upgrade

    cfg = settings()
    upgrade(cfg.database_url)
    typer.echo("database schema is current")

