"""Files in, artifacts out, end to end: a real API, worker, Docker engine and file
store. Each run uses the `filework` test processor (tests/processors/filework)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import docker
import httpx
import pytest

from runner.client import RunnerClient
from runner.control.blobdb import DatabaseBlobStore
from runner.control.files import FileCatalog
from runner.control.store import Store
from runner.domain import RunStatus
from runner.execution.files import WorkerFiles
from runner.execution.wiring import sandbox_config
from runner.manifest import ManifestSource
from runner.sandbox import Sandbox
from runner.settings import Settings
from tests.integration.conftest import SESSION, WorkerProcess, in_process_executor


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def upload(api_url: str, keys: dict[str, str]) -> Callable[..., str]:
    def go(data: bytes, media_type: str = "application/octet-stream", key: str = "submitter"
           ) -> str:
        response = httpx.post(f"{api_url}/v1/files", content=data, timeout=30,
                              headers={**auth(keys[key]), "Content-Type": media_type})
        assert response.status_code in (200, 201), response.text
        file_id: str = response.json()["id"]
        return file_id
    return go


@pytest.fixture
def run_files(api_url: str, keys: dict[str, str], client: RunnerClient,
              worker: WorkerProcess) -> Callable[..., dict[str, Any]]:
    """Submit a filework run with files (and options), wait for its end, return it."""
    def go(mode: str, files: dict[str, str] | None = None, *, processor: str = "filework",
           wait: bool = True, **fields: Any) -> dict[str, Any]:
        body = {"processor": processor, "input": {"mode": mode, **fields.pop("input", {})},
                "files": files or {}, **fields}
        response = httpx.post(f"{api_url}/v1/runs", json=body, headers=auth(keys["submitter"]),
                              timeout=30)
        assert response.status_code == 202, response.text
        run: dict[str, Any] = response.json()
        return client.wait(run["id"], timeout=120) if wait else run
    return go


def artifact(api_url: str, key: str, run_id: str, name: str, **headers: str
             ) -> httpx.Response:
    return httpx.get(f"{api_url}/v1/runs/{run_id}/artifacts/{name}",
                     headers={**auth(key), **headers}, timeout=30)


def test_files_go_in_read_only_and_come_back_as_artifacts(
        api_url: str, keys: dict[str, str], upload: Callable[..., str],
        run_files: Callable[..., dict[str, Any]]) -> None:
    binary = os.urandom(200 * 1024)
    text = b"one two three\n" * 100
    run = run_files("copy", {"data.bin": upload(binary), "words.txt": upload(text, "text/plain")})
    assert run["status"] == "succeeded", run
    assert run["result"] == {"data.bin": hashlib.sha256(binary).hexdigest(),
                             "words.txt": hashlib.sha256(text).hexdigest()}
    shown = {a["name"]: a for a in run["artifacts"]}
    assert set(shown) == {"copies/data.bin", "copies/words.txt"}
    assert shown["copies/data.bin"]["sha256"] == hashlib.sha256(binary).hexdigest()
    assert shown["copies/words.txt"]["media_type"] == "text/plain"
    assert run["attempts"][-1]["artifacts"] == run["artifacts"]

    got = artifact(api_url, keys["viewer"], run["id"], "copies/data.bin")
    assert got.status_code == 200 and got.content == binary
    assert got.headers["content-disposition"].startswith("attachment")
    part = artifact(api_url, keys["viewer"], run["id"], "copies/data.bin",
                    Range="bytes=100-")
    assert part.status_code == 206 and part.content == binary[100:]
    listed = httpx.get(f"{api_url}/v1/runs/{run['id']}/artifacts",
                       headers=auth(keys["viewer"])).json()
    assert listed["attempt"] == run["attempt"] and len(listed["items"]) == 2
    # Another tenant sees neither the run's artifacts nor their list.
    assert artifact(api_url, keys["other"], run["id"], "copies/data.bin").status_code == 404
    assert httpx.get(f"{api_url}/v1/runs/{run['id']}/artifacts",
                     headers=auth(keys["other"])).status_code == 404
    assert artifact(api_url, keys["viewer"], run["id"], "copies/absent").status_code == 404


def test_a_processor_cannot_write_its_inputs(upload: Callable[..., str],
                                             run_files: Callable[..., dict[str, Any]]) -> None:
    run = run_files("tryin", {"doc.txt": upload(b"do not touch\n", "text/plain")})
    assert run["status"] == "succeeded", run
    report = run["result"]["report"]
    assert len(report) == 4 and not any(line.endswith("allowed") for line in report), report


@pytest.mark.parametrize(("mode", "what"), [("symlink", "link"), ("fifo", "pipe"),
                                            ("hardlink", "link")])
def test_what_is_not_a_regular_file_fails_the_attempt(
        mode: str, what: str, run_files: Callable[..., dict[str, Any]]) -> None:
    run = run_files(mode)
    assert run["status"] == "failed", run
    assert run["error_code"] == "invalid_output"
    assert what in run["error_message"]
    assert run["artifacts"] == []  # nothing of a failed collection is kept


def test_artifacts_at_exactly_the_cap_and_one_byte_over(
        run_files: Callable[..., dict[str, Any]]) -> None:
    cap = 1024 * 1024  # filework's output_bytes
    exact = run_files("sparse", input={"bytes": cap})
    assert exact["status"] == "succeeded", exact
    assert exact["artifacts"][0]["size"] == cap
    over = run_files("sparse", input={"bytes": cap + 1})
    assert over["status"] == "failed" and over["error_code"] == "output_too_large", over
    assert over["artifacts"] == []
    tree = run_files("tree", input={"bytes": 300_000})
    assert tree["status"] == "succeeded", tree
    assert sorted(a["name"] for a in tree["artifacts"]) == ["d1/d2/deep.bin", "d1/mid.bin",
                                                           "top.bin"]
    assert sum(a["size"] for a in tree["artifacts"]) == 300_000


def test_a_failed_attempt_keeps_its_artifacts(api_url: str, keys: dict[str, str],
                                              run_files: Callable[..., dict[str, Any]]) -> None:
    run = run_files("fail")
    assert run["status"] == "failed" and run["error_code"] == "nonzero_exit"
    assert [a["name"] for a in run["artifacts"]] == ["partial.txt"]
    got = artifact(api_url, keys["viewer"], run["id"], "partial.txt")
    assert got.content == b"written before the failure\n"


def test_an_html_artifact_is_never_rendered(api_url: str, keys: dict[str, str],
                                            run_files: Callable[..., dict[str, Any]]) -> None:
    run = run_files("html")
    assert run["status"] == "succeeded", run
    assert run["artifacts"][0]["media_type"] == "text/html"
    got = artifact(api_url, keys["viewer"], run["id"], "report.html")
    assert got.headers["content-type"].startswith("text/html")
    assert got.headers["content-disposition"].startswith('attachment; filename="report.html"')
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers["content-security-policy"]


def test_reuse_hits_the_same_bytes_and_misses_different_ones(
        api_url: str, keys: dict[str, str], upload: Callable[..., str],
        run_files: Callable[..., dict[str, Any]]) -> None:
    note = f"reuse {os.urandom(4).hex()}"
    first_file = upload(f"file of {note}".encode(), "text/plain")
    first = run_files("note", {"f.txt": first_file}, input={"note": note})
    assert first["status"] == "succeeded", first
    hit = run_files("note", {"f.txt": first_file}, input={"note": note}, reuse=True,
                    wait=False)
    assert hit["status"] == "succeeded" and hit["reused_from"] == first["id"]
    assert hit["result"] == first["result"] and hit["artifacts"] == first["artifacts"]
    shown = httpx.get(f"{api_url}/v1/runs/{hit['id']}", headers=auth(keys["viewer"])).json()
    assert shown["attempts"] == [] and shown["artifacts"] == first["artifacts"]
    assert artifact(api_url, keys["viewer"], hit["id"], "note.txt").content == note.encode()
    # A hit of a hit points to the run that really ran.
    again = run_files("note", {"f.txt": first_file}, input={"note": note},
                      reuse={"max_age": "1h"}, wait=False)
    assert again["reused_from"] == first["id"]

    other_file = upload(f"other file of {note}".encode(), "text/plain")
    missed = run_files("note", {"f.txt": other_file}, input={"note": note}, reuse=True,
                       wait=False)
    assert missed["status"] == "queued" and missed["reused_from"] is None
    other_input = run_files("note", {"f.txt": first_file}, input={"note": note + "!"},
                            reuse=True, wait=False)
    assert other_input["reused_from"] is None
    not_asked = run_files("note", {"f.txt": first_file}, input={"note": note}, wait=False)
    assert not_asked["reused_from"] is None
    fresh = run_files("note", {"f.txt": first_file}, input={"note": note}, reuse=True,
                      processor="filework-fresh", wait=False)
    assert fresh["reused_from"] is None  # reusable: false in the manifest
    for run in (missed, other_input, not_asked, fresh):
        httpx.post(f"{api_url}/v1/runs/{run['id']}/cancel", headers=auth(keys["submitter"]))


def test_a_replay_takes_the_same_files(api_url: str, keys: dict[str, str],
                                       client: RunnerClient, upload: Callable[..., str],
                                       run_files: Callable[..., dict[str, Any]]) -> None:
    data = b"replayed bytes\n"
    run = run_files("copy", {"in.txt": upload(data, "text/plain")})
    replay = httpx.post(f"{api_url}/v1/runs/{run['id']}/replay",
                        headers=auth(keys["submitter"])).json()
    assert replay["files"] == run["files"]
    done = client.wait(replay["id"], timeout=120)
    assert done["status"] == "succeeded" and done["result"] == run["result"]


def test_the_database_store_carries_files_in_and_artifacts_out(
        api_with: Callable[..., str], keys: dict[str, str], store: Store,
        settings: Settings, docker_client: docker.DockerClient) -> None:
    """RUNNER_FILE_STORE=database: what hosts sharing only PostgreSQL use. The API
    stores the upload as chunks, an executor (in this process, on a queue no worker
    serves) delivers it and stores the artifact the same way, the API serves it."""
    url = api_with(file_store="database", queue=f"dbstore-{SESSION}")
    data = os.urandom(900 * 1024 + 17)  # under filework's 1 MiB output_bytes
    uploaded = httpx.post(f"{url}/v1/files", content=data, timeout=60,
                          headers={**auth(keys["submitter"]),
                                   "Content-Type": "application/octet-stream"})
    assert uploaded.status_code == 201, uploaded.text
    submitted = httpx.post(f"{url}/v1/runs", headers=auth(keys["submitter"]), timeout=30,
                           json={"processor": "filework", "input": {"mode": "copy"},
                                 "files": {"blob.bin": uploaded.json()["id"]}}).json()
    # The worker's store writes the artifact in 256 KiB chunks: several and a partial.
    catalog = FileCatalog(store, DatabaseBlobStore(store, chunk_bytes=256 * 1024))
    executor = replace(in_process_executor(store, ManifestSource(settings.manifest),
                                           Sandbox(docker_client, sandbox_config(settings))),
                       files=WorkerFiles(catalog))
    status = executor.execute(submitted["id"], 1)
    assert status is RunStatus.SUCCEEDED, store.read_logs_since(submitted["id"], 0, 4096)
    run = httpx.get(f"{url}/v1/runs/{submitted['id']}", headers=auth(keys["viewer"])).json()
    assert run["result"] == {"blob.bin": hashlib.sha256(data).hexdigest()}
    assert [a["name"] for a in run["artifacts"]] == ["copies/blob.bin"]
    got = artifact(url, keys["viewer"], run["id"], "copies/blob.bin")
    assert got.status_code == 200 and got.content == data
    part = artifact(url, keys["viewer"], run["id"], "copies/blob.bin",
                    Range=f"bytes=262140-{len(data) - 3}")  # across chunk ends
    assert part.status_code == 206 and part.content == data[262140:-2]
