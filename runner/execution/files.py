"""A worker's side of files in, artifacts out: the sandbox's `InputFile`s and
`ArtifactSink` over the control layer's file catalog and blob store.

Inputs are read from the store as the container's /run is filled (never whole in
memory); artifacts are streamed into the store as they are collected, hashed and
typed from their bytes on the way. A collection that fails leaves its blobs without a
row: nothing of it is shown, and the sweep removes them after the grace period.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterable
from datetime import datetime
from functools import partial

from runner.control.blobs import BlobUpload
from runner.control.files import FileCatalog
from runner.control.mediatype import sniff
from runner.domain import Run
from runner.errors import NotFoundError, SandboxError
from runner.sandbox import ArtifactSink, InputFile, StoredArtifact


class StoreSink:
    """Puts one attempt's artifacts into its tenant's blobs, each at most its own size
    (the sandbox checked the sizes and the total before the first byte)."""

    def __init__(self, catalog: FileCatalog, tenant: str) -> None:
        self.catalog, self.tenant = catalog, tenant
        self.put_keys: list[str] = []

    def put(self, name: str, size: int, chunks: Iterable[bytes]) -> StoredArtifact:
        upload = BlobUpload(self.catalog.blobs, size)
        try:
            for chunk in chunks:
                upload.write(chunk)
            stored = upload.finish(self.tenant)
        except BaseException:
            upload.abort()
            raise
        self.put_keys.append(stored.key)
        # The name's extension only refines a text type libmagic calls text/plain
        # (counts.csv is text/csv); it never overrides what the bytes say.
        guessed = mimetypes.guess_type(name, strict=False)[0]
        return StoredArtifact(name=name, size=stored.size, sha256=stored.sha256,
                              media_type=sniff(stored.head, guessed))

    def discard(self) -> None:
        # Another run of the tenant may hold the same bytes under the same key this
        # very moment, so nothing is deleted here: without a row these blobs are
        # orphans, and the sweep takes them once they are past the grace period.
        self.put_keys.clear()


class WorkerFiles:
    """The `FilesPort` (runner/execution/ports.py) of a worker process."""

    def __init__(self, catalog: FileCatalog) -> None:
        self.catalog = catalog

    def inputs(self, run: Run) -> list[InputFile]:
        """The run's files, each to be read from the store when delivered.

        Raises:
            SandboxError: a file of the run is no longer recorded (stage "deliver input").
        """
        found = []
        for name, file_id in sorted(run.files.items()):
            try:
                info = self.catalog.get(run.tenant, file_id)
            except NotFoundError:
                raise SandboxError(f"the file {name} ({file_id}) of this run is gone from "
                                   "the file store", stage="deliver input") from None
            key = self.catalog.key(run.tenant, info.sha256)
            found.append(InputFile(name=name, size=info.size,
                                   open=partial(self.catalog.blobs.open, key)))
        return found

    def sink(self, run: Run) -> ArtifactSink:
        return StoreSink(self.catalog, run.tenant)

    def prune_files(self, *, cutoff: datetime) -> int:
        return self.catalog.prune_files(cutoff=cutoff)

    def sweep_blobs(self, *, grace_seconds: float) -> dict[str, int]:
        return self.catalog.sweep_blobs(grace_seconds=grace_seconds)
