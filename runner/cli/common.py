"""What every CLI command shares: errors as one line on stderr, settings, clients."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer

from runner.errors import ManifestError, RunnerError
from runner.observability.logsetup import configure_logging
from runner.settings import Settings, load_settings

P = ParamSpec("P")
R = TypeVar("R")


def exits_on_error(code: int) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn the runner's errors into `error:` lines on stderr and exit status `code`
    (each manifest problem on its own line); Ctrl-C exits 130 without a traceback."""
    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return func(*args, **kwargs)
            except ManifestError as exc:
                for problem in exc.problems or [exc.message]:
                    typer.echo(f"error: {problem}", err=True)
                raise typer.Exit(code) from exc
            except RunnerError as exc:
                typer.echo(f"error: {exc.message}", err=True)
                raise typer.Exit(code) from exc
            except KeyboardInterrupt:
                raise typer.Exit(130) from None
        return wrapper
    return decorate


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# Errors of the runner: one line on stderr and exit status 1.
command = exits_on_error(1)


def settings(service: str = "cli") -> Settings:
    loaded = load_settings()
    configure_logging(service=service, fmt=loaded.log_format, level=loaded.log_level)
    return loaded


def api_client() -> Any:
    """The API client named by RUNNER_API_URL and RUNNER_API_KEY."""
    from runner.client import RunnerClient

    url, key = os.environ.get("RUNNER_API_URL"), os.environ.get("RUNNER_API_KEY")
    if not url or not key:
        fail("RUNNER_API_URL and RUNNER_API_KEY must be set (`. var/dev/env` after "
             "`runner dev up`)")
    return RunnerClient(str(url), str(key))


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False, default=str))


def docker_client() -> Any:
    import docker

    return docker.from_env()


def load_input(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        loaded = json.loads(text)
    except ValueError as exc:  # not JSON, or an integer of more than 4,300 digits
        fail(f"--input is not JSON: {exc}")
    if not isinstance(loaded, dict):
        fail("--input must be a JSON object")
    return dict(loaded)
