"""The catalog of files and artifacts: which tenant has which bytes, what a run took in
and what each of its attempts left, and when a blob may go.

Blobs themselves are in a `BlobStore` (runner/control/blobs.py), content-addressed
per tenant: the same bytes uploaded twice by one tenant are one row and one blob, and
a file id (`sha256:<hex>`) names nothing for another tenant. This module holds the
rules that sit on top: the file names a run may use, the processor's `accepts`, the
per-run caps, and retention (a file goes when no kept run refers to it and it has not
been touched for the retention period; a blob goes when no file or artifact row refers
to it, once it is older than the orphan grace period).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import delete, exists, select, update
from sqlalchemy.exc import IntegrityError

from runner.control.blobs import (
    KEY,
    BlobStore,
    UploadedBlob,
    blob_key,
    open_blob_store,
    tenant_namespace,
)
from runner.control.mediatype import matches, sniff
from runner.control.models import ArtifactRow, FileRow, RunFileRow
from runner.control.rows import aware
from runner.control.store import Store
from runner.domain import Artifact, Run, utcnow
from runner.errors import InvalidRequestError, NotFoundError, StorageError
from runner.manifest import Accepts, Processor
from runner.settings import Settings

log = structlog.get_logger(__name__)

FILE_ID = re.compile(r"sha256:[0-9a-f]{64}")
# A name under /run/in: 1-128 of [A-Za-z0-9._-], not starting with a dot (no hidden
# files, no "." or "..", no separators: nothing can walk out of /run/in).
FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
SWEEP_BATCH = 1000


def is_file_id(value: str) -> bool:
    return FILE_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class FileInfo:
    """An uploaded file as its tenant sees it."""

    sha256: str
    size: int
    media_type: str
    declared_media_type: str | None
    name: str | None
    created_at: datetime

    @property
    def id(self) -> str:
        return f"sha256:{self.sha256}"

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "media_type": self.media_type,
                "declared_media_type": self.declared_media_type, "name": self.name,
                "created_at": self.created_at}


def _info(row: FileRow) -> FileInfo:
    return FileInfo(sha256=row.sha256, size=row.size, media_type=row.media_type,
                    declared_media_type=row.declared_media_type, name=row.name,
                    created_at=aware(row.created_at) or utcnow())


def _shown(name: str) -> str:
    return repr(name[:64]) if not FILE_NAME.fullmatch(name) else name


class FileCatalog:
    """Files and artifacts of every tenant, over one run database and one blob store."""

    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store, self.blobs = store, blobs

    # Files -------------------------------------------------------------------------

    def record(self, tenant: str, uploaded: UploadedBlob, *, declared: str | None,
               name: str | None) -> tuple[FileInfo, bool]:
        """The file row of an upload whose blob is committed; whether it is new (the
        tenant's earlier upload of the same bytes wins, and is touched)."""
        now = utcnow()
        media_type = sniff(uploaded.head, declared)
        try:
            with self.store.session() as session:
                existing = session.get(FileRow, (tenant, uploaded.sha256))
                if existing is not None:
                    existing.touched_at = now
                    return _info(existing), False
                row = FileRow(tenant=tenant, sha256=uploaded.sha256, size=uploaded.size,
                              media_type=media_type, declared_media_type=declared,
                              name=name, created_at=now, touched_at=now)
                session.add(row)
                session.flush()
                return _info(row), True
        except IntegrityError:  # the same bytes, uploaded at the same moment
            return self.get(tenant, f"sha256:{uploaded.sha256}"), False

    def get(self, tenant: str, file_id: str) -> FileInfo:
        """Raises: NotFoundError: no such file for this tenant (another's is not found)."""
        if not is_file_id(file_id):
            raise NotFoundError("no such file: a file id is sha256:<64 hex>")
        with self.store.session() as session:
            row = session.get(FileRow, (tenant, file_id.removeprefix("sha256:")))
            if row is None:
                raise NotFoundError(f"no file {file_id}")
            return _info(row)

    def key(self, tenant: str, sha256: str) -> str:
        return blob_key(tenant, sha256)

    def content(self, tenant: str, sha256: str, *, start: int = 0,
                end: int | None = None) -> Iterator[bytes]:
        """The bytes [start, end) of a blob of this tenant, streamed.

        Raises:
            StorageError: a recorded file or artifact whose bytes the store lacks (said
                before the first byte is sent, not by a response cut short).
        """
        key = blob_key(tenant, sha256)
        if not self.blobs.exists(key):
            raise StorageError(f"the bytes of sha256:{sha256} are missing from the "
                               f"{self.blobs.kind} file store")
        return self.blobs.read(key, start=start, end=end)

    def check_for_run(self, tenant: str, files: Mapping[str, str], *, processor: str,
                      accepts: Accepts, max_files: int, max_total_bytes: int,
                      max_file_bytes: int) -> dict[str, FileInfo]:
        """The files a submission names, each checked against the name rule, the
        tenant's files, the processor's `accepts` and the per-run caps; touched, so
        retention counts from now.

        Raises:
            InvalidRequestError: the first problem, its field `files` or `files.<name>`.
        """
        cap = min(max_files, accepts.max_files or max_files)
        if len(files) > cap:
            raise InvalidRequestError(f"files: {len(files)} files, over the cap of {cap} "
                                      f"for {processor}", field="files")
        found: dict[str, FileInfo] = {}
        for name, file_id in files.items():
            where = f"files.{_shown(name)}"
            if not FILE_NAME.fullmatch(name):
                raise InvalidRequestError(
                    f"{where}: a file name is 1-128 of A-Z a-z 0-9 . _ - and does not start "
                    "with a dot", field=where)
            if not isinstance(file_id, str) or not is_file_id(file_id):
                raise InvalidRequestError(f"{where}: not a file id (sha256:<64 hex>)",
                                          field=where)
            try:
                info = self.get(tenant, file_id)
            except NotFoundError:
                raise InvalidRequestError(f"{where}: no file {file_id} (upload it first "
                                          "with POST /v1/files)", field=where) from None
            limit = min(accepts.max_bytes or max_file_bytes, max_file_bytes)
            if info.size > limit:
                raise InvalidRequestError(f"{where}: {info.size} bytes, over the {limit} "
                                          f"byte cap of {processor}", field=where)
            if not matches(info.media_type, accepts.media_types):
                raise InvalidRequestError(
                    f"{where}: {info.media_type} (sniffed from its bytes) is not accepted by "
                    f"{processor}, which accepts {', '.join(accepts.media_types)}",
                    field=where)
            found[name] = info
        total = sum(info.size for info in found.values())
        if total > max_total_bytes:
            raise InvalidRequestError(f"files: {total} bytes together, over the {max_total_bytes}"
                                      " byte cap of one run", field="files")
        if found:
            with self.store.session() as session:
                session.execute(update(FileRow).where(
                    FileRow.tenant == tenant,
                    FileRow.sha256.in_([i.sha256 for i in found.values()]),
                ).values(touched_at=utcnow()).execution_options(synchronize_session=False))
        return found

    # Artifacts ---------------------------------------------------------------------

    def artifacts(self, run_id: str, attempt: int) -> list[Artifact]:
        """What attempt `attempt` of the run left under /run/out, by name."""
        with self.store.session() as session:
            rows = session.scalars(select(ArtifactRow).where(
                ArtifactRow.run_id == run_id, ArtifactRow.attempt == attempt)
                .order_by(ArtifactRow.name))
            return [Artifact(r.name, r.size, r.sha256, r.media_type) for r in rows]

    def artifacts_by_attempt(self, run_id: str) -> dict[int, list[Artifact]]:
        with self.store.session() as session:
            found: dict[int, list[Artifact]] = {}
            for r in session.scalars(select(ArtifactRow).where(ArtifactRow.run_id == run_id)
                                     .order_by(ArtifactRow.attempt, ArtifactRow.name)):
                found.setdefault(r.attempt, []).append(
                    Artifact(r.name, r.size, r.sha256, r.media_type))
            return found

    def artifact(self, run_id: str, attempt: int, name: str) -> Artifact:
        """Raises: NotFoundError: the attempt left no artifact of that name."""
        with self.store.session() as session:
            row = session.scalar(select(ArtifactRow).where(
                ArtifactRow.run_id == run_id, ArtifactRow.attempt == attempt,
                ArtifactRow.name == name))
            if row is None:
                raise NotFoundError(f"no artifact {name[:200]!r} of attempt {attempt}")
            return Artifact(row.name, row.size, row.sha256, row.media_type)

    # Retention ---------------------------------------------------------------------

    def prune_files(self, *, cutoff: datetime, batch: int = 500) -> int:
        """Delete up to `batch` file rows untouched since `cutoff` that no run refers
        to (their blobs go with the next sweep); how many."""
        referenced = exists().where(RunFileRow.tenant == FileRow.tenant,
                                    RunFileRow.sha256 == FileRow.sha256)
        with self.store.session() as session:
            keys = list(session.execute(select(FileRow.tenant, FileRow.sha256).where(
                FileRow.touched_at < cutoff, ~referenced).limit(batch)))
            for tenant, sha256 in keys:
                session.execute(delete(FileRow).where(
                    FileRow.tenant == tenant, FileRow.sha256 == sha256,
                    ~exists().where(RunFileRow.tenant == tenant, RunFileRow.sha256 == sha256))
                    .execution_options(synchronize_session=False))
        return len(keys)

    def sweep_blobs(self, *, grace_seconds: float) -> dict[str, int]:
        """Delete unfinished uploads and blobs no file or artifact refers to, begun or
        written more than `grace_seconds` ago (a crash between a blob's write and its
        row leaves one); at most SWEEP_BATCH blobs are looked at per call."""
        older_than = time.time() - grace_seconds
        temp = self.blobs.sweep_temp(older_than=older_than)
        removed = 0
        for checked, key in enumerate(self.blobs.keys(older_than=older_than)):
            if checked >= SWEEP_BATCH:
                break
            if not KEY.fullmatch(key):
                continue
            namespace, _, sha256 = key.split("/")
            if not self._referenced(namespace, sha256):
                self.blobs.delete(key)
                removed += 1
        if temp or removed:
            log.info("blobs_swept", temp=temp, unreferenced=removed)
        return {"temp": temp, "unreferenced": removed}

    def _referenced(self, namespace: str, sha256: str) -> bool:
        with self.store.session() as session:
            tenants = set(session.scalars(select(FileRow.tenant).where(
                FileRow.sha256 == sha256)))
            tenants |= set(session.scalars(select(ArtifactRow.tenant).where(
                ArtifactRow.sha256 == sha256).distinct()))
        return any(tenant_namespace(t) == namespace for t in tenants)


class RunFiles:
    """The submission side's `FileRules` (runner/control/runs.py) under this service's
    caps: the processor's `accepts` within RUNNER_FILE_MAX_BYTES, RUNNER_RUN_MAX_FILES
    and RUNNER_RUN_FILES_MAX_BYTES."""

    def __init__(self, catalog: FileCatalog, *, max_file_bytes: int, max_files: int,
                 max_total_bytes: int) -> None:
        self.catalog = catalog
        self.max_file_bytes, self.max_files = max_file_bytes, max_files
        self.max_total_bytes = max_total_bytes

    def check(self, tenant: str, files: Mapping[str, str], processor: Processor) -> None:
        self.catalog.check_for_run(tenant, files, processor=processor.name,
                                   accepts=processor.accepts, max_files=self.max_files,
                                   max_total_bytes=self.max_total_bytes,
                                   max_file_bytes=self.max_file_bytes)

    def artifacts_of(self, run: Run) -> list[Artifact]:
        return self.catalog.artifacts(run.id, run.attempt)


def run_files(catalog: FileCatalog, settings: Settings) -> RunFiles:
    """The `FileRules` of a service under its settings."""
    return RunFiles(catalog, max_file_bytes=settings.file_max_bytes,
                    max_files=settings.run_max_files,
                    max_total_bytes=settings.run_files_max_bytes)


def catalog_for(settings: Settings, store: Store) -> FileCatalog:
    """The file catalog of a service: its blobs in the run database, or under
    RUNNER_FILE_DIR/<instance>/ (one directory per deployment, so two deployments
    sharing a directory never sweep each other's blobs)."""
    return FileCatalog(store, open_blob_store(settings.file_store,
                                              directory=settings.file_dir / settings.instance,
                                              store=store))
