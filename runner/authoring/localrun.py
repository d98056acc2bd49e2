"""`runner processor run DIR`: one run of a processor on this machine, as production runs it.

The image is built from the directory (`publish.build`) and started once through the
production `Sandbox`: the same container settings (non-root user, read-only root, no
network, no capabilities, tmpfs `/tmp`, pids/memory/cpu limits), the same input and
result paths, log cap, timeout and stop grace, and the outcome is classified by the
executor's own `classify`. Nothing touches the API, Redis or the database.

The limits are the processor's `processor.yaml` ones over the manifest format's
defaults, or, with `manifest=`, exactly those of the operator's manifest entry.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker.errors

from runner.authoring.publish import ProcessorDir, build, entry_settings
from runner.control.retry import decide
from runner.control.runs import check_input
from runner.domain import Finish, RunStatus
from runner.errors import (
    InvalidRequestError,
    UnknownProcessorError,
)
from runner.execution.classify import classify
from runner.execution.wiring import sandbox_config
from runner.manifest import Limits, Processor, RetryPolicy, load_manifest
from runner.manifest.diff import seconds_text, size_text
from runner.sandbox import (
    Outcome,
    Sandbox,
    SandboxConfig,
    spec_for,
)
from runner.settings import Settings

# Containers of local runs carry their own instance name, so no deployment's
# reconciler ever mistakes one for a leftover of its own and removes it mid-run.
LOCAL_INSTANCE = "local-run"
LOCAL_LABEL = "io.container-runner.local-run"


def local_config(settings: Settings) -> SandboxConfig:
    """The workers' sandbox settings (user, /tmp size, stop grace, result cap)."""
    return replace(sandbox_config(settings), instance=LOCAL_INSTANCE, allow_image_ids=True)


def processor_settings(proc: ProcessorDir, *, registry: str,
                       manifest: Path | None = None) -> Processor:
    """The processor version as a worker would see it: limits, retry and input schema.

    Raises:
        ManifestError: processor.yaml's limits, retry or input_schema are invalid.
        UnknownProcessorError: `manifest` has no entry for this name and version.
    """
    if manifest is not None:
        found = load_manifest(manifest).find(proc.name, proc.version)
        if found is None:
            raise UnknownProcessorError(
                f"no processor {proc.name} {proc.version} in {manifest}")
        return found
    return entry_settings(proc, registry=registry)


@dataclass(frozen=True)
class LocalRun:
    """What one local run did, with the production classification of its end."""

    run_id: str
    image_id: str
    limits: Limits
    timeout_seconds: float
    outcome: Outcome
    finish: Finish
    logs: bytes
    attempt: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def succeeded(self) -> bool:
        return self.finish.status is RunStatus.SUCCEEDED

    @property
    def in_production(self) -> str:
        """What the processor's retry policy makes of this end on a worker."""
        decided = decide(self.finish, policy=self.retry, attempt=self.attempt,
                         now=datetime.now(UTC))
        if decided.status is RunStatus.QUEUED:
            return (f"retried: attempt {self.attempt + 1} of {self.retry.max_attempts} "
                    f"after a backoff")
        return str(decided.status)

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "image_id": self.image_id,
            "status": str(self.finish.status),
            "in_production": self.in_production,
            "exit_code": self.outcome.exit_code,
            "error_code": self.finish.error_code,
            "error_message": self.finish.error_message,
            "result": self.finish.result,
            "oom_killed": self.outcome.oom_killed,
            "timed_out": self.outcome.timed_out,
            "duration_seconds": round(self.outcome.duration_seconds, 3),
            "log_bytes": self.outcome.log_bytes,
            "log_truncated": self.outcome.log_truncated,
            "logs": self.logs.decode(errors="replace"),
            "limits": limits_json(self.limits, timeout_seconds=self.timeout_seconds),
        }


def limits_text(limits: Limits, *, timeout_seconds: float) -> str:
    """One line for people: the limits a run gets."""
    return (f"cpus {limits.cpus:g}, memory {size_text(limits.memory_bytes)}, "
            f"pids {limits.pids}, timeout {seconds_text(timeout_seconds)}, "
            f"log cap {size_text(limits.log_bytes)}, output {size_text(limits.output_bytes)}")


def limits_json(limits: Limits, *, timeout_seconds: float) -> dict[str, Any]:
    return {"cpus": limits.cpus, "memory_bytes": limits.memory_bytes, "pids": limits.pids,
            "timeout_seconds": timeout_seconds, "log_bytes": limits.log_bytes,
            "output_bytes": limits.output_bytes}


def run_image(sandbox: Sandbox, processor: Processor, image: str, input_json: bytes, *,
              timeout_seconds: float | None = None, attempt: int = 1,
              on_log: Callable[[bytes], None] | None = None,
              labels: Mapping[str, str] | None = None) -> LocalRun:
    """Run `image` (a local id or a pinned reference) once under `processor`'s limits.

    Raises:
        InvalidRequestError: `timeout_seconds` is above the processor's limit.
        SandboxError: the platform failed (the container is removed all the same).
    """
    limit = processor.limits.timeout_seconds
    if timeout_seconds is not None and timeout_seconds > limit:
        raise InvalidRequestError(f"timeout {timeout_seconds:g}s is above this processor's "
                                  f"limit of {limit:g}s")
    timeout = timeout_seconds or limit
    run_id = f"local-{secrets.token_hex(6)}"
    captured = bytearray()
    lock = threading.Lock()

    def sink(chunk: bytes) -> None:
        with lock:
            captured.extend(chunk)
        if on_log is not None:
            on_log(chunk)

    spec = spec_for(run_id=run_id, attempt=attempt, image=image, limits=processor.limits,
                    timeout_seconds=timeout, input_json=input_json,
                    labels={LOCAL_LABEL: "true", **(labels or {})})
    outcome = sandbox.run(spec, on_log=sink)
    with lock:
        logs = bytes(captured)
    return LocalRun(run_id=run_id, image_id=outcome.image_id, limits=processor.limits,
                    timeout_seconds=timeout, outcome=outcome, finish=classify(outcome),
                    logs=logs, attempt=attempt, retry=processor.retry)


def build_and_run(directory: Path, input_value: object, *, settings: Settings,
                  client: docker.DockerClient, base: str | None = None,
                  local_base: bool = False, manifest: Path | None = None,
                  timeout_seconds: float | None = None, attempt: int = 1,
                  on_log: Callable[[bytes], None] | None = None,
                  on_built: Callable[[str, Processor], None] | None = None) -> LocalRun:
    """Build DIR's image and run it once in the production sandbox.

    The input is checked first, as the API would, so a bad input fails before a build.

    Raises:
        PublishError: processor.yaml is unusable or the build failed.
        ManifestError, UnknownProcessorError: see `processor_settings`.
        InvalidRequestError, InvalidInputError: see `check_input`.
        SandboxError: the platform failed.
    """
    proc = ProcessorDir.load(directory)
    processor = processor_settings(proc, registry=settings.registry, manifest=manifest)
    input_json = check_input(processor, input_value, max_bytes=settings.input_max_bytes)
    image_id = build(proc, registry=settings.registry, client=client, base=base,
                     local_base=local_base)
    if on_built is not None:
        on_built(image_id, processor)
    sandbox = Sandbox(client, local_config(settings))
    return run_image(sandbox, processor, image_id, input_json,
                     timeout_seconds=timeout_seconds, attempt=attempt, on_log=on_log)
