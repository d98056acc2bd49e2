"""Files in, over HTTP: upload, read back, caps, names, media types and tenants
(real API, PostgreSQL and file store; no worker needed)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.control.models import FileRow
from runner.control.store import Store
from runner.execution.wiring import build_reconciler
from runner.settings import Settings
from tests.support.processes import child_env, start_api_process
from tests.support.waiting import wait_until

PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(api_url: str, key: str, data: bytes, media_type: str = "application/octet-stream",
           **params: str) -> httpx.Response:
    return httpx.post(f"{api_url}/v1/files", content=data, params=params, timeout=30,
                      headers={**auth(key), "Content-Type": media_type})


def submit(api_url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{api_url}/v1/runs", json=body, headers=auth(key), timeout=30)


def blobs_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_upload_is_content_addressed_and_read_back_exactly(api_url: str,
                                                          keys: dict[str, str]) -> None:
    data = os.urandom(300 * 1024) + b"\x00\xff" * 10
    first = upload(api_url, keys["submitter"], data, name="blob.bin")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["id"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert body["size"] == len(data) and body["name"] == "blob.bin"
    again = upload(api_url, keys["submitter"], data)
    assert again.status_code == 200 and again.json()["id"] == body["id"]

    meta = httpx.get(f"{api_url}/v1/files/{body['id']}", headers=auth(keys["viewer"]))
    assert meta.status_code == 200 and meta.json()["size"] == len(data)
    content = httpx.get(f"{api_url}/v1/files/{body['id']}/content",
                        headers=auth(keys["viewer"]))
    assert content.status_code == 200 and content.content == data
    assert content.headers["content-disposition"].startswith("attachment")
    assert content.headers["x-content-type-options"] == "nosniff"

    part = httpx.get(f"{api_url}/v1/files/{body['id']}/content",
                     headers={**auth(keys["viewer"]), "Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    tail = httpx.get(f"{api_url}/v1/files/{body['id']}/content",
                     headers={**auth(keys["viewer"]), "Range": "bytes=-7"})
    assert tail.status_code == 206 and tail.content == data[-7:]
    outside = httpx.get(f"{api_url}/v1/files/{body['id']}/content",
                        headers={**auth(keys["viewer"]), "Range": f"bytes={len(data)}-"})
    assert outside.status_code == 416
    assert outside.headers["content-range"] == f"bytes */{len(data)}"


def test_the_media_type_comes_from_the_bytes_not_the_header(api_url: str,
                                                           keys: dict[str, str]) -> None:
    spoofed = upload(api_url, keys["submitter"], b"plain words and nothing more\n" * 20,
                     media_type="application/pdf").json()
    assert spoofed["media_type"] == "text/plain"
    assert spoofed["declared_media_type"] == "application/pdf"
    pdf = upload(api_url, keys["submitter"], PDF, media_type="text/plain").json()
    assert pdf["media_type"] == "application/pdf"
    csv = upload(api_url, keys["submitter"], b"word,count\nthe,3\n",
                 media_type="text/csv; charset=utf-8").json()
    assert csv["media_type"] == "text/csv"

    # textonly accepts text/* only: the PDF sent as text/plain is refused by its bytes.
    refused = submit(api_url, keys["submitter"], {"processor": "textonly",
                                                 "input": {"mode": "copy"},
                                                 "files": {"doc": pdf["id"]}})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["field"] == "files.doc" and "application/pdf" in error["message"]
    taken = submit(api_url, keys["submitter"], {"processor": "textonly",
                                               "input": {"mode": "copy"},
                                               "files": {"doc": spoofed["id"]}})
    assert taken.status_code == 202, taken.text
    assert taken.json()["files"] == {"doc": spoofed["id"]}
    httpx.post(f"{api_url}/v1/runs/{taken.json()['id']}/cancel",
               headers=auth(keys["submitter"]))


def test_accepts_caps_size_and_count(api_url: str, keys: dict[str, str]) -> None:
    big = upload(api_url, keys["submitter"], b"a line of text\n" * 5000).json()  # 75 KB
    assert big["size"] > 64 * 1024
    error = submit(api_url, keys["submitter"], {"processor": "textonly",
                                               "input": {"mode": "copy"},
                                               "files": {"big": big["id"]}}).json()["error"]
    assert error["field"] == "files.big" and "cap" in error["message"]
    small = [upload(api_url, keys["submitter"], f"note {i}\n".encode()).json()["id"]
             for i in range(3)]
    error = submit(api_url, keys["submitter"], {
        "processor": "textonly", "input": {"mode": "copy"},
        "files": {f"n{i}": fid for i, fid in enumerate(small)}}).json()["error"]
    assert error["field"] == "files" and "3 files" in error["message"]


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "", "x" * 129, "a\\b",
                                  "sp ace", "nul\x00", "ünï"])
def test_bad_file_names_are_refused(api_url: str, keys: dict[str, str], store: Store,
                                    name: str) -> None:
    file_id = upload(api_url, keys["submitter"], b"names matter\n").json()["id"]
    before = len(store.list_runs(tenant="acme", limit=200)[0])
    response = submit(api_url, keys["submitter"], {"processor": "filework",
                                                  "input": {"mode": "copy"},
                                                  "files": {name: file_id}})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"].startswith("files")
    assert len(store.list_runs(tenant="acme", limit=200)[0]) == before


def test_another_tenants_file_is_not_found_even_by_hash(api_url: str,
                                                        keys: dict[str, str]) -> None:
    data = b"acme's own bytes " + os.urandom(16)
    file_id = upload(api_url, keys["submitter"], data).json()["id"]
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        response = httpx.get(f"{api_url}{path}", headers=auth(keys["other"]))
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    refused = submit(api_url, keys["other"], {"processor": "filework",
                                             "input": {"mode": "copy"},
                                             "files": {"doc": file_id}})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "files.doc"
    # The other tenant uploading the same bytes gets a file of its own: 201, not 200.
    assert upload(api_url, keys["other"], data).status_code == 201


def test_unknown_and_malformed_ids(api_url: str, keys: dict[str, str]) -> None:
    for file_id in ("sha256:" + "0" * 64, "sha256:XYZ", "nothing"):
        response = httpx.get(f"{api_url}/v1/files/{file_id}", headers=auth(keys["viewer"]))
        assert response.status_code == 404
    error = submit(api_url, keys["submitter"], {"processor": "filework",
                                               "input": {"mode": "copy"},
                                               "files": {"doc": "md5:abc"}}).json()["error"]
    assert error["field"] == "files.doc"


def test_a_viewer_cannot_upload(api_url: str, keys: dict[str, str]) -> None:
    assert upload(api_url, keys["viewer"], b"x").status_code == 403


@pytest.fixture
def capped_api(settings: Settings, tmp_path: Path,
               api_with: Any) -> Iterator[tuple[str, Path]]:
    """An API with a 64 KiB file cap and a file store of its own."""
    files = tmp_path / "files"
    yield api_with(file_max_bytes=64 * 1024, file_dir=files), files / settings.instance


def test_an_upload_over_the_cap_is_413_and_keeps_nothing(capped_api: tuple[str, Path],
                                                         keys: dict[str, str]) -> None:
    url, root = capped_api
    exact = upload(url, keys["submitter"], b"e" * 64 * 1024)
    assert exact.status_code == 201, exact.text
    kept = blobs_under(root)
    # Said by the Content-Length: refused before the body is read.
    over = upload(url, keys["submitter"], b"o" * (64 * 1024 + 1))
    assert over.status_code == 413 and over.json()["error"]["code"] == "file_too_large"

    # No Content-Length (chunked): cut off at the cap.
    def body() -> Iterator[bytes]:
        for _ in range(100):
            yield b"c" * 4096

    chunked = httpx.post(f"{url}/v1/files", content=body(), timeout=30,
                         headers={**auth(keys["submitter"]),
                                  "Content-Type": "application/octet-stream"})
    assert chunked.status_code == 413, chunked.text
    assert blobs_under(root) == kept  # nothing of either was kept, not even a temp file


def test_an_api_killed_mid_upload_records_nothing_and_the_sweep_keeps_nothing(
        settings: Settings, tmp_path: Path, keys: dict[str, str], store: Store) -> None:
    files = tmp_path / "files"
    crashed = settings.model_copy(update={"file_dir": files, "file_orphan_grace_seconds": 0})
    api = start_api_process(child_env(crashed), tmp_path / "api.log", name="crash-api")
    assert api.url is not None
    port = int(api.url.rsplit(":", 1)[1])
    root = files / settings.instance
    sent = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Authorization: Bearer {keys['submitter']}\r\n"
                          "Content-Type: application/octet-stream\r\n"
                          f"Content-Length: {64 * 1024 * 1024}\r\n\r\n").encode())
            chunk = os.urandom(1024 * 1024)
            while sent < 8 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
            wait_until(lambda: any(p.stat().st_size > 0 for p in blobs_under(root)),
                       timeout=20, message="the upload never reached the store")
            api.kill(signal.SIGKILL)
    finally:
        api.stop()
    assert blobs_under(root), "the killed upload left its temp file (the sweep's job)"
    with store.session() as session:
        assert session.query(FileRow).filter(FileRow.size == 64 * 1024 * 1024).count() == 0
    reconciler = build_reconciler(crashed, with_docker=False)
    reconciler.sweep_files_now()
    assert blobs_under(root) == []
