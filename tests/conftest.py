"""Fixtures every suite that touches Docker shares (unit tests never use them)."""

from __future__ import annotations

import docker
import pytest


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    """The local engine (DOCKER_HOST or the socket); a missing engine fails, never skips."""
    client = docker.from_env()
    client.ping()
    return client
