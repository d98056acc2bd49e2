"""Runs last (file order): the whole suite may leave no runner container behind."""

import docker

from tests.integration.conftest import session_containers


def test_no_container_left_behind(docker_client: docker.DockerClient) -> None:
    left = session_containers(docker_client)
    assert left == [], [c.name for c in left]
