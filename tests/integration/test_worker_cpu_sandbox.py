"""The sandbox's leaner engine path on real Docker: the log stream (read without
docker-py's per-call inspect) outlasts a silence longer than the client's own
timeout, and a run's /run filesystem, made beside the create call, is the one the
engine mounts and is gone with the container."""

from __future__ import annotations

import json
from collections.abc import Iterator

import docker
import docker.errors
import pytest

from runner.sandbox import RUN_LABEL, WORKER_LABEL, ContainerSpec, Sandbox, SandboxConfig
from tests.integration.conftest import SESSION
from tests.support.shellimage import shell_processor

MiB = 1024 * 1024
CLIENT_TIMEOUT = 2  # seconds: the processor stays silent for longer
MAIN = """\
echo before
sleep 4
echo after
mkdir -p /run/out && echo '{"quiet": true}' > /run/out/result.json
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory,
          docker_client: docker.DockerClient) -> Iterator[str]:
    """A processor that prints, stays silent past the client timeout, prints again."""
    with shell_processor(tmp_path_factory.mktemp("quiet-processor"), MAIN,
                         docker_client) as built:
        yield built


def test_output_after_a_silence_longer_than_the_client_timeout_is_captured(
        image: str, docker_client: docker.DockerClient) -> None:
    sandbox = Sandbox(docker.from_env(timeout=CLIENT_TIMEOUT),
                      SandboxConfig(instance=f"cpu-{SESSION}", stop_grace_seconds=1,
                                    allow_image_ids=True))
    spec = ContainerSpec(
        name=f"runner-cpu-{SESSION}-quiet", image=image, cpus=0.5, memory_bytes=64 * MiB,
        pids_limit=32, timeout_seconds=60, log_cap_bytes=MiB, output_bytes=8 * MiB,
        input_json=json.dumps({}).encode(),
        labels={RUN_LABEL: f"cpu-{SESSION}", WORKER_LABEL: f"cpu-{SESSION}"})
    logs: list[bytes] = []
    receipts: list[dict[str, object]] = []
    outcome = sandbox.run(spec, on_log=logs.append, on_receipt=receipts.append)
    assert (outcome.exit_code, outcome.timed_out) == (0, False)
    assert b"".join(logs) == b"before\nafter\n"
    assert outcome.log_bytes == len(b"before\nafter\n") and not outcome.log_truncated
    assert outcome.result.data is not None and json.loads(outcome.result.data) == {"quiet": True}
    # The filesystem made beside the create call is what the engine mounted at /run.
    [receipt] = receipts
    assert receipt["mismatches"] == []
    assert not sandbox.run_fs.directory(spec.name).exists()
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(spec.name)
