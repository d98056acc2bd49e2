"""What this engine and this host can enforce, checked before any processor runs.

`refuse_unenforceable`: an engine without swap, pids or memory limits would only give
runs that end as sandbox_mismatch. `bound_problem`: why this process cannot make the
bounded /run filesystems (runfs) that the engine would see, or None.
`refuse_unseen_run_fs`: the engine's /run is the filesystem this process mounted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
import docker.errors

from runner.errors import SandboxError, SandboxMismatchError
from runner.sandbox.runfs import UNMOUNTED_MARKER, RunFilesystems
from runner.sandbox.spec import RUN_DIR
from runner.sandbox.translate import docker_errors


def refuse_unenforceable(info: dict[str, Any]) -> None:
    """Raises: SandboxError naming each limit the engine cannot enforce, with the fix."""
    missing = [what for key, what in (
        ("SwapLimit", "swap limits (cgroup v1: boot the kernel with swapaccount=1)"),
        ("PidsLimit", "pids limits (the pids cgroup controller)"),
        ("MemoryLimit", "memory limits")) if info.get(key) is False]
    if missing:
        raise SandboxError("the Docker engine cannot enforce " + "; ".join(missing)
                           + ": processors would run without them, so no run starts")


def bound_problem(api: docker.APIClient, info: dict[str, Any] | None = None) -> str | None:
    """The filesystem is made by this process on the engine's host, so the engine must
    be local, see this process's mounts and use its user ids.

    Raises:
        DockerUnavailableError: the engine does not answer.
    """
    problem = RunFilesystems.problem()
    if problem is None and not api.base_url.startswith("http+docker:"):
        problem = (f"the engine at {api.base_url} is not on this host, where the "
                   f"filesystem is made")
    if problem is None:
        if info is None:
            with docker_errors("info"):
                info = api.info()
        options = " ".join(info.get("SecurityOptions") or [])
        if "userns" in options or "rootless" in options:
            problem = ("the engine remaps user ids (userns-remap or rootless), so it would "
                       "not see this worker's mounts under their owners")
    return problem


def refuse_unseen_run_fs(api: docker.APIClient, container_id: str, path: Path) -> None:
    """The engine's /run is this process's mounted filesystem, not the bare directory
    under it (an engine in another mount namespace would give the processor an
    unbounded directory).

    Raises:
        SandboxMismatchError: the engine sees the bare directory (stage "create").
    """
    with docker_errors("inspect run filesystem"):
        try:
            stream, _ = api.get_archive(container_id, f"{RUN_DIR}/{UNMOUNTED_MARKER}")
        except docker.errors.NotFound:
            return
        getattr(stream, "close", lambda: None)()
    raise SandboxMismatchError(
        f"the engine does not see the filesystem this worker mounted at {path} "
        f"(another mount namespace?): processors would write to the host's disk "
        f"unbounded", stage="create")
