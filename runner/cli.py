"""`runner`: the command line. Exit 0 on success; otherwise one clear line on stderr."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from runner.cliutil import exits_on_error
from runner.domain import Role
from runner.errors import ManifestError, RunnerError
from runner.logs import configure_logging
from runner.ops import ops_app
from runner.settings import Settings, load_settings

app = typer.Typer(help="Run allowlisted processors in locked-down containers.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
runs_app = typer.Typer(help="Inspect runs through the API.", no_args_is_help=True)
manifest_app = typer.Typer(help="The allowlist manifest.", no_args_is_help=True)
processor_app = typer.Typer(help="Build and publish processor images.", no_args_is_help=True)
dev_app = typer.Typer(help="The local development stack.", no_args_is_help=True)
for sub, name in ((db_app, "db"), (keys_app, "keys"), (runs_app, "runs"),
                  (manifest_app, "manifest"), (processor_app, "processor"), (dev_app, "dev"),
                  (ops_app, "ops")):
    app.add_typer(sub, name=name)



def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# Errors of the runner: one line on stderr and exit status 1.
command = exits_on_error(1)


def settings(service: str = "cli") -> Settings:
    loaded = load_settings()
    configure_logging(service=service, fmt=loaded.log_format, level=loaded.log_level)
    return loaded


def _client() -> Any:
    from runner.client import RunnerClient

    url, key = os.environ.get("RUNNER_API_URL"), os.environ.get("RUNNER_API_KEY")
    if not url or not key:
        fail("RUNNER_API_URL and RUNNER_API_KEY must be set (`. var/dev/env` after "
             "`runner dev up`)")
    return RunnerClient(str(url), str(key))


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


# Services -----------------------------------------------------------------

@app.command("api")
@command
def api_command(host: Annotated[str | None, typer.Option()] = None,
                port: Annotated[int | None, typer.Option()] = None) -> None:
    """Serve the HTTP API."""
    import uvicorn

    from api.app import create_app

    cfg = settings("api")
    uvicorn.run(create_app(cfg), host=host or cfg.api_host, port=port or cfg.api_port,
                log_level="warning", access_log=False, log_config=None)


@app.command("worker")
@command
def worker_command(
    queue: Annotated[list[str] | None, typer.Option(help="Queues in priority order.")] = None,
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
    concurrency: Annotated[int, typer.Option(min=1, max=64,
                                             help="Worker processes to run.")] = 1,
) -> None:
    """Run RQ workers that execute runs in containers."""
    from runner.worker import run_worker, supervise

    cfg = settings("worker")
    if concurrency > 1:
        if burst:
            fail("--burst works with a single worker process (--concurrency 1)")
        supervise(cfg, concurrency=concurrency, queues=queue)
    else:
        run_worker(cfg, queues=queue, burst=burst)


@app.command("reconcile")
@command
def reconcile_command() -> None:
    """One reconciler pass: recover expired leases, lost jobs, leftover containers."""
    from runner.worker import build_reconciler

    report = build_reconciler(settings("reconciler")).run_once()
    if report.skipped:
        typer.echo("another reconciler holds the lock; nothing done")
        return
    typer.echo(f"expired leases: {len(report.expired)}, requeued: {len(report.requeued)}, "
               f"containers removed: {len(report.removed_containers)}")


@db_app.command("upgrade")
@command
def db_upgrade() -> None:
    """Apply the database migrations."""
    from runner.migrate import upgrade

    cfg = settings()
    upgrade(cfg.database_url)
    typer.echo("database schema is current")


def _keys() -> Any:
    from runner.keys import Keys
    from runner.store import Store

    return Keys(Store(settings().database_url))


@keys_app.command("create")
@command
def keys_create(tenant: Annotated[str, typer.Option()],
                role: Annotated[Role, typer.Option()] = Role.SUBMITTER) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    key, plaintext = _keys().create(tenant=tenant, role=role)
    typer.echo(plaintext)
    typer.echo(f"key {key.id}: tenant {key.tenant}, role {key.role} "
               "(shown once; only its hash is stored)", err=True)


@keys_app.command("list")
@command
def keys_list(tenant: Annotated[str | None, typer.Option()] = None) -> None:
    """List keys (ids, tenants, roles, use); never a secret."""
    for key in _keys().list(tenant=tenant):
        state = "revoked" if key["revoked_at"] else "active"
        used = key["last_used_at"].isoformat() if key["last_used_at"] else "never"
        typer.echo(f"{key['prefix']}...  {key['tenant']:<16} {key['role']:<9} {state:<8} "
                   f"last used {used}")


@keys_app.command("revoke")
@command
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id, prefix or whole key")]
                ) -> None:
    """Revoke a key; it gets 401 from the next request on."""
    if not _keys().revoke(key_id):
        fail(f"no active key {key_id}")
    typer.echo(f"revoked {key_id}")


# Runs ---------------------------------------------------------------------

def _load_input(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--input is not JSON: {exc}")
    if not isinstance(loaded, dict):
        fail("--input must be a JSON object")
    return dict(loaded)


def _follow(client: Any, run_id: str) -> dict[str, Any]:
    for chunk in client.follow_logs(run_id):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    run: dict[str, Any] = client.wait(run_id)
    return run


@app.command("submit")
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
    with _client() as client:
        run = client.submit(processor, _load_input(input), version=version,
                            timeout_seconds=timeout, idempotency_key=idempotency_key)
        if not follow:
            _print_json(run)
            return
        final = _follow(client, run["id"])
        _print_json(final)
        if final["status"] != "succeeded":
            raise typer.Exit(1)


@runs_app.command("list")
@command
def runs_list(status: Annotated[str | None, typer.Option()] = None,
              processor: Annotated[str | None, typer.Option()] = None,
              limit: int = 20) -> None:
    """List recent runs."""
    with _client() as client:
        page = client.runs(status=status, processor=processor, limit=limit)
    for run in page["items"]:
        typer.echo(f"{run['id']}  {run['status']:<11} {run['processor']} {run['version']}  "
                   f"{run['error_code'] or ''}")


@runs_app.command("show")
@command
def runs_show(run_id: str) -> None:
    """Print a run as JSON."""
    with _client() as client:
        _print_json(client.run(run_id))


@runs_app.command("cancel")
@command
def runs_cancel(run_id: str) -> None:
    """Cancel a run: a queued one never starts, a running one is stopped."""
    with _client() as client:
        run = client.cancel(run_id)
    typer.echo(f"{run['id']}: {run['status']}"
               + (" (stop requested)" if run.get("cancel_requested") and
                  run["status"] == "running" else ""))


@runs_app.command("replay")
@command
def runs_replay(run_id: str) -> None:
    """Start a new run with an ended run's processor version and input."""
    with _client() as client:
        _print_json(client.replay(run_id))


@runs_app.command("logs")
@command
def runs_logs(run_id: str, follow: Annotated[bool, typer.Option()] = False) -> None:
    """Print a run's captured output."""
    with _client() as client:
        if follow:
            _follow(client, run_id)
        else:
            sys.stdout.buffer.write(client.logs(run_id))


# Manifest and processors --------------------------------------------------

@manifest_app.command("validate")
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


@manifest_app.command("pin")
@command
def manifest_pin(
    image: Annotated[str, typer.Argument(help="repo@sha256:<digest> or repo:tag")],
    name: Annotated[str, typer.Option()],
    version: Annotated[str, typer.Option()],
    manifest: Annotated[Path | None, typer.Option(help="Default: $RUNNER_MANIFEST")] = None,
) -> None:
    """Pin an image for a processor version in a manifest (a tag is resolved to its digest)."""
    from runner.manifest import entry_for, pin
    from runner.publish import registry_digest

    path = manifest or settings().manifest
    if "@" not in image:
        repo, sep, tag = image.rpartition(":")
        if not sep or "/" in tag:
            fail(f"{image!r} is neither repo@sha256:<digest> nor repo:tag")
        image = f"{repo}@{registry_digest(repo, tag)}"
    pin(path, entry_for(name=name, version=version, image=image))
    typer.echo(f"{path}: pinned {name} {version} to {image}")


@manifest_app.command("diff")
def manifest_diff(
    old: Path, new: Path,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
) -> None:
    """Show added, removed and re-pinned processors between two manifests.

    Exit 0: no differences; 1: differences; 2: a manifest is missing or invalid (diff(1)).
    """
    from runner.manifest import load_manifest
    from runner.manifestdiff import EXIT_INVALID, diff_manifests

    try:
        manifests = [load_manifest(old), load_manifest(new)]
    except ManifestError as exc:
        for problem in exc.problems or [exc.message]:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(EXIT_INVALID) from exc
    result = diff_manifests(*manifests)
    if as_json:
        _print_json(result.as_json())
    else:
        for line in result.lines():
            typer.echo(line)
        typer.echo(f"{old} -> {new}: {result.summary()}", err=True)
    raise typer.Exit(result.exit_code)


def _docker() -> Any:
    import docker

    return docker.from_env()


@processor_app.command("build")
@command
def processor_build(directory: Path,
                    local_base: Annotated[bool, typer.Option(
                        help="Use the locally built runner-base images")] = False,
                    base: Annotated[str | None, typer.Option(help="Base image")] = None) -> None:
    """Build a processor image from DIR (processor.yaml + files)."""
    from runner.publish import ProcessorDir, build

    cfg = settings()
    proc = ProcessorDir.load(directory)
    image_id = build(proc, registry=cfg.registry, client=_docker(), base=base,
                     local_base=local_base)
    typer.echo(f"{proc.repository(cfg.registry)}:{proc.version} {image_id}")


@processor_app.command("publish")
@command
def processor_publish(directory: Path,
                      local_base: Annotated[bool, typer.Option(
                          help="Use the locally built runner-base images")] = False,
                      base: Annotated[str | None, typer.Option(help="Base image")] = None,
                      pin_to: Annotated[Path | None, typer.Option(
                          "--pin", help="Also pin the entry in this manifest")] = None) -> None:
    """Build, push and print the allowlist entry pinning the pushed digest."""
    from runner.manifest import pin
    from runner.publish import publish

    cfg = settings()
    entry = publish(directory, registry=cfg.registry, client=_docker(), base=base,
                    local_base=local_base)
    typer.echo(yaml.safe_dump([entry], sort_keys=False).rstrip())
    if pin_to is not None:
        pin(pin_to, entry)
        typer.echo(f"pinned in {pin_to}", err=True)


@processor_app.command("run")
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
    from runner.localrun import build_and_run, limits_text

    def built(image_id: str, processor: Any) -> None:
        limits = limits_text(processor.limits,
                             timeout_seconds=timeout or processor.limits.timeout_seconds)
        typer.echo(f"built {image_id[:19]}; running it once with {limits}", err=True)

    def stream(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()

    run = build_and_run(directory, _load_input(input), settings=settings(), client=_docker(),
                        base=base, local_base=local_base, manifest=manifest,
                        timeout_seconds=timeout, attempt=attempt,
                        on_log=None if as_json else stream,
                        on_built=None if as_json else built)
    if as_json:
        _print_json(run.as_json())
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

@dev_app.command("up")
@command
def dev_up(workers: Annotated[int, typer.Option(min=1, max=16)] = 2) -> None:
    """Start Redis, the registry, the API and workers; write var/dev/env."""
    from runner.devstack import DevStack

    DevStack(settings("dev")).up(workers=workers)


@dev_app.command("down")
@command
def dev_down() -> None:
    """Stop what `runner dev up` started, and nothing else."""
    from runner.devstack import DevStack

    DevStack(settings("dev")).down()


def main() -> None:
    try:
        app()
    except RunnerError as exc:  # settings errors raised before a command wrapper runs
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
