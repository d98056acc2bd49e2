"""The file catalog on a real (SQLite) run database and a real directory store: what a
run may take in, what its attempts' ends record, and what retention and the sweep
remove and keep. No Docker, API or worker."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from runner.control.blobs import BlobUpload, DirectoryBlobStore, UploadedBlob, blob_key
from runner.control.files import FileCatalog, FileInfo
from runner.control.ledger import Ledger
from runner.control.models import FileRow
from runner.control.runs import reuse_key
from runner.control.store import Store
from runner.domain import Artifact, Finish, RunStatus, utcnow
from runner.errors import InvalidRequestError, NotFoundError
from runner.manifest import Accepts
from tests.unit.conftest import NewRunMaker, past, set_run


@pytest.fixture
def catalog(store: Store, tmp_path: Path) -> FileCatalog:
    return FileCatalog(store, DirectoryBlobStore(tmp_path / "blobs"))


def put(catalog: FileCatalog, tenant: str, data: bytes,
        declared: str | None = None) -> tuple[FileInfo, UploadedBlob]:
    upload = BlobUpload(catalog.blobs, 1 << 30)
    upload.write(data)
    blob = upload.finish(tenant)
    info, _ = catalog.record(tenant, blob, declared=declared, name=None)
    return info, blob


def check(catalog: FileCatalog, files: dict[str, str], accepts: Accepts = Accepts(),
          **caps: int) -> dict[str, FileInfo]:
    limits = {"max_files": 8, "max_total_bytes": 1 << 20, "max_file_bytes": 1 << 20, **caps}
    return catalog.check_for_run("t", files, processor="p", accepts=accepts, **limits)


def test_the_same_bytes_are_one_file_per_tenant(catalog: FileCatalog) -> None:
    info, blob = put(catalog, "t", b"same bytes")
    again = BlobUpload(catalog.blobs, 100)
    again.write(b"same bytes")
    second, created = catalog.record("t", again.finish("t"), declared=None, name="x")
    assert not created and second.id == info.id
    assert catalog.get("t", info.id) == info
    with pytest.raises(NotFoundError):
        catalog.get("u", info.id)  # the hash alone names nothing for another tenant
    assert b"".join(catalog.content("t", info.sha256)) == b"same bytes"
    assert blob.key == blob_key("t", info.sha256)


def test_run_files_are_checked_by_name_id_type_and_caps(catalog: FileCatalog) -> None:
    text, _ = put(catalog, "t", b"hello there\n" * 10)
    pdf, _ = put(catalog, "t", b"%PDF-1.4\n%%EOF\n", declared="text/plain")
    assert check(catalog, {"a.txt": text.id})["a.txt"] == text
    problems = {
        ".dot": {".dot": text.id}, "sl": {"a/b": text.id}, "id": {"x": "sha256:zz"},
        "missing": {"x": "sha256:" + "0" * 64},
    }
    for what, files in problems.items():
        with pytest.raises(InvalidRequestError) as caught:
            check(catalog, files)
        assert str(caught.value.context["field"]).startswith("files."), what
    with pytest.raises(InvalidRequestError, match="application/pdf"):
        check(catalog, {"doc": pdf.id}, Accepts(media_types=("text/*",)))
    with pytest.raises(InvalidRequestError, match="over the 16 byte cap"):
        check(catalog, {"doc": text.id}, Accepts(max_bytes=16))
    with pytest.raises(InvalidRequestError, match="2 files"):
        check(catalog, {"a": text.id, "b": text.id}, Accepts(max_files=1))
    with pytest.raises(InvalidRequestError, match="together"):
        check(catalog, {"a": text.id, "b": pdf.id}, max_total_bytes=text.size)


def test_an_attempts_artifacts_are_recorded_with_its_end(
        catalog: FileCatalog, ledger: Ledger, new_run: NewRunMaker) -> None:
    run = new_run()
    claim = ledger.claim(run.id, attempt=1, worker_id="w", lease_seconds=30)
    assert claim.run is not None
    made = (Artifact("a.txt", 3, "1" * 64, "text/plain"), Artifact("d/b", 1, "2" * 64,
                                                                  "application/octet-stream"))
    assert ledger.finish(run.id, 1, Finish(RunStatus.SUCCEEDED, artifacts=made))
    assert catalog.artifacts(run.id, 1) == sorted(made, key=lambda a: a.name)
    assert catalog.artifact(run.id, 1, "d/b") == made[1]
    with pytest.raises(NotFoundError):
        catalog.artifact(run.id, 2, "d/b")
    # A late end of an attempt that lost its run records nothing, artifacts included.
    assert not ledger.finish(run.id, 1, Finish(RunStatus.FAILED, artifacts=made))
    assert len(catalog.artifacts(run.id, 1)) == 2


def test_retention_keeps_a_file_a_kept_run_uses(catalog: FileCatalog, store: Store,
                                                ledger: Ledger,
                                                new_run: NewRunMaker) -> None:
    used, _ = put(catalog, "t", b"used by a run")
    idle, _ = put(catalog, "t", b"used by nobody")
    run = new_run(files={"in": used.id})
    with store.session() as session:
        session.execute(update(FileRow).values(touched_at=past(86400 * 40)))
    cutoff = utcnow() - timedelta(days=30)
    assert catalog.prune_files(cutoff=cutoff) == 1
    assert catalog.get("t", used.id) == used
    with pytest.raises(NotFoundError):
        catalog.get("t", idle.id)

    # Once the run is gone too, so is its file; the blobs follow with the sweep.
    ledger.claim(run.id, attempt=1, worker_id="w", lease_seconds=30)
    ledger.finish(run.id, 1, Finish(RunStatus.SUCCEEDED, artifacts=(
        Artifact("out", 13, used.sha256, "text/plain"),)))
    set_run(store, run.id, finished_at=past(86400 * 40))
    assert store.prune_runs_ended_before(cutoff=cutoff) == 1
    assert catalog.prune_files(cutoff=cutoff) == 1
    assert catalog.blobs.exists(blob_key("t", used.sha256))
    swept = catalog.sweep_blobs(grace_seconds=0)
    assert swept["unreferenced"] == 2
    assert not catalog.blobs.exists(blob_key("t", used.sha256))
    assert not catalog.blobs.exists(blob_key("t", idle.sha256))


def test_the_sweep_spares_referenced_and_young_blobs(catalog: FileCatalog) -> None:
    kept, _ = put(catalog, "t", b"a recorded file")
    orphan = BlobUpload(catalog.blobs, 100)
    orphan.write(b"a blob whose row was never written (a crash)")
    lost = orphan.finish("t")
    unfinished = catalog.blobs.begin()
    unfinished.write(b"an upload cut off mid-way")
    assert catalog.sweep_blobs(grace_seconds=3600) == {"temp": 0, "unreferenced": 0}
    # The same bytes recorded by another tenant do not keep this tenant's blob.
    other = BlobUpload(catalog.blobs, 100)
    other.write(b"a blob whose row was never written (a crash)")
    catalog.record("u", other.finish("u"), declared=None, name=None)
    aged = time.time() - 7200
    for path in Path(catalog.blobs.root).rglob("*"):  # type: ignore[attr-defined]
        if path.is_file():
            os.utime(path, (aged, aged))
    swept = catalog.sweep_blobs(grace_seconds=3600)
    assert swept == {"temp": 1, "unreferenced": 1}
    assert catalog.blobs.exists(blob_key("t", kept.sha256))
    assert not catalog.blobs.exists(lost.key)
    assert catalog.blobs.exists(blob_key("u", lost.sha256))


def test_the_reuse_key_is_the_image_input_and_file_hashes() -> None:
    files = {"a": "sha256:" + "1" * 64, "b": "sha256:" + "2" * 64}
    key = reuse_key("img@sha256:" + "f" * 64, b'{"x": 1, "y": 2}', files)
    assert key == reuse_key("img@sha256:" + "f" * 64, b'{"y": 2, "x": 1}',
                            dict(reversed(files.items())))
    assert key != reuse_key("img@sha256:" + "e" * 64, b'{"x": 1, "y": 2}', files)
    assert key != reuse_key("img@sha256:" + "f" * 64, b'{"x": 1, "y": 3}', files)
    assert key != reuse_key("img@sha256:" + "f" * 64, b'{"x": 1, "y": 2}',
                            {**files, "b": "sha256:" + "3" * 64})
    assert key != reuse_key("img@sha256:" + "f" * 64, b'{"x": 1, "y": 2}',
                            {"c": files["a"], "b": files["b"]})
