"""Runs last (file order): the whole suite may leave no runner container behind."""

import time

import docker

from tests.integration.conftest import session_containers


def test_no_container_left_behind(docker_client: docker.DockerClient) -> None:
    # Workers remove a finished run's container in the background, just after the
    # run's end is recorded, so the last test's container may still be on its way out.
    deadline = time.monotonic() + 30
    while (left := session_containers(docker_client)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], [c.name for c in left]
