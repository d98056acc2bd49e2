"""The API's own pages and document as outside tools see them: /docs renders in a real
browser with no network beyond the API, and a client generated from /openapi.json by
openapi-python-client submits and reads a run (real API, database and worker)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import WorkerProcess

CHROMIUM = os.environ.get("RUNNER_TEST_CHROMIUM", "/usr/bin/chromium")


def test_operations_have_tags_and_short_ids(api_url: str) -> None:
    spec = httpx.get(f"{api_url}/openapi.json").json()
    operations = {op["operationId"]: op.get("tags", [])
                  for path in spec["paths"].values() for op in path.values()}
    assert {"create_run", "get_run", "list_runs", "cancel_run", "replay_run", "get_logs",
            "list_processors", "upload_file", "get_artifact", "readyz"} <= set(operations)
    assert operations["create_run"] == ["runs"] and operations["upload_file"] == ["files"]
    assert operations["list_processors"] == ["processors"]
    assert operations["healthz"] == ["health"]
    assert all(tags for tags in operations.values()), operations


def test_docs_render_with_no_network(api_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import Route, sync_playwright

    api_host = urlsplit(api_url).netloc
    outside: list[str] = []

    def only_the_api(route: Route) -> None:
        if urlsplit(route.request.url).netloc == api_host:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route("**/*", only_the_api)
            page.goto(f"{api_url}/docs")
            page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
            assert "Container runner API" in page.inner_text(".swagger-ui .info .title")
            assert page.locator(".opblock-tag", has_text="runs").count() >= 1
            assert page.locator(".opblock-tag", has_text="files").count() >= 1
            page.screenshot(path=str(tmp_path / "docs.png"))
        finally:
            browser.close()
    assert outside == [], f"/docs fetched from outside: {outside}"


@pytest.fixture
def generated_client(api_url: str, tmp_path: Path) -> Iterator[Any]:
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(f"{api_url}/openapi.json").content)
    generator = Path(sys.executable).parent / "openapi-python-client"
    done = subprocess.run([str(generator), "generate", "--path", str(spec),
                           "--output-path", str(tmp_path / "client"), "--meta", "none"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("client")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "client" or m.startswith("client.")]:
            del sys.modules[name]


def test_a_generated_client_submits_and_reads_a_run(generated_client: Any, api_url: str,
                                                   keys: dict[str, str],
                                                   worker: WorkerProcess) -> None:
    runs = importlib.import_module("client.api.runs")
    create_run = importlib.import_module("client.api.runs.create_run")
    get_run = importlib.import_module("client.api.runs.get_run")
    models = importlib.import_module("client.models")
    assert {"create_run", "get_run", "list_runs"} <= {
        p.stem for p in Path(runs.__file__).parent.glob("*.py")}
    client = generated_client.AuthenticatedClient(base_url=api_url, token=keys["submitter"])
    body = models.RunCreate.from_dict({"processor": "echo", "input": {"message": "generated"}})
    made = create_run.sync(client=client, body=body)
    assert made is not None and made.status.value == "queued", made
    final = get_run.sync(made.id, client=client, wait=30)
    assert final is not None and final.status.value == "succeeded", final
    result = final.result.to_dict() if hasattr(final.result, "to_dict") else final.result
    assert result == {"echo": {"message": "generated"}}
