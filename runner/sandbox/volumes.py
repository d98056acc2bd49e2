"""The /run volumes and run filesystems a deployment leaves: listed and removed for the
reconciler's sweep (a container removed without its volumes, a worker that died
between a run's end and their removal)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import docker
import docker.errors

from runner.errors import SandboxError
from runner.sandbox.runfs import RunFilesystems
from runner.sandbox.spec import INSTANCE_LABEL, MANAGED_LABEL
from runner.sandbox.translate import cause_is, docker_errors


def managed(api: docker.APIClient, instance: str, run_fs: RunFilesystems,
        containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This deployment's /run volumes: Docker volumes with its labels (the engine's
    side, left by a container removed without its volumes) and run filesystems on
    this host (runfs). Each {"Name", "Kind" ("volume" or "run_fs"), "Created" (epoch
    seconds), "InUse"}: a volume a container refers to, a filesystem a process holds
    or whose container still exists, is in use."""
    labels = [MANAGED_LABEL, f"{INSTANCE_LABEL}={instance}"]
    with docker_errors("list volumes"):
        every = api.volumes(filters={"label": labels}).get("Volumes") or []
        dangling = {v["Name"] for v in api.volumes(
            filters={"label": labels, "dangling": True}).get("Volumes") or []}
    found: list[dict[str, Any]] = []
    for volume in every:
        created = volume.get("CreatedAt") or ""
        try:
            when = datetime.fromisoformat(created).timestamp()
        except ValueError:
            when = time.time()  # unknown: young, so a sweep waits for it
        found.append({"Name": volume["Name"], "Kind": "volume", "Created": when,
                      "InUse": volume["Name"] not in dangling})
    names = run_fs.names()
    if names:
        named = {name.lstrip("/") for c in containers for name in c.get("Names") or []}
        free = {entry["Name"]: entry for entry in run_fs.leftovers()}
        for name in names:
            entry = free.get(name)
            found.append({"Name": name, "Kind": "run_fs",
                          "Created": entry["Created"] if entry else time.time(),
                          "InUse": entry is None or name in named})
    return found

def remove(api: docker.APIClient, run_fs: RunFilesystems, name: str) -> None:
    """Remove one of `managed_volumes` by name (a run filesystem is unmounted and
    deleted); a missing one is fine."""
    if name in run_fs.names():
        run_fs.release(name)
        return
    try:
        with docker_errors("remove volume"):
            api.remove_volume(name)
    except SandboxError as exc:
        if not cause_is(exc, docker.errors.NotFound):
            raise
