"""The provenance comparison: every setting the engine reports differently is named."""

from runner.sandbox import (
    ContainerSpec,
    SandboxConfig,
    applied_settings,
    expected_settings,
    mismatches,
)

SPEC = ContainerSpec(name="n", image="r@sha256:" + "a" * 64, cpus=0.5, memory_bytes=64 << 20,
                     pids_limit=16, timeout_seconds=5, log_cap_bytes=1 << 20, input_json=b"{}")
CONFIG = SandboxConfig(tmp_size_bytes=8 << 20)


def inspect(**host_changes: object) -> dict[str, object]:
    host = {"NanoCpus": 500_000_000, "Memory": 64 << 20, "MemorySwap": 64 << 20,
            "PidsLimit": 16, "NetworkMode": "none", "ReadonlyRootfs": True,
            "Privileged": False, "CapDrop": ["ALL"], "CapAdd": None,
            "SecurityOpt": ["no-new-privileges"], "Init": True,
            "Tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={8 << 20}"},
            "Mounts": [{"Type": "volume", "Target": "/run"}], "Binds": None, "Devices": None,
            "PidMode": "", "LogConfig": {"Type": "json-file", "Config": {}}}
    host.update(host_changes)
    return {"Image": "sha256:" + "b" * 64, "HostConfig": host,
            "Config": {"User": "65532:65532", "NetworkDisabled": True}}


def test_what_docker_reports_for_a_faithful_create_matches() -> None:
    expected = expected_settings(SPEC, CONFIG, "sha256:" + "b" * 64)
    assert mismatches(expected, applied_settings(inspect())) == []


def test_each_difference_is_named() -> None:
    expected = expected_settings(SPEC, CONFIG, "sha256:" + "b" * 64)
    applied = applied_settings(inspect(Privileged=True, CapAdd=["SYS_ADMIN"], PidsLimit=None,
                                       MemorySwap=-1, NetworkMode="bridge"))
    problems = mismatches(expected, applied)
    assert [p.split(":")[0] for p in problems] == [
        "memory_swap_bytes", "pids_limit", "network_mode", "privileged", "cap_add"]
    assert "asked 16, engine reports None" in problems[1]


def test_another_image_than_the_verified_one_is_a_mismatch() -> None:
    expected = expected_settings(SPEC, CONFIG, "sha256:" + "c" * 64)
    assert mismatches(expected, applied_settings(inspect()))[0].startswith("image_id:")


def test_cpu_limits_compare_in_the_engines_unit() -> None:
    """4.1 * 1e9 truncates to 4099999999; rounding both sides keeps 4.1 a match."""
    from dataclasses import replace

    from runner.sandbox import nano_cpus

    for cpus in (0.1, 0.3, 2.01, 4.1, 8.2, 1.001, 63.99):
        spec = replace(SPEC, cpus=cpus)
        expected = expected_settings(spec, CONFIG, "sha256:" + "b" * 64)
        applied = applied_settings(inspect(NanoCpus=nano_cpus(cpus)))
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
