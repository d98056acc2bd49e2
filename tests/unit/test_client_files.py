"""The client's side of files in, artifacts out, against httpx.MockTransport.

Pure client logic only (what goes on the wire, what lands on disk): uploads stream
in chunks with their Content-Length declared, downloads land whole or not at all,
and an artifact name never walks out of its destination. The real API is exercised
by the integration tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.client import CHUNK_BYTES, ApiError, RunnerClient, artifact_target
from runner.errors import RunnerError

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A handler that records each request, and the chunks its body came in."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []
        self.chunks: list[list[int]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)


class ChunkedMockTransport(httpx.MockTransport):
    """MockTransport reads a request body whole before its handler; this one reads it
    chunk by chunk, as a real transport sends it, and records the chunks' sizes."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(recorder)
        self.recorder = recorder

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sizes, body = [], b""
        for chunk in request.stream:  # type: ignore[union-attr]
            sizes.append(len(chunk))
            body += chunk
        self.recorder.chunks.append(sizes)
        request._content = body  # what request.content answers from now on
        return super().handle_request(request)


def client_for(recorder: Recorder) -> RunnerClient:
    return RunnerClient("http://api.test", "key", transport=ChunkedMockTransport(recorder))


def file_object(request: httpx.Request, status: int = 201) -> httpx.Response:
    digest = hashlib.sha256(request.content).hexdigest()
    return httpx.Response(status, json={
        "id": f"sha256:{digest}", "size": len(request.content), "media_type": "text/plain",
        "declared_media_type": request.headers["Content-Type"],
        "name": request.url.params.get("name"), "created_at": "2026-01-01T00:00:00Z"})


def error(status: int, code: str, message: str, **extra: Any) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message,
                                                  "request_id": "r1", **extra}})


class BrokenStream(httpx.SyncByteStream):
    """A response body that breaks after its first chunk, as a dropped connection does."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        raise httpx.ReadError("connection reset")


# Uploads ---------------------------------------------------------------------------

def test_an_upload_streams_the_file_in_chunks_with_its_length_declared(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 12345)
    path = tmp_path / "book.txt"
    path.write_bytes(data)
    recorder = Recorder(file_object)
    seen: list[tuple[int, int | None]] = []
    with client_for(recorder) as client:
        found = client.upload_file(path, progress=lambda done, total: seen.append((done, total)))
    [request] = recorder.requests
    assert request.method == "POST" and request.url.path == "/v1/files"
    assert request.headers["Content-Length"] == str(len(data))
    assert "Transfer-Encoding" not in request.headers
    assert request.headers["Content-Type"] == "text/plain"  # guessed from the name
    assert request.url.params["name"] == "book.txt"
    assert request.content == data
    # Read from disk a chunk at a time, never whole.
    assert recorder.chunks[0] == [CHUNK_BYTES, CHUNK_BYTES, 12345]
    assert seen == [(CHUNK_BYTES, len(data)), (2 * CHUNK_BYTES, len(data)),
                    (len(data), len(data))]
    assert found["id"] == "sha256:" + hashlib.sha256(data).hexdigest()


def test_an_upload_takes_the_given_name_and_media_type_or_falls_back_to_octet_stream(
        tmp_path: Path) -> None:
    path = tmp_path / "blob.unknownext"
    path.write_bytes(b"x")
    recorder = Recorder(file_object)
    with client_for(recorder) as client:
        client.upload_file(path)
        client.upload_file(path, name="report.pdf", media_type="application/x-mine")
    first, second = recorder.requests
    assert first.headers["Content-Type"] == "application/octet-stream"
    assert second.headers["Content-Type"] == "application/x-mine"
    assert second.url.params["name"] == "report.pdf"


def test_an_upload_of_a_stream_needs_a_size_unless_it_can_seek() -> None:
    recorder = Recorder(file_object)

    class Pipe(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            return 0

    with client_for(recorder) as client:
        with pytest.raises(RunnerError, match="size="):
            client.upload_file(Pipe())  # type: ignore[arg-type]
        stream = io.BytesIO(b"skip:payload")
        stream.seek(5)
        client.upload_file(stream)  # seekable: what is left from where it stands
    assert recorder.requests[0].headers["Content-Length"] == "7"
    assert recorder.requests[0].content == b"payload"
    assert "name" not in recorder.requests[0].url.params


def test_a_stream_shorter_than_its_declared_size_fails_the_upload() -> None:
    recorder = Recorder(file_object)
    with client_for(recorder) as client, pytest.raises(RunnerError, match="ended after 3 of 10"):
        client.upload_file(io.BytesIO(b"abc"), size=10, name="x.txt")


def test_an_upload_over_the_servers_cap_is_an_api_error_with_its_code(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"0" * 100)
    recorder = Recorder(lambda request: error(413, "file_too_large", "over 64 bytes"))
    with client_for(recorder) as client, pytest.raises(ApiError) as caught:
        client.upload_file(path)
    assert caught.value.status == 413 and caught.value.code == "file_too_large"
    assert "over 64 bytes" in caught.value.message


def test_uploading_a_missing_path_or_a_directory_fails_before_any_request(tmp_path: Path) -> None:
    recorder = Recorder(file_object)
    with client_for(recorder) as client:
        with pytest.raises(RunnerError, match="cannot read"):
            client.upload_file(tmp_path / "absent.txt")
        with pytest.raises(RunnerError, match=r"cannot read|not a regular file"):
            client.upload_file(tmp_path)
    assert recorder.requests == []


# Submit with files and reuse -----------------------------------------------------------

def test_submit_sends_files_and_reuse_only_when_given() -> None:
    recorder = Recorder(lambda request: httpx.Response(202, json={"id": "r"}))
    ids = {"text": "sha256:" + "a" * 64}
    with client_for(recorder) as client:
        client.submit("wordcount", {}, files=ids, reuse=True)
        client.submit("wordcount", {}, reuse={"max_age": "1h"})
        client.submit("wordcount", {}, files={}, reuse=False)
    bodies = [json.loads(request.content) for request in recorder.requests]
    assert bodies[0] == {"processor": "wordcount", "input": {}, "files": ids, "reuse": True}
    assert bodies[1] == {"processor": "wordcount", "input": {}, "reuse": {"max_age": "1h"}}
    assert bodies[2] == {"processor": "wordcount", "input": {}}


def test_an_api_error_keeps_the_field_it_names() -> None:
    recorder = Recorder(lambda request: error(422, "invalid_input", "files.text: not text/*",
                                              field="files.text"))
    with client_for(recorder) as client, pytest.raises(ApiError) as caught:
        client.submit("wordcount", {}, files={"text": "sha256:" + "b" * 64})
    assert caught.value.field == "files.text" and caught.value.status == 422


# Downloads ---------------------------------------------------------------------------

def test_an_artifact_lands_under_its_subdirectory_checked_and_whole(tmp_path: Path) -> None:
    data = b"word,count\nthe,3\n"
    recorder = Recorder(lambda request: httpx.Response(
        200, content=data, headers={"Content-Length": str(len(data))}))
    seen: list[tuple[int, int | None]] = []
    with client_for(recorder) as client:
        written = client.download_artifact(
            "run-1", "report/by word #1.csv", tmp_path / "out", attempt=2,
            sha256=hashlib.sha256(data).hexdigest(),
            progress=lambda done, total: seen.append((done, total)))
    assert written == tmp_path / "out" / "report" / "by word #1.csv"
    assert written.read_bytes() == data
    assert os.listdir(written.parent) == ["by word #1.csv"]  # no temporary file left
    [request] = recorder.requests
    assert request.url.raw_path == b"/v1/runs/run-1/artifacts/report/by%20word%20%231.csv?attempt=2"
    assert seen[-1] == (len(data), len(data))


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", "", "a//b",
                                  "./a", "a/.", "a/", "nul\x00byte"])
def test_an_artifact_name_that_would_escape_the_destination_is_refused_unrequested(
        name: str, tmp_path: Path) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, content=b"x"))
    with client_for(recorder) as client, pytest.raises(RunnerError, match="refusing"):
        client.download_artifact("run-1", name, tmp_path / "out")
    assert recorder.requests == []
    assert not (tmp_path / "escape.txt").exists()


def test_an_artifact_name_through_a_symlink_out_of_the_destination_is_refused(
        tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunnerError, match="outside"):
        artifact_target(tmp_path / "out", "link/x.txt")
    assert artifact_target(tmp_path / "out", "sub/x.txt") == tmp_path / "out" / "sub" / "x.txt"


def test_a_broken_download_leaves_the_old_file_and_no_partial_one(tmp_path: Path) -> None:
    target = tmp_path / "counts.csv"
    target.write_bytes(b"old")
    recorder = Recorder(lambda request: httpx.Response(200, stream=BrokenStream(b"new, but")))
    with client_for(recorder) as client, pytest.raises(RunnerError, match="broke"):
        client.download_artifact("run-1", "counts.csv", tmp_path)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["counts.csv"]


def test_a_download_whose_bytes_do_not_match_their_sha256_is_not_kept(tmp_path: Path) -> None:
    recorder = Recorder(lambda request: httpx.Response(200, content=b"tampered"))
    with client_for(recorder) as client, pytest.raises(RunnerError, match="do not match"):
        client.download_artifact("run-1", "a.txt", tmp_path, sha256="0" * 64)
    assert os.listdir(tmp_path) == []


def test_a_download_the_api_refuses_is_an_api_error_and_leaves_nothing(tmp_path: Path) -> None:
    recorder = Recorder(lambda request: error(404, "not_found", "no such artifact"))
    with client_for(recorder) as client, pytest.raises(ApiError) as caught:
        client.download_artifact("run-1", "a.txt", tmp_path / "out")
    assert caught.value.status == 404
    assert os.listdir(tmp_path / "out") == []


def test_file_content_is_checked_against_the_id_it_was_asked_for(tmp_path: Path) -> None:
    data = b"hello"
    file_id = "sha256:" + hashlib.sha256(data).hexdigest()
    recorder = Recorder(lambda request: httpx.Response(200, content=data))
    with client_for(recorder) as client:
        written = client.file_content(file_id, tmp_path / "copy.txt")
        with pytest.raises(RunnerError, match="do not match"):
            client.file_content("sha256:" + "f" * 64, tmp_path / "bad.txt")
    assert written.read_bytes() == data
    assert not (tmp_path / "bad.txt").exists()
    assert recorder.requests[0].url.path == f"/v1/files/{file_id}/content"


def test_file_and_artifact_listings_are_read_with_their_parameters() -> None:
    listing = {"attempt": 1, "items": []}
    recorder = Recorder(lambda request: httpx.Response(
        200, json=listing if "artifacts" in request.url.path else {"id": "sha256:x"}))
    with client_for(recorder) as client:
        assert client.artifacts("run-1") == listing
        assert client.artifacts("run-1", attempt=1) == listing
        client.get_file("sha256:../../v1/keys")
    first, second, third = recorder.requests
    assert "attempt" not in first.url.params and second.url.params["attempt"] == "1"
    # An id cannot walk the path: it stays one segment.
    assert third.url.raw_path == b"/v1/files/sha256:..%2F..%2Fv1%2Fkeys"
