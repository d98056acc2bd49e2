"""The manifest's model: frozen records of allowlisted processor versions.

Plain data with no I/O, so every layer may import it (the sandbox takes `Limits`,
the control layer `Processor` and `RetryPolicy`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IMAGE_REF = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:\.[a-z0-9-]+)*(?::[0-9]{1,5})?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"@(?P<digest>sha256:[a-f0-9]{64})$"
)
# Exit 75 is the processor contract's "retry me"; the other two are the platform's own
# transient failures. Retries happen only when max_attempts is above 1.
DEFAULT_RETRY_ON = frozenset({"exit:75", "worker_lost", "docker_unavailable"})

# The floor of each limit, in base units: no value of a limit may mean "unlimited"
# (Docker reads a memory or CPU limit of 0 as none) or be one the engine refuses, and
# a value that rounds below its floor (memory "0.1" is 0 bytes) is refused like a 0.
# See docs/operators.md, "Limits and their floors".
MIN_CPUS = 0.01  # the kernel's smallest CFS quota: 1 ms per 100 ms period
MIN_MEMORY_BYTES = 6 * 1024**2  # Docker: "Minimum memory limit allowed is 6MB" (6 MiB)
MIN_PIDS = 1
MIN_TIMEOUT_SECONDS = 1.0
MIN_LOG_BYTES = 1024
MIN_OUTPUT_BYTES = 1024
MAX_SIZE_BYTES = 2**63 - 1  # the engine's sizes are signed 64-bit integers


@dataclass(frozen=True)
class Limits:
    """Resource limits of one processor, in base units."""

    cpus: float = 1.0
    memory_bytes: int = 256 * 1024**2
    pids: int = 128
    timeout_seconds: float = 300.0
    log_bytes: int = 4 * 1024**2
    # Everything the processor may write under /run/out (result, artifacts), held
    # while it writes; see docs/operators.md.
    output_bytes: int = 64 * 1024**2


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts are retried (applied by the executor)."""

    max_attempts: int = 1
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    on: frozenset[str] = DEFAULT_RETRY_ON


@dataclass(frozen=True)
class Accepts:
    """Which files a processor takes at /run/in: media types (wildcards such as
    `text/*`), a size cap per file, and how many. Without `accepts` in the manifest, any
    media type, up to the platform's caps (RUNNER_FILE_MAX_BYTES, RUNNER_RUN_MAX_FILES)."""

    media_types: tuple[str, ...] = ("*/*",)
    max_bytes: int | None = None
    max_files: int | None = None

    def public(self) -> dict[str, Any]:
        return {"media_types": list(self.media_types), "max_bytes": self.max_bytes,
                "max_files": self.max_files}


@dataclass(frozen=True)
class Processor:
    """One allowlisted processor version and its pinned image."""

    name: str
    version: str
    image: str
    repo: str
    digest: str
    limits: Limits
    retry: RetryPolicy
    queue: str | None = None
    max_concurrency: int | None = None
    description: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    accepts: Accepts = field(default_factory=Accepts)
    # false: a processor that is not deterministic; a submission's "reuse" never
    # answers with an earlier run of it.
    reusable: bool = True
    # Host tags a worker host must all have to run it (RUNNER_HOST_TAGS), sorted.
    require: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        """The processor as API clients see it."""
        return {
            "name": self.name,
            "version": self.version,
            "image": self.image,
            "description": self.description,
            "limits": {
                "cpus": self.limits.cpus,
                "memory_bytes": self.limits.memory_bytes,
                "pids": self.limits.pids,
                "timeout_seconds": self.limits.timeout_seconds,
                "log_bytes": self.limits.log_bytes,
                "output_bytes": self.limits.output_bytes,
            },
            "max_attempts": self.retry.max_attempts,
            "max_concurrency": self.max_concurrency,
            "input_schema": dict(self.input_schema),
            "accepts": self.accepts.public(),
            "reusable": self.reusable,
            "require": list(self.require),
        }


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version))


@dataclass(frozen=True)
class Manifest:
    """A validated manifest; `revision` is the SHA-256 of the file's bytes."""

    processors: tuple[Processor, ...]
    revision: str
    source: str = "<string>"

    def find(self, name: str, version: str | None = None) -> Processor | None:
        """The named processor at `version`, or its highest version when none is given."""
        matches = [p for p in self.processors if p.name == name]
        if version is not None:
            matches = [p for p in matches if p.version == version]
        if not matches:
            return None
        return max(matches, key=lambda p: version_key(p.version))

    def allows(self, name: str, version: str, image: str) -> bool:
        """True when exactly this image is pinned for this processor version."""
        found = self.find(name, version)
        return found is not None and found.image == image

