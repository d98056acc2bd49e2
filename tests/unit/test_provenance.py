"""The provenance comparison: every setting the engine reports differently is named."""

from pathlib import Path
from typing import Any

from runner.sandbox import (
    ContainerSpec,
    SandboxConfig,
    applied_settings,
    expected_settings,
    mismatches,
)
from runner.sandbox.runfs import describe, image_bytes

SPEC = ContainerSpec(name="n", image="r@sha256:" + "a" * 64, cpus=0.5, memory_bytes=64 << 20,
                     pids_limit=16, timeout_seconds=5, log_cap_bytes=1 << 20, input_json=b"{}",
                     output_bytes=8 << 20)
CONFIG = SandboxConfig(tmp_size_bytes=8 << 20, run_fs_root=Path("/state/run"), instance="i")
DEVICE = "/state/run/i/n/run"
TMP = f"rw,noexec,nosuid,nodev,size={8 << 20},nr_inodes=1024,uid=65532,gid=65532,mode=0700"
# What this host sees at the /run volume's device when it is the attempt's filesystem.
RUN_FS = {"mounted": True, "type": "ext4", "noexec": True, "nosuid": True, "nodev": True,
          "device_bytes": image_bytes(8 << 20, 2)}


def run_mount(**options: str) -> dict[str, object]:
    return {"Type": "volume", "Target": "/run", "VolumeOptions": {
        "NoCopy": True, "DriverConfig": {"Name": "local", "Options": {
            "type": "none", "o": "bind,noexec,nosuid,nodev", "device": DEVICE, **options}}}}


def inspect(mounts: list[dict[str, object]] | None = None,
            **host_changes: object) -> dict[str, object]:
    host = {"NanoCpus": 500_000_000, "Memory": 64 << 20, "MemorySwap": 64 << 20,
            "PidsLimit": 16, "NetworkMode": "none", "ReadonlyRootfs": True,
            "Privileged": False, "CapDrop": ["ALL"], "CapAdd": None,
            "SecurityOpt": ["no-new-privileges"], "Init": True,
            "Tmpfs": {"/tmp": TMP}, "Mounts": [run_mount()], "Binds": None, "Devices": None,
            "PidMode": "", "LogConfig": {"Type": "json-file", "Config": {}}}
    host.update(host_changes)
    return {"Image": "sha256:" + "b" * 64, "HostConfig": host,
            "Config": {"User": "65532:65532", "NetworkDisabled": True},
            "Mounts": mounts if mounts is not None else [
                {"Type": "volume", "Name": "v" * 64, "Destination": "/run", "Driver": "local"}]}


def problems_of(attrs: dict[str, object], run_fs: dict[str, Any] | None = None) -> list[str]:
    expected = expected_settings(SPEC, CONFIG, "sha256:" + "b" * 64)
    return mismatches(expected, applied_settings(attrs, RUN_FS if run_fs is None else run_fs))


def test_what_docker_reports_for_a_faithful_create_matches() -> None:
    assert problems_of(inspect()) == []


def test_tmp_is_bounded_in_bytes_and_inodes_and_the_processors_only() -> None:
    expected = expected_settings(SPEC, CONFIG, "sha256:" + "b" * 64)
    assert expected["tmpfs"] == {"/tmp": TMP}
    looser = TMP.replace(",mode=0700", ",mode=1777")
    assert [p.split(":")[0] for p in problems_of(inspect(Tmpfs={"/tmp": looser}))] == ["tmpfs"]


def test_a_run_volume_without_the_bound_is_a_mismatch() -> None:
    plain = {"Type": "volume", "Target": "/run", "VolumeOptions": {"NoCopy": True}}
    problems = problems_of(inspect(Mounts=[plain]))
    assert [p.split(":")[0] for p in problems] == ["run_volume"]
    elsewhere = problems_of(inspect(Mounts=[run_mount(device="/var/lib/docker/x")]))
    assert [p.split(":")[0] for p in elsewhere] == ["run_volume"]


def test_a_device_that_is_not_the_attempts_filesystem_is_a_mismatch(tmp_path: Path) -> None:
    """A bare directory (the mount dropped, or in another namespace) or a bigger image."""
    bare = describe(tmp_path)
    assert bare["mounted"] is False
    assert [p.split(":")[0] for p in problems_of(inspect(), bare)] == ["run_fs"]
    bigger = {**RUN_FS, "device_bytes": RUN_FS["device_bytes"] * 2}
    assert [p.split(":")[0] for p in problems_of(inspect(), bigger)] == ["run_fs"]
    executable = {**RUN_FS, "noexec": False}
    assert [p.split(":")[0] for p in problems_of(inspect(), executable)] == ["run_fs"]


def test_any_mount_besides_run_and_tmp_is_a_mismatch() -> None:
    """An image VOLUME (an anonymous volume the engine adds) or a bind shows up in the
    container's top-level mounts even when the create call did not ask for it."""
    mounts = [{"Type": "volume", "Destination": "/run"},
              {"Type": "volume", "Destination": "/data"}]
    problems = problems_of(inspect(mounts=mounts))
    assert [p.split(":")[0] for p in problems] == ["container_mounts"]
    assert "/data" in problems[0]


def test_each_difference_is_named() -> None:
    problems = problems_of(inspect(Privileged=True, CapAdd=["SYS_ADMIN"], PidsLimit=None,
                                   MemorySwap=-1, NetworkMode="bridge"))
    assert [p.split(":")[0] for p in problems] == [
        "memory_swap_bytes", "pids_limit", "network_mode", "privileged", "cap_add"]
    assert "asked 16, engine reports None" in problems[1]


def test_another_image_than_the_verified_one_is_a_mismatch() -> None:
    expected = expected_settings(SPEC, CONFIG, "sha256:" + "c" * 64)
    assert mismatches(expected, applied_settings(inspect(), RUN_FS))[0].startswith("image_id:")


def test_cpu_limits_compare_in_the_engines_unit() -> None:
    """4.1 * 1e9 truncates to 4099999999; rounding both sides keeps 4.1 a match."""
    from dataclasses import replace

    from runner.sandbox import nano_cpus

    for cpus in (0.1, 0.3, 2.01, 4.1, 8.2, 1.001, 63.99):
        spec = replace(SPEC, cpus=cpus)
        expected = expected_settings(spec, CONFIG, "sha256:" + "b" * 64)
        applied = applied_settings(inspect(NanoCpus=nano_cpus(cpus)), RUN_FS)
        assert mismatches(expected, applied) == [], cpus


def test_the_create_call_asks_for_the_rounded_cpu_limit() -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    import docker

    from runner.sandbox import Sandbox

    offline = SimpleNamespace(api=docker.APIClient(base_url="unix:///nonexistent.sock",
                                                   version="1.41"))
    sandbox = Sandbox(offline, CONFIG)  # type: ignore[arg-type]
    assert sandbox._host_config(replace(SPEC, cpus=4.1))["NanoCpus"] == 4_100_000_000


def test_the_run_filesystem_asked_for_follows_the_manifests_output_bytes() -> None:
    """The receipt's expected device size is the image for this bound and this input:
    an image made for another bound (or an older manifest's) is a mismatch."""
    from dataclasses import replace

    small, big = (expected_settings(replace(SPEC, output_bytes=size), CONFIG, "x")["run_fs"]
                  for size in (8 << 20, 64 << 20))
    assert small["device_bytes"] == image_bytes(8 << 20, 2)
    assert big["device_bytes"] - small["device_bytes"] >= 56 << 20
    # The bound plus a stated slack: the input, 256 bytes an inode and about 1 MiB.
    assert 0 < small["device_bytes"] - (8 << 20) < 2 << 20
