"""`ManifestSource`: the manifest in force for a long-running process (hot reload)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import structlog

from runner.errors import ManifestError
from runner.manifest.model import Manifest
from runner.manifest.parse import load_manifest, parse_manifest, revision_of
from runner.manifest.yamlio import read_text

log = structlog.get_logger(__name__)


# A file modified this close to when it was last read may have been modified again
# since within the same timestamp tick, keeping its size and inode (git calls this
# "racy clean"): until it is older than that, its content is checked, not its stat.
RACY_NS = 2_000_000_000


class ManifestSource:
    """The manifest in force for a long-running process, reloaded when its file changes.

    A cheap `stat` on each `current()` call notices edits (and for two seconds after
    an edit, a hash of the file's text, so a second same-size edit within one
    timestamp tick is not missed); an invalid edit is refused with an error log and
    the last good manifest stays in force.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._looked_at = time.time_ns()
        self._signature = self._stat()
        self._manifest = load_manifest(path)
        self._seen: str | None = self._manifest.revision  # the text last read, good or bad
        self.reloads_ok = 0
        self.reloads_refused = 0

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _unchanged(self, signature: tuple[int, int, int] | None) -> bool:
        racy = self._signature is not None and (
            self._signature[0] > self._looked_at - RACY_NS)
        return signature == self._signature and not racy

    def current(self) -> Manifest:
        """The manifest in force, reloading the file first if it changed."""
        if self._unchanged(self._stat()):
            return self._manifest
        with self._lock:
            looked_at = time.time_ns()  # before the stat, so a later edit counts as racy
            signature = self._stat()
            if self._unchanged(signature):
                return self._manifest
            self._signature, self._looked_at = signature, looked_at
            try:
                text = read_text(self.path)
            except ManifestError as exc:
                if self._seen is not None:  # once per outage, not on every look
                    self._seen = None
                    self._refuse(exc)
                return self._manifest
            revision = revision_of(text)
            if revision == self._seen:
                return self._manifest  # touched, or checked again while racy
            self._seen = revision
            try:
                fresh = parse_manifest(text, source=str(self.path))
            except ManifestError as exc:
                self._refuse(exc)
                return self._manifest
            if fresh.revision != self._manifest.revision:
                self.reloads_ok += 1
                log.info("manifest_reloaded", path=str(self.path), revision=fresh.revision,
                         previous=self._manifest.revision, processors=len(fresh.processors))
            self._manifest = fresh
            return fresh

    def _refuse(self, exc: ManifestError) -> None:
        self.reloads_refused += 1
        log.error("manifest_reload_refused", path=str(self.path),
                  problems=exc.problems or [exc.message],
                  revision_in_force=self._manifest.revision)
