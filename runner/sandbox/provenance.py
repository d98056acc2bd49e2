"""The provenance receipt: what a container was asked to be, and what the engine says
it applied, compared setting by setting before the container may start.

`expected_settings` is computed from the spec and the platform's config, not from the
create call, so a create path that drops a setting cannot also hide it.

Besides what `inspect` reports, the receipt holds what this host sees of the /run
volume's device (`runfs.describe`): a mounted ext4 of the expected size, `noexec`,
`nosuid`, `nodev`. A create path that drops the output bound (a plain volume, another
device, a bigger image) or adds a mount (an image `VOLUME`, a bind) is a mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.sandbox import runfs
from runner.sandbox.spec import CONTAINER_TMP, RUN_DIR, ContainerSpec, SandboxConfig


def nano_cpus(cpus: float) -> int:
    """The engine's unit for a CPU limit (rounded, never truncated: 4.1 stays 4.1)."""
    return round(cpus * 1e9)


def tmpfs_options(config: SandboxConfig) -> str:
    """The /tmp tmpfs: bounded in bytes and inodes, not executable, the processor's
    user's only."""
    uid, gid = config.uid_gid
    return (f"rw,noexec,nosuid,nodev,size={config.tmp_size_bytes},"
            f"nr_inodes={config.tmp_inodes},uid={uid},gid={gid},mode=0700")


def run_fs_path(spec: ContainerSpec, config: SandboxConfig) -> Path:
    """The /run volume's device: this attempt's filesystem on the worker's host."""
    return runfs.RunFilesystems(config.run_fs_root, config.instance).path(spec.name)


def input_bytes(spec: ContainerSpec) -> int:
    """What the spec's input takes of its /run filesystem (`runfs.input_footprint`):
    the one figure both the image's size and the receipt's expectation come from."""
    return runfs.input_footprint(len(spec.input_json), ((f.name, f.size) for f in spec.files))


def expected_settings(spec: ContainerSpec, config: SandboxConfig,
                      image_id: str, *, bounded: bool = True) -> dict[str, Any]:
    """What the manifest and the platform ask of a container, in the shape of
    `applied_settings`."""
    return {
        "image_id": image_id, "user": config.user, "cpus": nano_cpus(spec.cpus) / 1e9,
        "memory_bytes": spec.memory_bytes, "memory_swap_bytes": spec.memory_bytes,
        "pids_limit": spec.pids_limit, "network_mode": "none", "network_disabled": True,
        "read_only_rootfs": True, "privileged": False, "cap_drop": ["ALL"], "cap_add": [],
        "security_opt": ["no-new-privileges"], "init": True,
        "tmpfs": {CONTAINER_TMP: tmpfs_options(config)},
        "mounts": [{"type": "volume", "target": RUN_DIR}], "binds": [], "devices": [],
        "pid_mode": "", "log_driver": "json-file",
        # Every mount the engine will make (image VOLUMEs included), besides the tmpfs.
        "container_mounts": [{"type": "volume", "destination": RUN_DIR}],
        # Unbounded only under RUNNER_RUN_OUTPUT_BOUND=off: then a plain volume.
        "run_volume": ({"driver": "local",
                        "options": runfs.run_volume_options(run_fs_path(spec, config))}
                       if bounded else {"driver": None, "options": {}}),
        "run_fs": (runfs.expected_description(spec.output_bytes, input_bytes(spec))
                   if bounded else {}),
    }


def _run_volume(host: Mapping[str, Any]) -> dict[str, Any]:
    for mount in host.get("Mounts") or []:
        if mount.get("Target") == RUN_DIR:
            driver = (mount.get("VolumeOptions") or {}).get("DriverConfig") or {}
            return {"driver": driver.get("Name"), "options": dict(driver.get("Options") or {})}
    return {"driver": None, "options": {}}


def applied_settings(attrs: Mapping[str, Any],
                     run_fs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the engine reports it applied to a created container (`inspect`), and what
    this host sees at the /run volume's device (`run_fs`, from `runfs.describe`)."""
    host, config = attrs.get("HostConfig") or {}, attrs.get("Config") or {}
    return {
        "image_id": attrs.get("Image"), "user": config.get("User"),
        "cpus": (host.get("NanoCpus") or 0) / 1e9,
        "memory_bytes": host.get("Memory"), "memory_swap_bytes": host.get("MemorySwap"),
        "pids_limit": host.get("PidsLimit"), "network_mode": host.get("NetworkMode"),
        "network_disabled": bool(config.get("NetworkDisabled")),
        "read_only_rootfs": bool(host.get("ReadonlyRootfs")),
        "privileged": bool(host.get("Privileged")),
        "cap_drop": list(host.get("CapDrop") or []), "cap_add": list(host.get("CapAdd") or []),
        "security_opt": list(host.get("SecurityOpt") or []), "init": bool(host.get("Init")),
        "tmpfs": dict(host.get("Tmpfs") or {}),
        "mounts": [{"type": m.get("Type"), "target": m.get("Target")}
                   for m in host.get("Mounts") or []],
        "binds": list(host.get("Binds") or []), "devices": list(host.get("Devices") or []),
        "pid_mode": host.get("PidMode") or "",
        "log_driver": (host.get("LogConfig") or {}).get("Type"),
        "container_mounts": sorted(
            ({"type": m.get("Type"), "destination": m.get("Destination")}
             for m in attrs.get("Mounts") or []), key=lambda m: str(m["destination"])),
        "run_volume": _run_volume(host),
        "run_fs": dict(run_fs or {}),
    }


def mismatches(expected: Mapping[str, Any], applied: Mapping[str, Any]) -> list[str]:
    """Each setting the engine reports differently from what was asked, as a line."""
    return [f"{key}: asked {value!r}, engine reports {applied.get(key)!r}"
            for key, value in expected.items() if applied.get(key) != value]


def receipt(spec: ContainerSpec, config: SandboxConfig, image_id: str,
            attrs: Mapping[str, Any], run_fs: Mapping[str, Any] | None = None, *,
            bounded: bool = True) -> dict[str, Any]:
    """The receipt of a created container: pinned reference, image id, applied settings
    and every mismatch (an empty list lets it start)."""
    applied = applied_settings(attrs, run_fs)
    return {"pinned": spec.image, "image_id": applied["image_id"], "applied": applied,
            "mismatches": mismatches(expected_settings(spec, config, image_id,
                                                       bounded=bounded), applied),
            "verified_at": datetime.now(UTC).isoformat()}
