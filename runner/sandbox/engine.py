"""`Sandbox`: create, verify, start, wait for and always remove one processor container.

Docker only: this module knows nothing of the API, the database or the queue. A
processor's failure (non-zero exit, OOM, timeout, bad result file) is returned as
data in `Outcome`; only failures of the platform raise (`SandboxError` children).
The container's settings are read back from the engine and compared with what was
asked (`provenance`) before it may start.

Each attempt's /run is a filesystem of its own, made on this host before the create
and removed after the container (`runfs`): the processor's writes under /run/out stop
at the manifest's `output_bytes` with ENOSPC. Without it no processor runs. The input
files go into /run/in before the start; after an exit of its own (any code), what the
processor left under /run/out goes to the caller's `ArtifactSink` (`artifacts`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions
import structlog
from docker.types import DriverConfig, LogConfig, Mount

from runner.errors import DockerUnavailableError, SandboxError, SandboxMismatchError
from runner.observability.telemetry import NullStages, StageObserver
from runner.sandbox import hostcheck, provenance, runfs, volumes
from runner.sandbox.images import Images
from runner.sandbox.logpump import LogPump
from runner.sandbox.remover import Remover
from runner.sandbox.runfs import RunFilesystems, RunFs
from runner.sandbox.spec import (
    CONTAINER_TMP,
    INSTANCE_LABEL,
    MANAGED_LABEL,
    RUN_DIR,
    ArtifactSink,
    CollectedArtifacts,
    CollectedResult,
    ContainerSpec,
    LogSink,
    Outcome,
    ResultStatus,
    SandboxConfig,
)
from runner.sandbox.transfer import ArchiveTransfer, Transfer, TransferChooser
from runner.sandbox.translate import cause_is, docker_errors, is_conflict

log = structlog.get_logger(__name__)


@dataclass
class _Exit:
    timed_out: bool
    exit_code: int | None
    oom_killed: bool
    duration: float


class Sandbox:
    """Creates, runs, and always removes processor containers."""

    def __init__(self, client: docker.DockerClient, config: SandboxConfig) -> None:
        self.client = client
        self.api: docker.APIClient = client.api
        self.config = config
        if config.uid_gid[0] == 0:
            raise SandboxError("refusing to run processors as root (container_user uid 0)")
        self.images = Images(self.api, allow_image_ids=config.allow_image_ids)
        self.transfers = TransferChooser(self.api, config)
        self.run_fs = RunFilesystems(config.run_fs_root, config.instance)
        self._bound_problem: str | None = None  # "" once known to be fine
        self._engine_sees_run_fs = False  # proven on the first container
        self._remover = Remover() if config.remove_in_background else None
        self._makers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="runfs")
        if self.api.base_url.startswith("http+docker:"):
            # A local socket: no proxy or .netrc can apply, and requests would look
            # them up in the environment on every call (about 2 ms of CPU per run).
            self.api.trust_env = False

    @classmethod
    def from_env(cls, config: SandboxConfig, *, timeout: float = 60) -> Sandbox:
        """A sandbox on the engine named by DOCKER_HOST (or the local socket).

        Raises:
            DockerUnavailableError: the engine does not answer.
        """
        try:
            client = docker.from_env(timeout=int(timeout))
        except docker.errors.DockerException as exc:
            raise DockerUnavailableError(f"Docker engine unreachable: {exc}",
                                         stage="connect") from exc
        return cls(client, config)

    def check_engine(self) -> None:
        """Refuse to work on an engine that cannot enforce the limits every container
        gets: each run there would only end as sandbox_mismatch.

        Raises:
            SandboxError: the engine lacks swap or pids limits (named, with the fix), or
                this process cannot make the /run filesystems (`bound_problem`).
        """
        with docker_errors("info"):
            info = self.api.info()
        hostcheck.refuse_unenforceable(info)
        problem = self.bound_problem(info)
        if problem and self.config.require_run_bound:
            raise SandboxError(f"refusing to run processors without their output_bytes bound "
                               f"on /run: {problem} (RUNNER_RUN_OUTPUT_BOUND=off runs them "
                               f"unbounded instead; see docs/operators.md)")
        if problem:
            log.warning("run_output_unbounded", reason=problem,
                        setting="RUNNER_RUN_OUTPUT_BOUND=off")

    def bound_problem(self, info: dict[str, Any] | None = None) -> str:
        """Why this process cannot give processors their bounded /run ("" when it can;
        decided once). The filesystem is made by this process on the engine's host, so
        the engine must be local, see this process's mounts and use its user ids.

        Raises:
            DockerUnavailableError: the engine does not answer (nothing is decided).
        """
        if self._bound_problem is None:
            problem = hostcheck.bound_problem(self.api, info)
            self._bound_problem = problem or ""
        return self._bound_problem

    def ping(self) -> None:
        with docker_errors("ping"):
            self.api.ping()

    def ensure_image(self, ref: str) -> str:
        """The local id of a pinned image, pulled by digest if missing (`Images.ensure`)."""
        return self.images.ensure(ref)[0]

    def prefetch(self, refs: list[str]) -> dict[str, str]:
        """Pull each pinned image ahead of its first run; ref -> problem."""
        return self.images.prefetch(refs)

    # The run ----------------------------------------------------------------------

    def run(self, spec: ContainerSpec, *, on_log: LogSink,
            on_start: Callable[[str, str], None] | None = None,
            stages: StageObserver | None = None,
            on_receipt: Callable[[dict[str, Any]], None] | None = None,
            artifacts: ArtifactSink | None = None) -> Outcome:
        """Run the container to its end and remove it, whatever happens.

        `stages` is told about each stage (pull, create, start, wait, collect,
        remove) so the caller can time, trace and log them. `on_receipt` gets the
        provenance receipt (what was asked, what the engine applied) before the start;
        a container whose settings do not match is removed and never started.
        `artifacts` gets the files under /run/out after an exit of the container's own
        (not after a timeout); without it nothing there is read but result.json.

        Raises:
            SandboxError: the platform failed (the container is still removed).
            RunnerError: the sink failed (after it was told to discard).
        """
        observer: StageObserver = stages or NullStages()
        problem = self.bound_problem()
        if problem and self.config.require_run_bound:
            raise SandboxError(f"refusing to run a processor without its output_bytes bound "
                               f"on /run: {problem}", stage="run filesystem")
        fs, container_id, image_id = self._pull_and_create(spec, observer)
        finished = False
        try:
            with observer.stage("start", input_bytes=len(spec.input_json),
                                input_files=len(spec.files)):
                transfer = self._verify_and_deliver(container_id, spec, image_id, fs,
                                                    on_receipt)
                with docker_errors("start"):
                    self.api.start(container_id)
            started = time.monotonic()
            if on_start is not None:
                on_start(container_id, image_id)
            pump = LogPump(self.api, container_id, spec.log_cap_bytes, on_log)
            pump.start()
            with observer.stage("wait", timeout_s=spec.timeout_seconds) as info:
                ended = self._wait_or_stop(container_id, spec, started)
                info["timed_out"] = ended.timed_out
            with observer.stage("collect") as info:
                result, kept = self._collect(container_id, spec, transfer, pump, ended,
                                             artifacts)
                info.update(exit_code=ended.exit_code if ended.exit_code is not None else -1,
                            oom_killed=ended.oom_killed, log_bytes=pump.bytes,
                            log_truncated=pump.truncated, result=result.status.value,
                            artifacts=kept.status.value, artifact_count=len(kept.items),
                            artifact_bytes=sum(item.size for item in kept.items))
            finished = True
            return Outcome(
                container_id=container_id, image_id=image_id, exit_code=ended.exit_code,
                oom_killed=ended.oom_killed, timed_out=ended.timed_out,
                duration_seconds=ended.duration, log_bytes=pump.bytes,
                log_truncated=pump.truncated, result=result, log_bytes_dropped=pump.dropped,
                artifacts=kept)
        finally:
            self._dispose(container_id, fs, observer, later=finished)

    @property
    def bounded(self) -> bool:
        """Whether /run gets its bounded filesystem: False only once `bound_problem`
        found that it cannot be made here (then RUNNER_RUN_OUTPUT_BOUND=off lets a run
        go on without it); undecided counts as bounded, the strict case."""
        return not self._bound_problem

    def _pull_and_create(self, spec: ContainerSpec, observer: StageObserver
                         ) -> tuple[RunFs | None, str, str]:
        with observer.stage("pull", image=spec.image) as info:
            image_id, pulled = self.images.ensure(spec.image)
            info["cached"] = not pulled
        with observer.stage("create", container_name=spec.name) as info:
            # The /run filesystem is made beside the create call, not before it: the
            # engine mounts the volume bound to it only at the first archive call or at
            # the start, both after this stage, and the receipt checks what it mounted.
            making = (self._makers.submit(self.run_fs.create, spec.name,
                                          output_bytes=spec.output_bytes,
                                          input_bytes=provenance.input_bytes(spec))
                      if self.bounded else None)
            try:
                try:
                    container_id = self._create(spec, image_id)
                except SandboxError as exc:
                    if not cause_is(exc, docker.errors.ImageNotFound):
                        raise
                    # The image went away since it was verified: check (and pull) again.
                    self.images.forget(spec.image)
                    image_id, _ = self.images.ensure(spec.image)
                    container_id = self._create(spec, image_id)
            except BaseException:
                self._abandon(making)
                raise
            try:
                fs = making.result() if making is not None else None
            except BaseException:
                self._abandon(making)
                with contextlib.suppress(SandboxError):  # else the reconciler's sweep
                    self.remove(container_id)
                raise
            info["container_id"] = container_id[:12]
        return fs, container_id, image_id

    def _abandon(self, making: Future[RunFs] | None) -> None:
        """Release a /run filesystem still being made once it is made (now, if it is)."""
        if making is not None:
            making.add_done_callback(
                lambda done: self._release(done.result()) if not done.cancelled()
                and done.exception() is None else None)

    def _verify_and_deliver(self, container_id: str, spec: ContainerSpec, image_id: str,
                            fs: RunFs | None,
                            on_receipt: Callable[[dict[str, Any]], None] | None) -> Transfer:
        """Read the created container back, refuse it on any mismatch, deliver input,
        then seal /run at the output bound."""
        with docker_errors("inspect"):
            attrs = self.api.inspect_container(container_id)
        receipt = provenance.receipt(spec, self.config, image_id, attrs,
                                     runfs.describe(fs.path) if fs is not None else None,
                                     bounded=fs is not None)
        if on_receipt is not None:
            on_receipt(receipt)
        if receipt["mismatches"]:
            raise SandboxMismatchError("the engine did not apply what was asked: "
                                       + "; ".join(receipt["mismatches"]), stage="create")
        if fs is None:  # unbounded (RUNNER_RUN_OUTPUT_BOUND=off): the engine's archive API
            transfer: Transfer = ArchiveTransfer(self.api, container_id, self.config)
            transfer.deliver(spec.input_json, spec.files)
            return transfer
        if not self._engine_sees_run_fs:  # proven once per process
            hostcheck.refuse_unseen_run_fs(self.api, container_id, fs.path)
            self._engine_sees_run_fs = True
        transfer = self.transfers.for_container(container_id, fs.path)
        transfer.deliver(spec.input_json, spec.files)
        self.run_fs.seal(fs)
        return transfer

    def _wait_or_stop(self, container_id: str, spec: ContainerSpec, started: float) -> _Exit:
        exited = self._wait(container_id, started + spec.timeout_seconds)
        if not exited:
            log.info("container_timeout", container_name=spec.name,
                     timeout_s=spec.timeout_seconds)
            with docker_errors("stop"):
                # SIGTERM, then SIGKILL after the grace period, done by the engine.
                self.api.stop(container_id, timeout=math.ceil(self.config.stop_grace_seconds))
            self._wait(container_id, time.monotonic() + self.config.stop_grace_seconds + 30)
        duration = time.monotonic() - started
        with docker_errors("inspect"):
            state = self.api.inspect_container(container_id)["State"]
        return _Exit(timed_out=not exited, exit_code=state.get("ExitCode"),
                     oom_killed=bool(state.get("OOMKilled")), duration=duration)

    def _collect(self, container_id: str, spec: ContainerSpec, transfer: Transfer,
                 pump: LogPump, ended: _Exit, sink: ArtifactSink | None
                 ) -> tuple[CollectedResult, CollectedArtifacts]:
        """The result after a clean exit; the artifacts after any exit of its own."""
        pump.join(timeout=10)
        if pump.error is not None:
            log.warning("log_capture_failed", container_id=container_id[:12],
                        error=str(pump.error))
        result = (transfer.collect() if ended.exit_code == 0 and not ended.timed_out
                  else CollectedResult(ResultStatus.ABSENT))
        kept = (transfer.collect_artifacts(sink, max_bytes=spec.output_bytes)
                if sink is not None and not ended.timed_out else CollectedArtifacts())
        return result, kept

    def _dispose(self, container_id: str, fs: RunFs | None, observer: StageObserver, *,
                 later: bool) -> None:
        def remove() -> None:
            try:
                with observer.stage("remove"):
                    try:
                        self.remove(container_id)
                    finally:
                        self._release(fs)
            except SandboxError as exc:
                log.error("container_remove_failed", container_id=container_id,
                          error=str(exc))

        if later and self._remover is not None:
            # Same context (trace, run_id) in the remover thread. A container that
            # exited normally is only removed later; on any error, or at shutdown,
            # it is removed now, before `run` returns.
            self._remover.submit(functools.partial(contextvars.copy_context().run, remove))
        else:
            remove()

    def _release(self, fs: RunFs | None) -> None:
        """Unmount and delete a /run filesystem; a failure is logged (the reconciler's
        sweep takes what is left)."""
        if fs is None:
            return
        try:
            self.run_fs.release(fs)
        except SandboxError as exc:
            log.error("run_fs_release_failed", path=str(fs.path), error=exc.message)

    # Engine calls -------------------------------------------------------------------

    def _labels(self, spec: ContainerSpec) -> dict[str, str]:
        return {MANAGED_LABEL: "true", INSTANCE_LABEL: self.config.instance, **spec.labels}

    def _host_config(self, spec: ContainerSpec) -> dict[str, Any]:
        log_max = max(spec.log_cap_bytes * 2, 1024 * 1024)
        host_config: dict[str, Any] = self.api.create_host_config(
            nano_cpus=provenance.nano_cpus(spec.cpus),
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            pids_limit=spec.pids_limit,
            network_mode="none",
            read_only=True,
            tmpfs={CONTAINER_TMP: provenance.tmpfs_options(self.config)},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=True,
            # /run: this attempt's bounded filesystem (runfs), as a volume of its own
            # (a plain volume only under RUNNER_RUN_OUTPUT_BOUND=off).
            mounts=[Mount(target=RUN_DIR, source=None, type="volume", no_copy=True,
                          labels=self._labels(spec),
                          driver_config=DriverConfig("local", runfs.run_volume_options(
                              self.run_fs.path(spec.name))) if self.bounded else None)],
            log_config=LogConfig(type="json-file",
                                 config={"max-size": str(log_max), "max-file": "2"}),
        )
        return host_config

    def _create(self, spec: ContainerSpec, image_id: str) -> str:
        for _ in range(2):
            try:
                with docker_errors("create"):
                    created = self.api.create_container(
                        image=image_id, name=spec.name, user=self.config.user,
                        environment=dict(spec.environment), labels=self._labels(spec),
                        host_config=self._host_config(spec), working_dir=CONTAINER_TMP,
                        network_disabled=True,
                    )
                container_id: str = created["Id"]
                return container_id
            except SandboxError as exc:
                if not is_conflict(exc):
                    raise
                # Deterministic names make a leftover of this same attempt a 409: it is
                # ours, from a crashed try, so replace it.
                log.warning("container_name_taken", name=spec.name)
                self.remove(spec.name)
        raise SandboxError(f"container name {spec.name} stays taken")

    def _wait(self, container_id: str, deadline: float) -> bool:
        """Wait for exit until `deadline`; True if the container exited in time."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                with docker_errors("wait"):
                    self.api.wait(container_id, timeout=max(remaining, 0.05))
                return True
            except DockerUnavailableError as exc:
                # A read timeout on the wait call arrives as a ConnectionError; tell it
                # apart from a dead engine by asking the engine.
                if not cause_is(exc, requests.exceptions.ConnectionError):
                    raise
                with docker_errors("inspect"):
                    state = self.api.inspect_container(container_id)["State"]
                if not state.get("Running"):
                    return True
            except requests.exceptions.ReadTimeout:
                continue

    def drain(self, timeout: float = 30) -> bool:
        """Wait for background removals (at worker shutdown); False if some are left."""
        return self._remover.drain(timeout) if self._remover is not None else True

    def stop(self, container_id: str) -> None:
        """SIGTERM now, SIGKILL after the grace period (cancel, drain, lost lease)."""
        try:
            with docker_errors("stop"):
                self.api.stop(container_id, timeout=math.ceil(self.config.stop_grace_seconds))
        except SandboxError as exc:
            if not cause_is(exc, docker.errors.NotFound):
                raise

    def remove(self, container_id: str) -> None:
        """Kill and remove a container and its /run volume; a missing one is fine."""
        try:
            with docker_errors("remove"):
                self.api.remove_container(container_id, v=True, force=True)
        except SandboxError as exc:
            if cause_is(exc, docker.errors.NotFound):
                return
            # Another remover (the reconciler's sweep, say) got there first.
            if is_conflict(exc, containing="in progress"):
                return
            raise

    def managed_volumes(self) -> list[dict[str, Any]]:
        """This deployment's /run volumes and run filesystems (`volumes.managed`)."""
        return volumes.managed(self.api, self.config.instance, self.run_fs,
                               self.managed_containers())

    def remove_volume(self, name: str) -> None:
        """Remove one of `managed_volumes` by name; a missing one is fine."""
        volumes.remove(self.api, self.run_fs, name)

    def managed_containers(self, **label_filters: str) -> list[dict[str, Any]]:
        """Containers this deployment created (by label), optionally narrowed further."""
        labels = [MANAGED_LABEL, f"{INSTANCE_LABEL}={self.config.instance}"]
        labels += [f"{k}={v}" for k, v in label_filters.items()]
        with docker_errors("list"):
            found: list[dict[str, Any]] = self.api.containers(all=True,
                                                              filters={"label": labels})
        return found

