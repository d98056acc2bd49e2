"""Processor authors' tools against real Docker and the real registry.

- `runner processor run DIR` runs the image once in the production sandbox: the
  samples' outcomes, and a probe that reads back the lockdown from inside.
- `runner manifest pin REPO:TAG` stores the registry's digest, never the tag, and a
  re-pushed tag shows up in `runner manifest diff` as re-pinned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml
from typer.testing import CliRunner

from runner.authoring.localrun import LOCAL_LABEL, build_and_run
from runner.authoring.publish import MANIFEST_MEDIA_TYPES
from runner.cli import app
from runner.domain import ErrorCode, RunStatus
from runner.errors import InvalidInputError, ManifestError
from runner.settings import Settings, load_settings

from .conftest import REGISTRY, ROOT

SAMPLES = ROOT / "processor-templates" / "samples"
TOKEN = secrets.token_hex(4)

pytestmark = pytest.mark.integration
# In-process only for commands that leave logging alone (manifest pin/diff/validate).
cli = CliRunner()


@pytest.fixture(scope="module")
def local_settings() -> Settings:
    return load_settings(registry=REGISTRY, stop_grace_seconds=1)


def run(directory: Path, value: Any, settings: Settings, client: docker.DockerClient,
        **options: Any) -> Any:
    return build_and_run(directory, value, settings=settings, client=client, local_base=True,
                         **options)


def no_local_containers(client: docker.DockerClient) -> None:
    assert client.containers.list(all=True, sparse=True,
                                  filters={"label": LOCAL_LABEL}) == []


def test_echo_succeeds_with_its_input_as_result(
        docker_client: docker.DockerClient, local_settings: Settings) -> None:
    streamed: list[bytes] = []
    done = run(SAMPLES / "echo", {"message": "hello"}, local_settings, docker_client,
               on_log=streamed.append)
    assert done.succeeded
    assert done.finish.status is RunStatus.SUCCEEDED
    assert done.outcome.exit_code == 0
    assert done.finish.result == {"echo": {"message": "hello"}}
    assert f"echo run={done.run_id} attempt=1\nmessage=hello\n".encode() == done.logs
    assert b"".join(streamed) == done.logs
    no_local_containers(docker_client)


@pytest.mark.parametrize("code", [3, 75])
def test_exit_sample_returns_its_code(docker_client: docker.DockerClient,
                                      local_settings: Settings, code: int) -> None:
    done = run(SAMPLES / "exit", {"code": code}, local_settings, docker_client)
    assert not done.succeeded
    assert done.outcome.exit_code == code
    assert (done.finish.status, done.finish.error_code) == (RunStatus.FAILED,
                                                            ErrorCode.NONZERO_EXIT)
    assert done.logs == f"exiting with {code}\n".encode()


def test_memhog_is_killed_by_the_memory_limit(docker_client: docker.DockerClient,
                                              local_settings: Settings) -> None:
    done = run(SAMPLES / "memhog", {"megabytes": 512}, local_settings, docker_client)
    assert done.limits.memory_bytes == 64 * 1024**2  # from its processor.yaml
    assert done.outcome.oom_killed
    assert (done.finish.status, done.finish.error_code) == (RunStatus.FAILED,
                                                            ErrorCode.OOM_KILLED)
    assert done.finish.result is None
    no_local_containers(docker_client)


def test_timeout_and_log_cap_are_applied(docker_client: docker.DockerClient,
                                         local_settings: Settings) -> None:
    slept = run(SAMPLES / "sleep", {}, local_settings, docker_client, timeout_seconds=1)
    assert slept.outcome.timed_out and slept.finish.error_code == ErrorCode.TIMEOUT
    assert slept.finish.status is RunStatus.TIMED_OUT
    flood = run(SAMPLES / "logflood", {"megabytes": 3}, local_settings, docker_client)
    assert flood.limits.log_bytes == 1024**2
    assert flood.outcome.log_truncated and flood.outcome.log_bytes == 1024**2
    assert flood.logs.endswith(b"[runner: output truncated at 1048576 bytes]\n")


def test_input_is_checked_like_the_api_before_building(
        docker_client: docker.DockerClient, local_settings: Settings) -> None:
    with pytest.raises(InvalidInputError, match=r"input\.code"):
        run(SAMPLES / "exit", {"code": "three"}, local_settings, docker_client)


TEMPLATES = ROOT / "processor-templates"


@pytest.fixture(scope="module", autouse=True)
def remove_template_images(docker_client: docker.DockerClient) -> Iterator[None]:
    """The templates' images are built only here; the samples' tags are shared, kept."""
    yield
    for template in ("python", "shell"):
        meta = yaml.safe_load((TEMPLATES / template / "processor.yaml").read_text())
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(
                f"{REGISTRY}/processors/{meta['name']}:{meta['version']}")


@pytest.mark.parametrize(("template", "result"), [
    ("python", {"keys": ["a", "b"]}),
    ("shell", {"input_bytes": len(json.dumps({"a": 1, "b": "x"}))}),
])
def test_templates_run_and_their_helpers_ask_for_a_retry_with_75(
        docker_client: docker.DockerClient, local_settings: Settings, tmp_path: Path,
        template: str, result: dict[str, Any]) -> None:
    done = run(TEMPLATES / template, {"a": 1, "b": "x"}, local_settings, docker_client)
    assert done.succeeded and done.finish.result == result
    assert done.in_production == "succeeded"

    retry = run(TEMPLATES / template, {"retry": True}, local_settings, docker_client)
    assert retry.outcome.exit_code == 75
    assert b"asked to retry by the input\n" in retry.logs
    # No retry policy in the template's processor.yaml: production ends it as failed.
    assert retry.in_production == "failed"

    proc = yaml.safe_load((TEMPLATES / template / "processor.yaml").read_text())
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "processors": [{
        "name": proc["name"], "version": proc["version"],
        "image": f"{REGISTRY}/processors/{proc['name']}@sha256:{'0' * 64}",
        "retry": {"max_attempts": 3, "on": ["exit:75"]}}]}))
    retried = run(TEMPLATES / template, {"retry": True}, local_settings, docker_client,
                  manifest=manifest, attempt=3)
    assert retried.outcome.exit_code == 75
    assert retried.in_production == "dead_letter"  # the third of three attempts
    first = run(TEMPLATES / template, {"retry": True}, local_settings, docker_client,
                manifest=manifest)
    assert first.in_production == "retried: attempt 2 of 3 after a backoff"


def test_bad_limits_in_processor_yaml_are_named_before_building(
        tmp_path: Path, docker_client: docker.DockerClient, local_settings: Settings) -> None:
    (tmp_path / "processor.yaml").write_text(
        'name: bad\nversion: "1"\ntemplate: shell\nlimits: {memory: lots, pids: 0}\n')
    with pytest.raises(ManifestError) as caught:
        run(tmp_path, {}, local_settings, docker_client)
    assert caught.value.problems == [
        f"{tmp_path / 'processor.yaml'}: limits.memory: 'lots' is not a size "
        "(use e.g. 256Mi, 4Mi, 1Gi or bytes)",
        f"{tmp_path / 'processor.yaml'}: limits.pids: 0 is less than the minimum of 1"]


PROBE = textwrap.dedent("""\
    import json, os
    from runner_processor import read_input, write_result

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return line.split()[1]

    def first(*paths):
        for path in paths:
            if os.path.exists(path):
                return open(path).read().strip()

    def writable(path):
        try:
            with open(os.path.join(path, "probe"), "w") as handle:
                handle.write("x")
            return True
        except OSError:
            return False

    write_result({
        "uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
        "input": read_input(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("RUNNER_")},
        "cap_eff": status("CapEff"), "no_new_privs": status("NoNewPrivs"),
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "root_writable": writable("/app"), "tmp_writable": writable("/tmp"),
        "memory_max": first("/sys/fs/cgroup/memory.max",
                            "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        "pids_max": first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
        "input_mode": oct(os.stat("/run/input.json").st_mode & 0o777),
    })
""")


@pytest.fixture
def probe_dir(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[Path]:
    directory = tmp_path / "probe"
    directory.mkdir()
    name = f"authoring-probe-{TOKEN}"
    (directory / "processor.yaml").write_text(textwrap.dedent(f"""\
        name: {name}
        version: "0.0.1"
        template: python
        limits: {{cpus: 0.5, memory: 48Mi, pids: 24, timeout: 30s}}
        input_schema: {{type: object, required: [hello]}}
        """))
    (directory / "main.py").write_text(PROBE)
    yield directory
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(f"{REGISTRY}/processors/{name}:0.0.1", force=True)


def test_probe_sees_the_production_lockdown(docker_client: docker.DockerClient,
                                            local_settings: Settings, probe_dir: Path) -> None:
    done = run(probe_dir, {"hello": "world"}, local_settings, docker_client, attempt=2)
    assert done.succeeded, done.logs
    seen = done.finish.result
    assert (seen["uid"], seen["gid"]) == (65532, 65532)
    assert seen["cwd"] == "/tmp"
    assert seen["input"] == {"hello": "world"}
    assert seen["env"] == {"RUNNER_RUN_ID": done.run_id, "RUNNER_ATTEMPT": "2"}
    assert int(seen["cap_eff"], 16) == 0
    assert seen["no_new_privs"] == "1"
    assert seen["interfaces"] == ["lo"]
    assert (seen["root_writable"], seen["tmp_writable"]) == (False, True)
    assert seen["memory_max"] == str(48 * 1024**2)
    assert seen["pids_max"] == "24"
    assert seen["input_mode"] == "0o444"


def runner_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command in its own process (it configures logging process-wide)."""
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "RUNNER_REGISTRY": REGISTRY})


def test_cli_prints_logs_exit_code_outcome_and_result(probe_dir: Path) -> None:
    result = runner_cli("processor", "run", str(SAMPLES / "exit"), "--local-base",
                        "--input", '{"code": 75}')
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "exiting with 75", "exit code: 75",
        "outcome: failed (nonzero_exit: the processor exited with code 75)",
        "in production: failed", "result: null"]
    assert "running it once with cpus 0.1, memory 16Mi, pids 8, timeout 30s" in result.stderr

    result = runner_cli("processor", "run", str(SAMPLES / "echo"), "--local-base", "--json",
                        "--input", '{"message": "hi"}')
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert (body["status"], body["exit_code"], body["result"]) == (
        "succeeded", 0, {"echo": {"message": "hi"}})
    assert "message=hi\n" in body["logs"]

    result = runner_cli("processor", "run", str(probe_dir), "--local-base", "--input", "{}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "error: input: 'hello' is a required property"
    assert result.stdout == ""


def test_limits_can_come_from_the_operators_manifest(
        docker_client: docker.DockerClient, local_settings: Settings, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({
        "version": 1, "defaults": {"limits": {"pids": 20}},
        "processors": [{"name": "memhog", "version": "1.0.0",
                        "image": f"{REGISTRY}/processors/memhog@sha256:{'0' * 64}",
                        "limits": {"memory": "512Mi"}}]}))
    done = run(SAMPLES / "memhog", {"megabytes": 96}, local_settings, docker_client,
               manifest=manifest)
    assert (done.limits.memory_bytes, done.limits.pids) == (512 * 1024**2, 20)
    assert done.succeeded and done.finish.result == {"held_mib": 96}


# Pin by tag ---------------------------------------------------------------

def build_and_push(client: docker.DockerClient, context: Path, repo: str, stamp: str) -> str:
    """Build a tiny image whose content is `stamp`, push it as repo:stable; its RepoDigest."""
    (context / "stamp.txt").write_text(stamp)
    (context / "Dockerfile").write_text("FROM runner-base/busybox:local\nCOPY stamp.txt /\n")
    image, _ = client.images.build(path=str(context), tag=f"{repo}:stable", rm=True,
                                   pull=False)
    for event in client.api.push(repo, tag="stable", stream=True, decode=True):
        assert "error" not in event, event
    digests = [d for d in client.images.get(image.id).attrs["RepoDigests"]
               if d.startswith(f"{repo}@")]
    assert len(digests) == 1
    return digests[0].split("@", 1)[1]


def served_digest(repo: str, tag: str) -> str:
    """The sha256 of the manifest bytes the registry serves for the tag, computed here."""
    host, _, name = repo.partition("/")
    response = httpx.get(f"http://{host}/v2/{name}/manifests/{tag}",
                         headers={"Accept": MANIFEST_MEDIA_TYPES}, timeout=10)
    response.raise_for_status()
    return "sha256:" + hashlib.sha256(response.content).hexdigest()


@pytest.fixture
def pin_repo(docker_client: docker.DockerClient) -> Iterator[str]:
    repo = f"{REGISTRY}/authoring-test/pin-{TOKEN}"
    yield repo
    for image in docker_client.images.list(name=repo):
        docker_client.images.remove(image.id, force=True)


def test_pin_by_tag_stores_the_digest_and_diff_shows_the_repin(
        docker_client: docker.DockerClient, tmp_path: Path, pin_repo: str) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    manifest = tmp_path / "manifest.yaml"
    pin = ["manifest", "pin", f"{pin_repo}:stable", "--name", "stamped", "--version", "1.0",
           "--manifest", str(manifest)]

    first = build_and_push(docker_client, context, pin_repo, f"first {TOKEN}")
    assert served_digest(pin_repo, "stable") == first
    result = cli.invoke(app, pin)
    assert result.exit_code == 0, result.output
    text = manifest.read_text()
    entries = yaml.safe_load(text)["processors"]
    assert entries == [{"name": "stamped", "version": "1.0", "image": f"{pin_repo}@{first}"}]
    assert ":stable" not in text and "stable" not in text
    assert cli.invoke(app, ["manifest", "validate", str(manifest)]).exit_code == 0

    before = tmp_path / "before.yaml"
    shutil.copy(manifest, before)
    second = build_and_push(docker_client, context, pin_repo, f"second {TOKEN}")
    assert second != first and served_digest(pin_repo, "stable") == second
    assert cli.invoke(app, pin).exit_code == 0
    assert yaml.safe_load(manifest.read_text())["processors"][0]["image"] == \
        f"{pin_repo}@{second}"
    assert "stable" not in manifest.read_text()

    diff = cli.invoke(app, ["manifest", "diff", str(before), str(manifest)])
    assert diff.exit_code == 1
    assert diff.stdout.splitlines() == [f"~ stamped 1.0: re-pinned {first} -> {second}"]
    body = json.loads(cli.invoke(app, ["manifest", "diff", "--json", str(before),
                                       str(manifest)]).stdout)
    assert [(c["name"], c["repinned"], c["old_digest"], c["new_digest"])
            for c in body["changed"]] == [("stamped", True, first, second)]


def test_pin_of_an_unknown_tag_fails_and_writes_nothing(tmp_path: Path, pin_repo: str
                                                        ) -> None:
    manifest = tmp_path / "manifest.yaml"
    result = cli.invoke(app, ["manifest", "pin", f"{pin_repo}:no-such-tag", "--name", "x",
                              "--version", "1", "--manifest", str(manifest)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: registry has no ")
    assert not manifest.exists()
