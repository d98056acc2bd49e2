"""Runtime settings: `RUNNER_*` environment variables, validated once at start.

Built in the entry points and passed down; nothing reads the environment elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runner.errors import ConfigError
from runner.units import parse_duration, parse_size


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Every knob of the runner; see docs/operators.md for each one."""

    model_config = SettingsConfigDict(env_prefix="RUNNER_", extra="ignore", frozen=True)

    database_url: str = "sqlite:///var/runner.db"
    redis_url: str = "redis://127.0.0.1:6390/0"
    manifest: Path = Path("manifests/manifest.yaml")
    queue: str = "runner"
    registry: str = "127.0.0.1:5000"
    instance_name: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,63}$")

    log_format: Literal["json", "console"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=1, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    worker_id: str = Field(default_factory=_default_worker_id)
    # The worker host (docs/operators.md, "Several hosts"): recorded on each attempt and
    # labelled on its containers; its tags decide which tagged runs it serves.
    host_id: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9._-]{1,63}$")
    host_tags: str = ""
    container_user: str = "65532:65532"
    tmp_size: int = 64 * 1024 * 1024
    stop_grace_seconds: float = Field(default=5.0, ge=0)
    result_max_bytes: int = 1024 * 1024
    input_max_bytes: int = 1024 * 1024
    pull_timeout_seconds: float = Field(default=300.0, gt=0)
    # Input and result through the /run volume's host directory when reachable (a local
    # engine, no user-namespace remapping); false = always the engine's archive API.
    direct_volume_io: bool = True

    cors_origins: str = ""
    key_requests_per_second: int = Field(default=50, ge=0)
    tenant_submissions_per_minute: int = Field(default=600, ge=0)
    tenant_max_active_runs: int = Field(default=1000, ge=0)
    # Fair dequeue (docs/operators.md, "Fairness"): each tenant's runs wait in lanes of
    # their own, one per priority, and workers take tenants in turn; a tenant's weight
    # is how many runs it gets per turn ("big=4,batch=1"; others 1). "off" puts every
    # run on its queue's one FIFO list, as releases before 0009 did: for the APIs of a
    # rolling upgrade while workers from before it still run.
    fair_dequeue: Literal["on", "off"] = "on"
    tenant_weights: str = Field(default="", pattern=r"^([^=,\s]+=[1-9][0-9]{0,2}(,|$))*$")
    # The most items one POST /v1/runs/batch may carry (the contract's cap is 1000).
    batch_max_items: int = Field(default=1000, ge=1, le=1000)
    # A batch's body cap (other bodies have RUNNER_MAX_BODY_BYTES; each item's input
    # still has RUNNER_INPUT_MAX_BYTES).
    batch_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    follow_max_seconds: float = Field(default=600.0, gt=0)
    # Log follows (GET .../logs?follow=true) held open at once, per API key and per API
    # process; past either the answer is 429 / 503 with Retry-After.
    follow_max_per_key: int = Field(default=4, ge=1)
    follow_max_per_process: int = Field(default=64, ge=1)
    # How often a follow checks that its key is still valid (a revoked key's streams
    # end within this).
    follow_key_check_seconds: float = Field(default=5.0, gt=0)
    # Failed authentications (a key looked up and refused) per client address per
    # minute; the one that reaches it makes the address 429 for a minute. 0 = off.
    auth_failures_per_minute: int = Field(default=20, ge=0)
    # The API's PostgreSQL connection pool: kept open, extra under load, and how long
    # a request waits for a free one before 503 with Retry-After.
    api_database_pool_size: int = Field(default=10, ge=1)
    api_database_max_overflow: int = Field(default=10, ge=0)
    api_database_pool_timeout_seconds: float = Field(default=30.0, gt=0)

    lease_seconds: float = Field(default=15.0, gt=0)
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    drain_timeout_seconds: float = Field(default=60.0, ge=0)
    reconcile_interval_seconds: float = Field(default=5.0, gt=0)
    reconcile_grace_seconds: float = Field(default=10.0, ge=0)
    # Runs (with their attempts and logs) that ended more than this many days ago are
    # deleted by the reconciler, a batch per pass; 0 keeps them for ever.
    retention_days: float = Field(default=0.0, ge=0)
    # "required": a worker that cannot bound /run at output_bytes (not root, a remote or
    # userns engine, a container with only the socket) refuses to start. "off": it runs
    # processors unbounded on a plain volume instead, with a warning at start.
    run_output_bound: Literal["required", "off"] = "required"

    # Files in, artifacts out (docs/operators.md, "Files and artifacts").
    # Where blobs live: "directory" (file_dir, on this host) or "database" (chunks in
    # the run database, shared by every host that shares it).
    file_store: Literal["directory", "database"] = "directory"
    file_dir: Path = Path("var/files")
    file_max_bytes: int = Field(default=1024**3, gt=0)  # one upload
    run_files_max_bytes: int = Field(default=2 * 1024**3, gt=0)  # one run's files together
    run_max_files: int = Field(default=64, ge=1, le=1000)
    artifact_max_files: int = Field(default=1000, ge=1, le=100_000)
    # A blob no file or artifact refers to is swept once it is this old (a crash
    # between writing a blob and recording it leaves one behind).
    file_orphan_grace_seconds: float = Field(default=3600.0, ge=0)
    file_sweep_interval_seconds: float = Field(default=300.0, gt=0)

    # Webhooks (docs/api.md, "Webhooks"): comma-separated URL prefixes a run's
    # webhook_url must start with; empty = no webhooks. The secret signs deliveries.
    webhook_allowed_urls: str = ""
    webhook_secret: SecretStr = SecretStr("")
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # How long a delivery is retried (with backoff and jitter) before it is failed.
    webhook_retry_seconds: float = Field(default=86400.0, gt=0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)

    # The dashboard (/ui/): how long a sign-in lasts.
    ui_session_seconds: float = Field(default=8 * 3600.0, gt=0)

    # Each worker's /metrics, /healthz and /readyz; 0 = off. Under --concurrency N,
    # worker i of the supervisor listens on worker_port + i - 1.
    worker_host: str = "127.0.0.1"
    worker_port: int = Field(default=0, ge=0, le=65535)
    # Traces: off by default; "otlp" exports over OTLP/HTTP to trace_endpoint, "jsonl"
    # appends finished spans to trace_file (debugging, tests), "console" to stderr.
    trace_exporter: Literal["none", "otlp", "jsonl", "console"] = "none"
    trace_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    trace_file: Path = Path("var/traces.jsonl")
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)

    @field_validator("tmp_size", "result_max_bytes", "input_max_bytes", "file_max_bytes",
                     "run_files_max_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        if isinstance(value, int | str):
            return parse_size(value)
        raise ValueError("expected a size such as 64Mi")

    @field_validator("stop_grace_seconds", "pull_timeout_seconds", "lease_seconds",
                     "heartbeat_seconds", "drain_timeout_seconds",
                     "reconcile_interval_seconds", "reconcile_grace_seconds",
                     "follow_max_seconds", "follow_key_check_seconds",
                     "api_database_pool_timeout_seconds", "file_orphan_grace_seconds",
                     "file_sweep_interval_seconds", "webhook_timeout_seconds",
                     "webhook_retry_seconds", "webhook_poll_seconds", "ui_session_seconds",
                     mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        if isinstance(value, int | float | str):
            return parse_duration(value)
        raise ValueError("expected a duration such as 5s")

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"{origin!r} is not an origin (https://host[:port])")
        return value

    @property
    def instance(self) -> str:
        """This deployment's name on its containers: a digest of the database it uses
        (password left out), unless RUNNER_INSTANCE_NAME names it."""
        if self.instance_name:
            return self.instance_name
        url = re.sub(r"//([^:/@]+):[^@]*@", r"//\1@", self.database_url)
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            url = f"sqlite:///{Path(url.removeprefix('sqlite:///')).resolve()}"
        return hashlib.sha256(url.encode()).hexdigest()[:16]

    @property
    def host_tag_list(self) -> list[str]:
        return sorted({t.strip() for t in self.host_tags.split(",") if t.strip()})

    @field_validator("host_tags")
    @classmethod
    def _host_tags(cls, value: str) -> str:
        tags = {t.strip() for t in value.split(",") if t.strip()}
        for tag in tags:
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,31}", tag):
                raise ValueError(f"{tag!r} is not a host tag (1-32 of a-z 0-9 . _ -)")
        if len(tags) > 6:
            raise ValueError(f"{len(tags)} tags: a host has at most 6")
        return value

    @property
    def webhook_prefixes(self) -> list[str]:
        return [p.strip() for p in self.webhook_allowed_urls.split(",") if p.strip()]

    @field_validator("webhook_allowed_urls")
    @classmethod
    def _webhook_prefixes(cls, value: str) -> str:
        for prefix in (p.strip() for p in value.split(",") if p.strip()):
            parts = urlsplit(prefix)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{prefix!r} is not a URL prefix (https://host[:port]/path)")
        return value

    @property
    def tenant_weight_map(self) -> dict[str, int]:
        """RUNNER_TENANT_WEIGHTS as {tenant: weight} (the pattern has checked it)."""
        pairs = (item.split("=", 1) for item in self.tenant_weights.split(",") if item)
        return {tenant: int(weight) for tenant, weight in pairs}

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @field_validator("container_user")
    @classmethod
    def _user(cls, value: str) -> str:
        uid, _, gid = value.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise ValueError("must be numeric UID or UID:GID, e.g. 65532:65532")
        if int(uid) == 0:
            raise ValueError("must not be root (UID 0): processors never run as root")
        return value if gid else f"{uid}:{uid}"

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        if value.startswith("postgresql://"):
            # psycopg 3 is the driver we ship; make plain postgresql:// URLs use it.
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value


    @model_validator(mode="after")
    def _lease(self) -> Settings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be below lease_seconds "
                             f"({self.heartbeat_seconds:g} >= {self.lease_seconds:g})")
        # Self-fencing (docs/reliability.md): a worker that has not renewed its lease for
        # lease - stop_grace - 2 s stops its container, which must leave it at least one
        # heartbeat to renew in, so the SIGKILL always lands before the lease ends.
        fence = self.lease_seconds - self.stop_grace_seconds - 2.0
        if fence <= self.heartbeat_seconds:
            raise ValueError(
                f"RUNNER_LEASE_SECONDS ({self.lease_seconds:g}) must exceed "
                f"RUNNER_STOP_GRACE_SECONDS ({self.stop_grace_seconds:g}) + 2 s + "
                f"RUNNER_HEARTBEAT_SECONDS ({self.heartbeat_seconds:g}): a worker cut off "
                "from the database must stop its container before its lease can expire")
        return self


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings.

    Raises:
        ConfigError: one line naming the first invalid variable.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"] and "RUNNER_" in first["msg"]:  # a rule across settings
            raise ConfigError(f"invalid settings: {first['msg'].removeprefix('Value error, ')}",
                              variable="") from exc
        field = str(first["loc"][0]) if first["loc"] else "heartbeat_seconds"
        raise ConfigError(
            f"invalid setting RUNNER_{field.upper()}: {first['msg']}", variable=field
        ) from exc
