"""A throwaway processor image of one shell script, for tests that need a processor
behaving in one particular way (built on the local busybox base, no registry)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors


@contextlib.contextmanager
def shell_processor(directory: Path, script: str,
                    client: docker.DockerClient) -> Iterator[str]:
    """The local image id of a processor running `script` as user 65532 (removed
    afterwards)."""
    (directory / "main.sh").write_text(script)
    (directory / "Dockerfile").write_text("FROM runner-base/busybox:local\nCOPY main.sh /app/\n"
                                          'USER 65532:65532\n'
                                          'ENTRYPOINT ["/bin/sh", "/app/main.sh"]\n')
    built, _ = client.images.build(path=str(directory), rm=True, pull=False)
    try:
        yield str(built.id)
    finally:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(built.id, force=True)
