"""The provenance receipt: what a container was asked to be, and what the engine says
it applied, compared setting by setting before the container may start.

`expected_settings` is computed from the spec and the platform's config, not from the
create call, so a create path that drops a setting cannot also hide it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from runner.sandbox.spec import CONTAINER_TMP, RUN_DIR, ContainerSpec, SandboxConfig


def nano_cpus(cpus: float) -> int:
    """The engine's unit for a CPU limit (rounded, never truncated: 4.1 stays 4.1)."""
    return round(cpus * 1e9)


def tmpfs_options(config: SandboxConfig) -> str:
    return f"rw,noexec,nosuid,nodev,size={config.tmp_size_bytes}"


def expected_settings(spec: ContainerSpec, config: SandboxConfig,
                      image_id: str) -> dict[str, Any]:
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
    }


def applied_settings(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What the engine reports it applied to a created container (`inspect`)."""
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
    }


def mismatches(expected: Mapping[str, Any], applied: Mapping[str, Any]) -> list[str]:
    """Each setting the engine reports differently from what was asked, as a line."""
    return [f"{key}: asked {value!r}, engine reports {applied.get(key)!r}"
            for key, value in expected.items() if applied.get(key) != value]


def receipt(spec: ContainerSpec, config: SandboxConfig, image_id: str,
            attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The receipt of a created container: pinned reference, image id, applied settings
    and every mismatch (an empty list lets it start)."""
    applied = applied_settings(attrs)
    return {"pinned": spec.image, "image_id": applied["image_id"], "applied": applied,
            "mismatches": mismatches(expected_settings(spec, config, image_id), applied),
            "verified_at": datetime.now(UTC).isoformat()}
