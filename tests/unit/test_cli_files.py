"""`runner files upload`, `submit --file NAME=PATH`, `runs artifacts` (typer's CliRunner),
with the API client on an httpx.MockTransport: what the commands parse, send, print
and write. Bad forms fail before any request, with one `error:` line on stderr.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from runner.cli import app
from runner.cli import files as files_cli
from runner.cli import runs as runs_cli
from runner.cli.progress import Transfers
from runner.client import RunnerClient

cli = CliRunner()
FILE_ID = "sha256:" + "c" * 64


class FakeApi:
    """What the commands asked, and the answers of a tiny in-memory API."""

    def __init__(self, artifacts: dict[str, bytes] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.artifacts = artifacts or {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/files":
            digest = hashlib.sha256(request.content).hexdigest()
            return httpx.Response(201, json={
                "id": f"sha256:{digest}", "size": len(request.content),
                "media_type": "text/plain", "name": request.url.params.get("name"),
                "declared_media_type": request.headers["Content-Type"],
                "created_at": "2026-01-01T00:00:00Z"})
        if path == "/v1/runs":
            return httpx.Response(202, json={"id": "run-1", "status": "queued",
                                             **json.loads(request.content)})
        if path == "/v1/runs/run-1/artifacts":
            return httpx.Response(200, json={"attempt": 2, "items": [
                {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "media_type": "text/csv"} for name, data in sorted(self.artifacts.items())]})
        prefix = "/v1/runs/run-1/artifacts/"
        if path.startswith(prefix) and path[len(prefix):] in self.artifacts:
            return httpx.Response(200, content=self.artifacts[path[len(prefix):]])
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "nope",
                                                   "request_id": "r"}})

    def sent(self, path: str) -> list[httpx.Request]:
        return [request for request in self.requests if request.url.path == path]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    make: Callable[[], Any] = lambda: RunnerClient(  # noqa: E731
        "http://api.test", "key", transport=httpx.MockTransport(fake))
    monkeypatch.setattr(runs_cli, "api_client", make)
    monkeypatch.setattr(files_cli, "api_client", make)
    return fake


@pytest.fixture
def book(tmp_path: Path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text("the cat and the hat\n")
    return path


def test_files_upload_prints_the_file_object(api: FakeApi, book: Path) -> None:
    result = cli.invoke(app, ["files", "upload", str(book), "--media-type", "text/x-book"])
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["id"] == "sha256:" + hashlib.sha256(book.read_bytes()).hexdigest()
    assert printed["name"] == "book.txt"
    [sent] = api.sent("/v1/files")
    assert sent.headers["Content-Type"] == "text/x-book"


def test_submit_uploads_each_file_then_names_its_id_in_the_run(api: FakeApi, book: Path) -> None:
    result = cli.invoke(app, ["submit", "wordcount", "--file", f"text={book}",
                              "--file", f"again={FILE_ID}", "--reuse-max-age", "1h"])
    assert result.exit_code == 0, result.stderr
    assert len(api.sent("/v1/files")) == 1  # an id is used as it is, not uploaded
    [run] = api.sent("/v1/runs")
    body = json.loads(run.content)
    digest = hashlib.sha256(book.read_bytes()).hexdigest()
    assert body["files"] == {"text": f"sha256:{digest}", "again": FILE_ID}
    assert body["reuse"] == {"max_age": "1h"}
    assert [request.url.path for request in api.requests] == ["/v1/files", "/v1/runs"]


def test_submit_without_files_sends_neither_files_nor_reuse(api: FakeApi) -> None:
    assert cli.invoke(app, ["submit", "echo"]).exit_code == 0
    assert cli.invoke(app, ["submit", "echo", "--reuse"]).exit_code == 0
    first, second = (json.loads(request.content) for request in api.sent("/v1/runs"))
    assert "files" not in first and "reuse" not in first
    assert second["reuse"] is True


@pytest.mark.parametrize(("option", "says"), [
    ("text", "must be NAME=PATH"),
    ("=book.txt", "must be NAME=PATH"),
    ("text=", "must be NAME=PATH"),
    (".hidden={book}", "not start with a dot"),
    ("a/b={book}", "1-128 of"),
    ("{long}={book}", "1-128 of"),
    ("text={missing}", "is not a file"),
    ("text={dir}", "is not a file"),
])
def test_a_bad_file_option_is_one_error_line_before_any_request(
        option: str, says: str, api: FakeApi, book: Path, tmp_path: Path) -> None:
    value = option.format(book=book, long="n" * 129, missing=tmp_path / "absent.txt",
                          dir=tmp_path)
    result = cli.invoke(app, ["submit", "wordcount", "--file", value])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert api.requests == []


def test_a_name_given_twice_is_refused(api: FakeApi, book: Path) -> None:
    result = cli.invoke(app, ["submit", "wordcount", "--file", f"text={book}",
                              "--file", f"text={book}"])
    assert result.exit_code == 1 and "given twice" in result.stderr
    assert api.requests == []


def test_file_names_of_the_api_rule_parse() -> None:
    assert files_cli.RUN_FILE_NAME.fullmatch("a" * 128)
    for good in ("text", "my-file_1.csv", "_x", "-x"):
        assert files_cli.RUN_FILE_NAME.fullmatch(good), good
    for bad in ("", ".x", "a b", "a/b", "é", "a" * 129):
        assert not files_cli.RUN_FILE_NAME.fullmatch(bad), bad


def test_runs_artifacts_lists_them_one_line_each(api: FakeApi) -> None:
    api.artifacts = {"counts.csv": b"word,count\n", "sub/more.csv": b"x\n"}
    result = cli.invoke(app, ["runs", "artifacts", "run-1"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[-1] for line in lines] == ["counts.csv", "sub/more.csv"]
    assert lines[0].split()[:2] == ["11", "text/csv"]
    as_json = cli.invoke(app, ["runs", "artifacts", "run-1", "--json"])
    assert json.loads(as_json.stdout)["attempt"] == 2


def test_runs_artifacts_download_keeps_subdirectories_and_the_listed_attempt(
        api: FakeApi, tmp_path: Path) -> None:
    api.artifacts = {"counts.csv": b"word,count\nthe,2\n", "deep/er/more.csv": b"x\n"}
    result = cli.invoke(app, ["runs", "artifacts", "run-1", "--download", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "counts.csv").read_bytes() == b"word,count\nthe,2\n"
    assert (tmp_path / "out" / "deep" / "er" / "more.csv").read_bytes() == b"x\n"
    assert result.stdout.splitlines() == [str(tmp_path / "out" / "counts.csv"),
                                          str(tmp_path / "out" / "deep" / "er" / "more.csv")]
    downloads = [r for r in api.requests if r.url.path.startswith("/v1/runs/run-1/artifacts/")]
    assert {r.url.params["attempt"] for r in downloads} == {"2"}


def test_runs_artifacts_download_refuses_an_escaping_name_before_writing_anything(
        api: FakeApi, tmp_path: Path) -> None:
    api.artifacts = {"a.csv": b"1", "../escape.csv": b"2"}
    result = cli.invoke(app, ["runs", "artifacts", "run-1", "--download", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: refusing artifact name '../escape.csv'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.csv").exists()


def test_an_api_error_is_one_line_and_exit_1(api: FakeApi) -> None:
    result = cli.invoke(app, ["runs", "artifacts", "nope"])
    assert result.exit_code == 1
    assert result.stderr == "error: nope (HTTP 404, not_found)\n"


def test_a_progress_bar_appears_only_on_a_terminal_and_from_one_mebibyte() -> None:
    with Transfers(enabled=False) as off:
        off.track("big")(10, 10 * 1024 * 1024)
        assert off._bars is None
    with Transfers(enabled=True) as on:
        on.track("small")(10, 1024 * 1024 - 1)
        on.track("unknown")(10, None)
        assert on._bars is None
        on.track("big")(10, 1024 * 1024)
        assert on._bars is not None
        [task] = on._bars.tasks
        assert task.description == "big" and task.completed == 10
    assert on._bars is None  # stopped on exit
