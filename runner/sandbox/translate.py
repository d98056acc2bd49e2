"""The one translator from docker-py and transport errors to the runner's error tree.

Every Docker call of the sandbox runs inside `docker_errors(stage)`, so a caller sees
`DockerUnavailableError` (the engine is gone) or `SandboxError` (it refused), with the
stage named, and the docker-py exception as the cause.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import docker.errors
import requests.exceptions

from runner.errors import DockerUnavailableError, SandboxError


@contextmanager
def docker_errors(stage: str) -> Iterator[None]:
    """Turn docker-py and transport errors into the runner's error tree."""
    try:
        yield
    except requests.exceptions.ConnectionError as exc:
        raise DockerUnavailableError(f"Docker engine unreachable during {stage}: {exc}",
                                     stage=stage) from exc
    except docker.errors.DockerException as exc:
        if isinstance(exc, docker.errors.APIError) and exc.is_server_error():
            explanation = exc.explanation or str(exc)
            if "Cannot connect" in str(explanation) or "daemon" in str(explanation).lower():
                raise DockerUnavailableError(f"{stage}: {explanation}", stage=stage) from exc
        raise SandboxError(f"{stage}: {exc}", stage=stage) from exc


def cause_is(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether a translated error was caused by a docker-py error of `kind`."""
    return isinstance(exc.__cause__, kind)


def is_conflict(exc: BaseException, *, containing: str = "") -> bool:
    """A translated 409 from the engine (optionally with `containing` in its text)."""
    cause = exc.__cause__
    return (isinstance(cause, docker.errors.APIError) and cause.status_code == 409
            and containing in str(cause.explanation or ""))
