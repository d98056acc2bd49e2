"""Webhooks end to end: real API and worker processes, the real database and Docker, and a
real HTTP receiver on loopback. A run's end is POSTed signed, with the run object; a
receiver that is down is retried until it is up; a delivery written while no sender
ran, or by the reconciler after a worker was SIGKILLed, is sent by the next process
that has a sender; a webhook_url outside the allowlist is refused; over https the
sender connects to the address it checked and still verifies the host's certificate.

Every test has its own queue and receiver; workers here get the webhook settings only
when the test says so (`sender=True`), so which process sends is always known.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from api.app import create_app
from api.deps import Services
from runner.client import ApiError, RunnerClient
from runner.control.delivery import WebhookSender
from runner.control.outbox import webhook_status
from runner.domain import NewRun
from runner.settings import Settings
from tests.integration.conftest import SESSION
from tests.support.memdb import MemDatabases
from tests.support.net import free_port
from tests.support.processes import WorkerProcess
from tests.support.services import ApiServer
from tests.support.waiting import wait_until

SECRET = "integration-secret"


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook receiver: http.server on 127.0.0.1:`port` in a thread, once `up()`.
    It keeps every POST and answers the next of `answers` (then 200)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.posts: list[Post] = []
        self.answers: list[int] = []
        self.sni: list[str] = []
        self._server: ThreadingHTTPServer | None = None

    def up(self, tls: ssl.SSLContext | None = None) -> None:
        """Listen (over TLS with `tls`); `sni` keeps the server names clients sent."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append(Post(self.path, dict(self.headers.items()), body))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name or "")
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.down()


@pytest.fixture
def hooks(rel_settings: Settings, receiver: Receiver) -> Settings:
    """The reliability stack's settings (short leases) on a queue of the test's own,
    with webhooks allowed to the receiver and signed with SECRET."""
    name = f"hooks-{SESSION}-{receiver.port}"
    return rel_settings.model_copy(update={
        "queue": name, "worker_id": name, "webhook_secret": SecretStr(SECRET),
        "webhook_allowed_urls": f"{receiver.url}/", "webhook_poll_seconds": 0.2})


StartApi = Callable[..., str]


@pytest.fixture
def start_api(hooks: Settings) -> Iterator[StartApi]:
    """An API on `hooks` in this process: with its own sender (`backoff` = its base,
    doubling up to twice that), or with none (`sender=False`)."""
    servers: list[ApiServer] = []

    def go(*, sender: bool = True, backoff: float | None = None) -> str:
        services = Services.build(hooks)
        if not sender or backoff is not None:
            services.webhooks = None
        if sender and backoff is not None:
            services.webhooks = WebhookSender.from_settings(
                services.store, hooks, backoff_base=backoff, backoff_cap=2 * backoff)
            assert services.webhooks is not None
            services.lifecycle.listeners.append(services.webhooks.wake)
        server = ApiServer(hooks, app=create_app(hooks, services))
        servers.append(server)
        return server.url

    yield go
    for server in servers:
        server.stop()


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_hook_worker(hooks: Settings, tmp_path: Path) -> Iterator[StartWorker]:
    """Worker processes on the test's queue; `sender=True` gives one the webhook
    settings (and so a sender), otherwise it has none."""
    started: list[WorkerProcess] = []

    def go(name: str, *, sender: bool = False, faults: tuple[str, ...] = ()
           ) -> WorkerProcess:
        env = {"RUNNER_WEBHOOK_ALLOWED_URLS": hooks.webhook_allowed_urls if sender else "",
               "RUNNER_WEBHOOK_SECRET": SECRET if sender else "",
               "RUNNER_WEBHOOK_POLL_SECONDS": "0.2"}
        settings = hooks.model_copy(update={"worker_id": f"{hooks.worker_id}-{name}"})
        process = WorkerProcess(settings, tmp_path / f"{name}.log", env=env, faults=faults)
        started.append(process)
        return process

    yield go
    for process in started:
        process.stop()


def signed_by_secret(post: Post) -> bool:
    stamp, _, mac = post.headers["Runner-Signature"].removeprefix("t=").partition(",v1=")
    expected = hmac.new(SECRET.encode(), f"{stamp}.".encode() + post.body,
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, mac)


def webhook_of(client: RunnerClient, run_id: str, state: str) -> dict[str, Any]:
    """The run's `webhook` once it is in `state`."""
    seen: list[Any] = []

    def reached() -> dict[str, Any] | None:
        hook = client.run(run_id)["webhook"]
        seen[:] = [hook]
        return hook if hook and hook["state"] == state else None

    return wait_until(reached, timeout=60, message=lambda: f"webhook is {seen}, not {state}")


def test_a_run_end_is_posted_once_signed_with_the_run_object(
        start_api: StartApi, start_hook_worker: StartWorker, receiver: Receiver,
        keys: dict[str, str]) -> None:
    receiver.up()
    api = start_api()
    start_hook_worker("plain")
    with RunnerClient(api, keys["submitter"]) as client:
        url = f"{receiver.url}/in?source=runner"
        run = client.submit("rel-echo", {"message": "hello"}, webhook_url=url)
        assert run["webhook"] == {"url": url, "state": "waiting", "attempts": 0,
                                  "last_status_code": None, "last_error": None,
                                  "next_attempt_at": None, "delivered_at": None}
        hook = webhook_of(client, run["id"], "delivered")
        final = client.run(run["id"])
    assert hook["attempts"] == 1 and hook["last_status_code"] == 200
    [post] = receiver.posts  # delivered: no sender sends it again
    assert post.path == "/in?source=runner"
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["User-Agent"].startswith("container-runner/")
    assert post.headers["Host"] == f"127.0.0.1:{receiver.port}"
    assert len(post.headers["Runner-Delivery"]) == 36
    assert signed_by_secret(post)
    body = json.loads(post.body)
    assert body["event"] == "run.finished"
    shown = {k: v for k, v in final.items()
             if k not in ("attempts", "last_log_lines", "provenance", "webhook")}
    assert body["run"] == shown
    assert body["run"]["status"] == "succeeded"
    assert body["run"]["result"] == {"echo": {"message": "hello"}}
    metrics = httpx.get(f"{api}/metrics").text
    assert 'runner_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics


def test_a_receiver_that_is_down_gets_the_delivery_once_it_is_up(
        start_api: StartApi, start_hook_worker: StartWorker, receiver: Receiver,
        keys: dict[str, str]) -> None:
    api = start_api(backoff=0.2)
    start_hook_worker("plain")
    with RunnerClient(api, keys["submitter"]) as client:
        run = client.submit("rel-echo", {}, webhook_url=f"{receiver.url}/down")

        def refused_twice() -> dict[str, Any] | None:
            hook = client.run(run["id"])["webhook"]
            return hook if hook["attempts"] >= 2 else None

        hook = wait_until(refused_twice, timeout=60, message="no attempts while down")
        assert hook["state"] == "pending" and hook["last_status_code"] is None
        assert "ConnectError" in hook["last_error"] and hook["next_attempt_at"]
        receiver.answers = [503]  # up, but not well yet
        receiver.up()
        done = webhook_of(client, run["id"], "delivered")
    assert done["last_status_code"] == 200 and done["last_error"] is None
    assert done["attempts"] >= 4
    first, second = receiver.posts
    assert first.headers["Runner-Delivery"] == second.headers["Runner-Delivery"]
    assert signed_by_secret(second)
    metrics = httpx.get(f"{api}/metrics").text
    assert 'runner_webhook_deliveries_total{outcome="retry"}' in metrics


def test_a_delivery_recorded_while_no_sender_ran_is_sent_by_the_next_one(
        start_api: StartApi, start_hook_worker: StartWorker, receiver: Receiver,
        keys: dict[str, str]) -> None:
    receiver.up()
    api = start_api(sender=False)  # as if the API that ended it was killed before sending
    start_hook_worker("plain")
    with RunnerClient(api, keys["submitter"]) as client:
        run = client.submit("rel-echo", {}, webhook_url=f"{receiver.url}/later")
        assert client.wait(run["id"], timeout=60)["status"] == "succeeded"
        hook = client.run(run["id"])["webhook"]
        assert (hook["state"], hook["attempts"]) == ("pending", 0)  # no sender anywhere
        start_hook_worker("sender", sender=True)
        webhook_of(client, run["id"], "delivered")
    [post] = receiver.posts
    assert json.loads(post.body)["run"]["id"] == run["id"] and signed_by_secret(post)


def test_a_run_taken_back_from_a_killed_worker_is_delivered(
        start_api: StartApi, start_hook_worker: StartWorker, receiver: Receiver,
        keys: dict[str, str]) -> None:
    receiver.up()
    api = start_api(sender=False)
    doomed = start_hook_worker("doomed", faults=("after_container_exit",))
    with RunnerClient(api, keys["submitter"]) as client:
        run = client.submit("exit", {"code": 0}, webhook_url=f"{receiver.url}/lost")
        wait_until(lambda: not doomed.alive(), timeout=60, message="the worker lived")
        # The next worker's reconciler ends the run (worker_lost, in the same write as
        # the delivery's row) and its sender sends it.
        start_hook_worker("heir", sender=True)
        webhook_of(client, run["id"], "delivered")
    [post] = receiver.posts
    sent = json.loads(post.body)["run"]
    assert (sent["status"], sent["error_code"]) == ("dead_letter", "worker_lost")


def test_a_webhook_url_outside_the_allowlist_or_without_a_secret_is_refused(
        start_api: StartApi, api_with: Callable[..., str], receiver: Receiver,
        keys: dict[str, str]) -> None:
    api = start_api(sender=False)
    unsigned = api_with(webhook_allowed_urls=f"{receiver.url}/")
    for url, where, says in (
            (api, "http://169.254.169.254/latest", "not under any URL prefix"),
            (api, f"http://user:pw@127.0.0.1:{receiver.port}/", "user or password"),
            (unsigned, f"{receiver.url}/x", "RUNNER_WEBHOOK_SECRET")):
        with RunnerClient(url, keys["submitter"]) as client, pytest.raises(ApiError) as caught:
            client.submit("rel-echo", {}, webhook_url=where)
        error = caught.value
        assert (error.status, error.code, error.field) == (422, "invalid_request",
                                                           "webhook_url")
        assert says in str(error)


def certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for the host `name` (openssl)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}"], check=True,
                   capture_output=True)
    return cert, key


@pytest.mark.parametrize("served_as", ["localhost", "other.test"])
def test_https_goes_to_the_checked_address_and_checks_the_hosts_certificate(
        tmp_path: Path, served_as: str) -> None:
    """The sender connects to the address it resolved and judged (127.0.0.1), with the
    URL's host as TLS server name: a certificate for that name passes, another fails."""
    cert, key = certificate(tmp_path, served_as)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    receiver = Receiver()
    receiver.up(tls)
    trusted = ssl.create_default_context(cafile=str(cert))
    url = f"https://localhost:{receiver.port}/tls"
    databases = MemDatabases()
    try:
        with databases.fresh() as store:
            run, _ = store.create_run(NewRun(  # a reuse hit: created ended, with its row
                tenant="t", processor="echo", version="1", image="r@sha256:" + "a" * 64,
                queue="q", input={}, timeout_seconds=30, max_attempts=1,
                manifest_revision="rev", reused_from="0" * 36), webhook_url=url)
            sender = WebhookSender(store, prefixes=[f"https://localhost:{receiver.port}/"],
                                   secret=SECRET, backoff_base=60,
                                   resolve=lambda _host, _port: ["127.0.0.1"],
                                   transport=httpx.HTTPTransport(verify=trusted))
            assert sender.run_once() == 1
            status = webhook_status(store, run.id)
    finally:
        receiver.down()
        databases.close()
    assert status is not None and receiver.sni == ["localhost"]
    if served_as == "localhost":
        assert status.state == "delivered" and status.last_status_code == 200
        [post] = receiver.posts
        assert post.headers["Host"] == f"localhost:{receiver.port}" and signed_by_secret(post)
    else:
        assert status.state == "pending" and receiver.posts == []
        assert "CERTIFICATE_VERIFY_FAILED" in (status.last_error or "")
