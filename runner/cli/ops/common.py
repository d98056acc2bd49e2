"""What the `runner ops` commands share: the sub-app, option types and small helpers."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from runner.cli.common import exits_on_error
from runner.domain import ErrorCode, RunStatus
from runner.errors import RunnerError
from runner.observability.logsetup import configure_logging
from runner.settings import Settings, load_settings
from runner.units import parse_duration

ops_app = typer.Typer(help="Operator commands: inspect and recover a deployment.",
                      no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ProcessorOpt = Annotated[str | None, typer.Option(help="Only this processor.")]
MarginOpt = Annotated[float, typer.Option(
    help="Seconds past its timeout (plus stop grace) before a running run counts as stuck.")]
DockerOpt = Annotated[bool, typer.Option(help="Also check the Docker engine (DOCKER_HOST).")]
SinceOpt = Annotated[str, typer.Option(help="How far back, e.g. 30m, 1h, 24h.")]
CodeOpt = Annotated[ErrorCode | None, typer.Option(help="Only this error code.")]
PrefixOpt = Annotated[str | None, typer.Option(
    help="Image references to consider (default: $RUNNER_REGISTRY/processors/).")]

ACTIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)


# Errors of the runner: one `error:` line and exit status 2 (1 means "found a problem").
ops_command = exits_on_error(2)


def settings() -> Settings:
    cfg = load_settings()
    configure_logging(service="ops", fmt=cfg.log_format, level="error")
    return cfg


def emit(data: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


def age(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else round((now - moment).total_seconds(), 1)


def duration(value: str, option: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise RunnerError(f"{option}: {exc}") from exc


def redacted(url: str) -> str:
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.rpartition("//")[2]:
        return url
    scheme, _, user = head.rpartition("//")
    return f"{scheme}//{user.split(':')[0]}:***@{tail}"


def docker_client(timeout: float = 10) -> Any:
    import docker

    from runner.errors import DockerUnavailableError

    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except Exception as exc:  # docker-py raises several unrelated types here
        raise DockerUnavailableError(f"Docker engine unreachable: {exc}") from exc
    return client
