"""What every CLI command shares: the runner's errors as one line on stderr."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import typer

from runner.errors import ManifestError, RunnerError

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
