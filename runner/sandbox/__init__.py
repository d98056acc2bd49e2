"""The sandbox layer: one locked-down Docker container per attempt, and nothing else.

Owns every Docker call of a run: the container's spec and labels (`spec`), the
create/verify/start/wait/remove lifecycle (`engine`), the one translator of
docker-py errors (`translate`), pinned images and their digests (`images`), the two
paths for input and result files (`transfer`), the checks and streaming of the
artifacts a processor leaves (`artifacts`), each attempt's bounded /run
filesystem (`runfs`), what the host and engine can enforce (`hostcheck`), leftover
volumes (`volumes`), background removal (`remover`), the provenance receipt
(`provenance`) and log capture (`logpump`).

May import: `runner.domain`, `runner.errors`, `runner.units`, `runner.manifest.model`
and `runner.observability.telemetry` (stage timing). Never FastAPI, SQLAlchemy,
Redis, or the control and execution layers: a processor's failure is returned as
data, and the caller decides what it means for the run.
"""

from runner.sandbox.engine import Sandbox
from runner.sandbox.provenance import applied_settings, expected_settings, mismatches, nano_cpus
from runner.sandbox.spec import (
    ATTEMPT_LABEL,
    CONTAINER_TMP,
    HOST_LABEL,
    IMAGE_ID,
    INSTANCE_LABEL,
    MANAGED_LABEL,
    RESULT_PATH,
    RUN_LABEL,
    WORKER_LABEL,
    ArtifactSink,
    ArtifactStatus,
    CollectedArtifacts,
    CollectedResult,
    ContainerSpec,
    InputFile,
    LogSink,
    Outcome,
    ResultStatus,
    SandboxConfig,
    StoredArtifact,
    container_name,
    spec_for,
)

__all__ = [
    "ATTEMPT_LABEL",
    "CONTAINER_TMP",
    "HOST_LABEL",
    "IMAGE_ID",
    "INSTANCE_LABEL",
    "MANAGED_LABEL",
    "RESULT_PATH",
    "RUN_LABEL",
    "WORKER_LABEL",
    "ArtifactSink",
    "ArtifactStatus",
    "CollectedArtifacts",
    "CollectedResult",
    "ContainerSpec",
    "InputFile",
    "LogSink",
    "Outcome",
    "ResultStatus",
    "Sandbox",
    "SandboxConfig",
    "StoredArtifact",
    "applied_settings",
    "container_name",
    "expected_settings",
    "mismatches",
    "nano_cpus",
    "spec_for",
]
