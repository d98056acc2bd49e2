"""Webhook rules: which URLs a run may carry (and at submission, replay and in the
fingerprint), the SSRF decision, signing (and the receiver's check in docs/api.md), the
backoff, and the body's run object against the API's. The outbox and the sender are
tests/unit/test_webhook_outbox.py."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from typer.testing import CliRunner

from api.schemas import RunOut
from runner.authoring.devstack import DevStack
from runner.cli import app
from runner.cli import runs as runs_cli
from runner.client import RunnerClient
from runner.control.delivery import WebhookSender
from runner.control.lifecycle import ClaimStatus, Lifecycle
from runner.control.models import WebhookDeliveryRow
from runner.control.outbox import WAITING, WebhookStatus, ended_run, webhook_status
from runner.control.runs import Submission, replay, submit
from runner.control.store import Store
from runner.control.webhooks import (
    WebhookRules,
    backoff_seconds,
    delivery_body,
    pick_target,
    run_document,
    signature,
    signature_valid,
)
from runner.domain import Artifact, Finish, Run, RunStatus
from runner.errors import InvalidRequestError
from runner.manifest import Manifest
from runner.settings import load_settings
from tests.unit.conftest import NewRunMaker, set_run
from tests.unit.test_cli_files import FakeApi

SECRET = "s3cret"
HOOK = "http://127.0.0.1:9000/hooks/runs"
RULES = WebhookRules(prefixes=("http://127.0.0.1:", "https://hooks.example.com/"),
                     signed=True)
PUBLIC = "93.184.216.34"


def deliveries(store: Store, run_id: str | None = None) -> list[WebhookDeliveryRow]:
    with store.session() as session:
        query = select(WebhookDeliveryRow)
        if run_id is not None:
            query = query.where(WebhookDeliveryRow.run_id == run_id)
        return list(session.scalars(query))


def running(lifecycle: Lifecycle, run: Run) -> Run:
    got = lifecycle.claim(run.id, attempt=run.attempt + 1, worker_id="w", lease_seconds=60)
    assert got.status is ClaimStatus.CLAIMED and got.run is not None
    return got.run


def hooked(store: Store, new_run: NewRunMaker, url: str = HOOK, **fields: Any) -> Run:
    """A queued run whose webhook_url is HOOK (or `url`)."""
    run = new_run(**fields)
    set_run(store, run.id, webhook_url=url)
    return run


def ended_hook(store: Store, new_run: NewRunMaker, url: str = HOOK) -> Run:
    """A run with a webhook that ended (canceled while queued): one pending delivery."""
    run = hooked(store, new_run, url)
    Lifecycle(store).cancel(run.id, tenant=None)
    return run


# The URL rules ------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:9000/hook", None),
    ("http://127.0.0.1:1/", None),
    ("https://hooks.example.com/a/b?c=d", None),
    ("https://hooks.example.com.evil.net/", "not under any URL prefix"),
    ("https://hooks.example.com:8443/", "not under any URL prefix"),
    ("http://127.0.0.10:9000/", "not under any URL prefix"),
    ("http://127.0.0.1:9000@evil.net/", "user or password"),
    ("https://user:pw@hooks.example.com/", "user or password"),
    ("https://hooks.example.com/#frag", "fragment"),
    ("ftp://hooks.example.com/", "http:// or https://"),
    ("https://hooks.example.com/a b", "printable ASCII"),
    ("https://hooks.example.com\\@evil.net/", "backslashes"),
    ("https://hooks.example.com/é", "printable ASCII"),
    ("http://127.0.0.1:99999/", "invalid port"),
    ("http://[::1/", "is not a URL"),
    ("http:///path", "has no host"),
    ("https://hooks.example.com/" + "a" * 2030, "over 2048"),
])
def test_a_webhook_url_is_checked_against_the_rules_and_the_allowlist(
        url: str, problem: str | None) -> None:
    if problem is None:
        assert RULES.check(url) == url
        return
    with pytest.raises(InvalidRequestError) as caught:
        RULES.check(url)
    assert problem in caught.value.message
    assert caught.value.context["field"] == "webhook_url"


def test_without_an_allowlist_or_a_secret_every_webhook_url_is_refused() -> None:
    for rules, says in ((WebhookRules(signed=True), "RUNNER_WEBHOOK_ALLOWED_URLS"),
                        (WebhookRules(prefixes=("http://127.0.0.1:",)),
                         "RUNNER_WEBHOOK_SECRET")):
        with pytest.raises(InvalidRequestError) as caught:
            rules.check(HOOK)
        assert says in caught.value.message
        assert caught.value.context["field"] == "webhook_url"


def test_rules_and_the_sender_come_from_the_settings(store: Store) -> None:
    on = load_settings(webhook_allowed_urls="http://127.0.0.1:, https://h.example/",
                       webhook_secret=SecretStr(SECRET))
    assert WebhookRules.from_settings(on) == WebhookRules(
        ("http://127.0.0.1:", "https://h.example/"), True)
    assert WebhookSender.from_settings(store, on) is not None
    assert WebhookSender.from_settings(store, load_settings(
        webhook_allowed_urls="http://127.0.0.1:")) is None
    assert WebhookSender.from_settings(store, load_settings(
        webhook_secret=SecretStr(SECRET))) is None


# Where a delivery may connect ---------------------------------------------------------

def resolving(*addresses: str) -> Callable[[str, int], list[str]]:
    return lambda _host, _port: list(addresses)


def unresolvable(host: str, _port: int) -> list[str]:
    raise OSError(f"no such host {host}")


@pytest.mark.parametrize(("host", "prefix", "resolve", "verdict"), [
    ("hooks.example.com", "https://hooks.example.com/", resolving(PUBLIC), PUBLIC),
    ("hooks.example.com", "https://hooks.example.com/", resolving("10.0.0.5"), "private"),
    ("hooks.example.com", "https://hooks.example.com/",
     resolving(PUBLIC, "127.0.0.1"), "loopback"),
    ("hooks.example.com", "https://hooks.example.com/",
     resolving("169.254.169.254"), "link-local"),
    ("hooks.example.com", "https://hooks.example.com/", resolving("::ffff:10.0.0.1"),
     "private"),
    ("hooks.example.com", "https://hooks.example.com/", resolving("0.0.0.0"),
     "unspecified"),
    ("hooks.example.com", "https://hooks.example.com/", resolving("224.0.0.1"),
     "multicast"),
    ("hooks.example.com", "https://hooks.example.com/", resolving("100.64.0.1"),
     "non-global"),
    ("hooks.example.com", "https://hooks.example.com/", resolving("fe80::1%eth0"),
     "link-local"),
    ("hooks.example.com", "https://hooks.example.com/", unresolvable, "cannot resolve"),
    ("hooks.example.com", "https://hooks.example.com/", resolving(), "no address"),
    # The operator named the address itself: its choice, loopback or private.
    ("127.0.0.1", "http://127.0.0.1:", resolving("127.0.0.1"), "127.0.0.1"),
    ("10.0.0.5", "http://10.0.0.5/", resolving("10.0.0.5"), "10.0.0.5"),
    ("::1", "http://[::1]:8000/", resolving("::1"), "::1"),
    ("localhost", "http://localhost:", resolving("127.0.0.1", "::1"), "127.0.0.1"),
    ("localhost", "http://localhost:", resolving("10.0.0.5"), "not a loopback"),
])
def test_the_resolved_addresses_decide_where_a_delivery_may_connect(
        host: str, prefix: str, resolve: Callable[[str, int], list[str]],
        verdict: str) -> None:
    target = pick_target(host, 443, prefix=prefix, resolve=resolve)
    if target.address is not None:
        assert target.address == verdict and target.refused is None
    else:
        assert target.refused is not None and verdict in target.refused


# Signing and the backoff --------------------------------------------------------------

def test_the_signature_is_an_hmac_of_the_timestamp_and_the_body() -> None:
    body = b'{"event":"run.finished"}'
    header = signature(SECRET, body, timestamp=1_700_000_000)
    mac = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={mac}"
    assert signature_valid(header, body, SECRET, now=1_700_000_100)
    assert not signature_valid(header, body + b" ", SECRET, now=1_700_000_100)
    assert not signature_valid(header, body, "other", now=1_700_000_100)
    assert not signature_valid(header, body, SECRET, now=1_700_000_301)  # too old
    assert not signature_valid("v1=" + mac, body, SECRET, now=1_700_000_000)


def test_the_receivers_check_in_docs_api_md_accepts_what_the_sender_signs() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    snippet = text.split("Checking a delivery", 1)[1].split("```python\n", 1)[1]
    code = snippet.split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10
    scope: dict[str, Any] = {}
    exec(code, scope)  # our own documentation, run as written
    body = b'{"event":"run.finished","run":{}}'
    header = signature(SECRET, body, timestamp=int(time.time()))
    assert scope["verify"](body, header, SECRET)
    assert not scope["verify"](body + b" ", header, SECRET)
    assert not scope["verify"](body, signature(SECRET, body, timestamp=int(time.time()) - 301),
                               SECRET)
    assert not scope["verify"](body, "v1=abc", SECRET)


def test_the_backoff_doubles_from_its_base_to_its_cap_with_jitter() -> None:
    longest = [backoff_seconds(n, base=5, cap=3600, rng=lambda: 1.0) for n in range(1, 13)]
    shortest = [backoff_seconds(n, base=5, cap=3600, rng=lambda: 0.0) for n in range(1, 13)]
    assert longest == [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
    assert shortest == [x / 2 for x in longest]


# Submission and replay ----------------------------------------------------------------

class Queue:
    """What `submit` asks of the queue: one `enqueue` per recorded run."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []

    def enqueue(self, run: Run, *, stop_grace_seconds: float) -> None:
        self.enqueued.append(run.id)


def test_submit_checks_and_keeps_the_webhook_url_and_replay_carries_it(
        store: Store, manifest: Manifest) -> None:
    queue = Queue()
    options: dict[str, Any] = {"manifest": manifest, "store": store, "queue": queue,
                               "default_queue": "q", "stop_grace_seconds": 1}
    with pytest.raises(InvalidRequestError) as caught:
        submit(Submission(tenant="t", processor="echo", version=None, input={},
                          webhook_url="http://evil.example/"), webhook_rules=RULES,
               **options)
    assert caught.value.context["field"] == "webhook_url"
    assert store.list_runs(tenant="t")[0] == []
    run = submit(Submission(tenant="t", processor="echo", version=None, input={},
                            webhook_url=HOOK), webhook_rules=RULES, **options)
    status = webhook_status(store, run.id)
    assert status is not None and (status.url, status.state) == (HOOK, WAITING)
    Lifecycle(store).cancel(run.id, tenant=None)
    again = replay(run.id, tenant="t", webhook_rules=RULES, **options)
    assert again.replay_of == run.id
    assert webhook_status(store, again.id) == WebhookStatus(url=HOOK, state=WAITING)
    with pytest.raises(InvalidRequestError):  # no longer allowed: refused like a submit
        replay(run.id, tenant="t", webhook_rules=WebhookRules(), **options)


def test_the_webhook_url_is_in_the_fingerprint_only_when_set() -> None:
    plain = Submission(tenant="t", processor="echo", version=None, input={"a": 1})
    body = {"processor": "echo", "version": None, "input": {"a": 1},
            "timeout_seconds": None, "labels": {}}
    assert plain.fingerprint() == hashlib.sha256(
        json.dumps(body, sort_keys=True).encode()).hexdigest()
    hooked = Submission(tenant="t", processor="echo", version=None, input={"a": 1},
                        webhook_url=HOOK)
    assert hooked.fingerprint() != plain.fingerprint()


# The body ------------------------------------------------------------------------------

def test_the_body_carries_the_run_object_with_the_apis_field_names_and_values(
        store: Store, lifecycle: Lifecycle, new_run: NewRunMaker) -> None:
    run = running(lifecycle, hooked(store, new_run, labels={"team": "data"}))
    artifact = Artifact("out/a.csv", 3, "d" * 64, "text/csv")
    assert lifecycle.finish(run.id, 1, Finish(RunStatus.SUCCEEDED, exit_code=0,
                                              result={"n": 1}, artifacts=(artifact,)))
    found = ended_run(store, run.id)
    assert found is not None
    ended, artifacts = found
    document = run_document(ended, artifacts)
    api_only = {"attempts", "last_log_lines", "provenance", "webhook"}
    assert set(document) == set(RunOut.model_fields) - api_only
    shown = RunOut.of(ended, artifacts=[a.public() for a in artifacts]).model_dump(
        mode="json")
    assert document == {k: v for k, v in shown.items() if k not in api_only}
    body = json.loads(delivery_body(ended, artifacts))
    assert body == {"event": "run.finished", "run": document}


# The client, the command line and the dev stack ----------------------------------------

def test_the_dev_stack_allows_loopback_receivers_with_a_secret_it_keeps(
        tmp_path: Path) -> None:
    def written() -> dict[str, str]:
        unset = load_settings(webhook_allowed_urls="", webhook_secret=SecretStr(""))
        stack = DevStack(unset, root=tmp_path, say=lambda _line: None)
        stack._write_env("rk_key")
        lines = stack.env_file.read_text().splitlines()
        return dict(line.removeprefix("export ").split("=", 1) for line in lines
                    if line.startswith("export RUNNER_WEBHOOK_"))

    first, second = written(), written()
    assert first["RUNNER_WEBHOOK_ALLOWED_URLS"] == "http://127.0.0.1:,http://localhost:"
    assert len(first["RUNNER_WEBHOOK_SECRET"]) == 64 and first == second
    secret_file = tmp_path / "var" / "dev" / "webhook-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert load_settings(webhook_allowed_urls=first["RUNNER_WEBHOOK_ALLOWED_URLS"])



def test_submit_sends_the_webhook_url_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeApi()
    monkeypatch.setattr(runs_cli, "api_client", lambda: RunnerClient(
        "http://api.test", "key", transport=httpx.MockTransport(fake)))
    cli = CliRunner()
    assert cli.invoke(app, ["submit", "echo", "--webhook-url", HOOK]).exit_code == 0
    assert cli.invoke(app, ["submit", "echo"]).exit_code == 0
    first, second = (json.loads(r.content) for r in fake.sent("/v1/runs"))
    assert first["webhook_url"] == HOOK and "webhook_url" not in second
