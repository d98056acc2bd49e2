"""Retries, dead letters, replay, cancel, idempotency, caps and the container sweep."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml

from runner.client import ApiError, RunnerClient
from runner.control.keys import Keys
from runner.control.lanes import lane_key
from runner.control.lifecycle import ClaimStatus, Lifecycle
from runner.control.queue import STARTED_HOLD_SECONDS, RunQueue, job_id
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.domain import ErrorCode, Finish, NewRun, Run, RunStatus
from runner.execution.wiring import build_reconciler
from runner.manifest import load_manifest
from runner.manifest.yamlio import dump_manifest
from runner.sandbox import ATTEMPT_LABEL, INSTANCE_LABEL, MANAGED_LABEL, RUN_LABEL, WORKER_LABEL
from runner.settings import Settings
from tests.integration.conftest import SESSION, containers_left
from tests.integration.reliability import DockerProxy, submit_rel, wait_for, wait_terminal
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_until

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def docker_proxy(tmp_path: Path) -> Iterator[DockerProxy]:
    proxy = DockerProxy(Path(f"/tmp/runner-docker-{uuid.uuid4().hex[:8]}.sock"))
    proxy.up()
    yield proxy
    proxy.down()


def test_docker_unavailable_is_retried(start_worker: StartWorker, store: Store,
                                       rel_settings: Settings,
                                       docker_proxy: DockerProxy) -> None:
    start_worker("nodocker", env={"DOCKER_HOST": f"unix://{docker_proxy.path}"})
    docker_proxy.down()
    run = submit_rel(store, rel_settings, "docker-flaky", {"message": "engine back?"})
    # Any waiting spell will do: each attempt fails the same way while the engine is
    # cut, and one spell can be shorter than a poll (full-jitter backoff).
    queued = wait_for(store, run.id, RunStatus.QUEUED, min_attempt=1, timeout=60)
    assert queued.error_code == ErrorCode.DOCKER_UNAVAILABLE
    assert queued.next_attempt_at is not None
    docker_proxy.up()
    final = wait_terminal(store, run.id)
    assert final.status is RunStatus.SUCCEEDED, final.error_message
    codes = [a["error_code"] for a in store.attempts(run.id)]
    assert codes[0] == ErrorCode.DOCKER_UNAVAILABLE and codes[-1] is None


def test_timeout_retried_after_its_backoff(start_worker: StartWorker, store: Store,
                                           rel_settings: Settings) -> None:
    worker = start_worker("timeouts")
    run = submit_rel(store, rel_settings, "flaky-timeout", {})
    final = wait_terminal(store, run.id)
    assert final.status is RunStatus.DEAD_LETTER
    assert final.error_code == ErrorCode.TIMEOUT and "retries exhausted" in (
        final.error_message or "")
    first, second = store.attempts(run.id)
    assert first["error_code"] == second["error_code"] == ErrorCode.TIMEOUT
    # The backoff the first attempt was given, from its transition line (the queued
    # spell itself may be too short for a poll to see).
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    requeued = [line for line in lines if line.get("event") == "run.transition"
                and line.get("run_id") == run.id and line.get("to") == "queued"]
    assert len(requeued) == 1 and requeued[0]["error_code"] == ErrorCode.TIMEOUT
    due = datetime.fromisoformat(requeued[0]["next_attempt_at"])
    assert first["finished_at"] <= due <= second["started_at"]


def test_exit_75_is_retried_and_exit_1_is_not(start_worker: StartWorker, store: Store,
                                              rel_settings: Settings) -> None:
    start_worker("exits")
    transient = submit_rel(store, rel_settings, "exit", {"code": 75})
    hard = submit_rel(store, rel_settings, "exit", {"code": 1})
    transient_final = wait_terminal(store, transient.id)
    hard_final = wait_terminal(store, hard.id)
    assert (transient_final.status, transient_final.attempt) == (RunStatus.DEAD_LETTER, 3)
    assert (transient_final.error_code, transient_final.exit_code) == (
        ErrorCode.NONZERO_EXIT, 75)
    assert (hard_final.status, hard_final.attempt, hard_final.exit_code) == (
        RunStatus.FAILED, 1, 1)


def test_dead_letter_then_replay_to_success(start_worker: StartWorker, store: Store,
                                            rel_settings: Settings, api_url: str,
                                            keys: dict[str, str],
                                            published: dict[str, dict[str, Any]]) -> None:
    start_worker("replay")
    run = submit_rel(store, rel_settings, "fixme", {"code": 75})
    dead = wait_terminal(store, run.id)
    assert (dead.status, dead.attempt) == (RunStatus.DEAD_LETTER, 2)
    # The operator ships a fixed processor and re-pins it...
    path = rel_settings.manifest
    original = path.read_text()
    manifest = yaml.safe_load(original)
    for entry in manifest["processors"]:
        if entry["name"] == "fixme":
            entry["image"] = published["echo"]["image"]
    path.write_text(dump_manifest(manifest))
    try:
        # ...and replays the dead letter.
        from runner.control.runs import replay

        again = replay(run.id, tenant="rel", manifest=load_manifest(path), store=store,
                       queue=RunQueue.from_url(rel_settings.redis_url),
                       default_queue=rel_settings.queue, stop_grace_seconds=1)
        final = wait_terminal(store, again.id)
    finally:
        path.write_text(original)
    assert final.status is RunStatus.SUCCEEDED and final.replay_of == run.id
    assert final.result == {"echo": {"code": 75}}
    original_run = store.get_run(run.id)
    assert original_run is not None and original_run.status is RunStatus.DEAD_LETTER


def test_dead_letter_view_and_replay_in_the_api(start_worker: StartWorker, store: Store,
                                                rel_settings: Settings,
                                                api_url: str) -> None:
    """Listed by status, with its attempts, stage and last log lines; replayable."""
    start_worker("deadview")
    run = submit_rel(store, rel_settings, "exit", {"code": 75})
    wait_terminal(store, run.id)
    from runner.domain import Role

    _, key = Keys(store).create(tenant="rel", role=Role.SUBMITTER)
    with RunnerClient(api_url, key) as rel:
        listed = rel.runs(status="dead_letter", limit=200)["items"]
        assert run.id in [r["id"] for r in listed]
        assert all(r["status"] == "dead_letter" for r in listed)
        dead = rel.run(run.id)
        assert (dead["error_code"], dead["error_stage"], dead["exit_code"]) == (
            "nonzero_exit", "run", 75)
        assert [a["exit_code"] for a in dead["attempts"]] == [75, 75, 75]
        assert dead["last_log_lines"][-1] == "exiting with 75"
        again = rel.replay(run.id)
        assert again["replay_of"] == run.id and again["status"] == "queued"
        assert again["input"] == {"code": 75} and again["id"] != run.id
        parked = submit(Submission(tenant="rel", processor="rel-echo", version=None,
                                   input={}),
                        manifest=load_manifest(rel_settings.manifest), store=store,
                        queue=RunQueue.from_url(rel_settings.redis_url),
                        default_queue=f"parked-{SESSION}", stop_grace_seconds=1)
        with pytest.raises(ApiError) as caught:
            rel.replay(parked.id)  # still queued: only ended runs can be replayed
        assert caught.value.status == 409
        Lifecycle(store).cancel(parked.id, tenant="rel")


def test_cancel_queued_running_and_finished(client: RunnerClient, worker: WorkerProcess,
                                            store: Store,
                                            docker_client: docker.DockerClient) -> None:
    busy = client.submit("sleep", {"seconds": 30}, timeout_seconds=60)
    waiting = client.submit("echo", {"message": "never"})
    wait_until(lambda: client.run(busy["id"])["status"] == "running", timeout=120,
               message=f"run {busy['id']} never started")
    # Queued: ends at once and never starts.
    canceled = client.cancel(waiting["id"])
    assert (canceled["status"], canceled["error_code"]) == ("canceled", "canceled")
    # Running: its container is stopped within the grace period, no retry.
    asked = time.monotonic()
    assert client.cancel(busy["id"])["cancel_requested"] is True
    final = client.wait(busy["id"], timeout=60)
    took = time.monotonic() - asked
    assert (final["status"], final["error_code"], final["attempt"]) == (
        "canceled", "canceled", 1)
    assert took < 60, took  # heartbeat 1 s + grace 1 s; generous for a loaded machine
    assert containers_left(docker_client, busy["id"]) == []
    # The queued one still never started, after the worker was free: it has taken the
    # run's job off the queue and dropped it.
    wait_until(lambda: worker.events("run_not_claimed", run_id=waiting["id"]), timeout=60,
               message=lambda: f"the worker never dequeued {waiting['id']}:\n{worker.tail()}")
    never = client.run(waiting["id"])
    assert (never["status"], never["attempt"], never["attempts"]) == ("canceled", 0, [])
    # Finished: 409, and it stays as it was.
    with pytest.raises(ApiError) as caught:
        client.cancel(busy["id"])
    assert caught.value.status == 409
    assert client.run(busy["id"])["finished_at"] == final["finished_at"]


def test_twenty_concurrent_submissions_with_one_key(api_url: str, keys: dict[str, str],
                                                    store: Store) -> None:
    key = f"idem-{uuid.uuid4().hex}"
    body = {"processor": "echo", "input": {"message": "once"}}
    headers = {"Authorization": f"Bearer {keys['submitter']}", "Idempotency-Key": key}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{api_url}/v1/runs", json=body, headers=headers, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    assert {r.status_code for r in responses} == {202}
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    runs, _ = store.list_runs(tenant="acme", limit=200)
    assert sum(1 for r in runs if r.idempotency_key == key) == 1
    different = httpx.post(f"{api_url}/v1/runs", headers=headers, timeout=30,
                           json={"processor": "echo", "input": {"message": "other"}})
    assert different.status_code == 422
    assert different.json()["error"]["field"] == "Idempotency-Key"


def test_per_processor_cap_holds_under_twenty_submissions(
        start_worker: StartWorker, store: Store, rel_settings: Settings) -> None:
    start_worker("pool", args=["--concurrency", "4"], wait_started=False)
    runs = [submit_rel(store, rel_settings, "capped", {"seconds": 1}) for _ in range(20)]
    ids = {r.id for r in runs}
    wait_until(lambda: all(store.get_run(i).status.terminal  # type: ignore[union-attr]
                           for i in ids), timeout=240, interval=0.2,
               message="not every capped run ended")
    finals = [store.get_run(i) for i in ids]
    assert all(f is not None and f.status is RunStatus.SUCCEEDED for f in finals)
    # An attempt holds its slot from claim to finish, and its container lives inside
    # that span, so the attempts' own spans bound how many containers ran at once.
    # (Sampling `docker ps` instead is racy: the engine lists a container as running
    # for a moment after `wait` has already returned its exit.)
    edges: list[tuple[datetime, int]] = []
    for run_id in ids:
        for attempt in store.attempts(run_id):
            assert attempt["started_at"] is not None and attempt["finished_at"] is not None
            edges += [(attempt["started_at"], 1), (attempt["finished_at"], -1)]
    live = peak = 0
    for _, step in sorted(edges):  # at a tie the end (-1) sorts before the start
        live += step
        peak = max(peak, live)
    assert peak == 2, peak


def test_a_claim_that_loses_a_duplicate_delivery_frees_only_its_own_slot(
        store: Store) -> None:
    """A job delivered twice is claimed twice; the loser held a slot under the same run
    and attempt as the winner, and once freed the winner's too, lifting the cap."""
    lifecycle = Lifecycle(store)
    processor = f"slots-{uuid.uuid4().hex[:8]}"

    def queued() -> Run:
        run, _ = store.create_run(NewRun(
            tenant="rel", processor=processor, version="1", image=f"x@sha256:{'0' * 64}",
            queue="nowhere", input={}, timeout_seconds=10, max_attempts=1,
            manifest_revision="sha256:test"))
        return run

    def claim(run: Run, worker: str, known: Run | None = None) -> ClaimStatus:
        return lifecycle.claim(run.id, attempt=1, worker_id=worker, lease_seconds=60,
                               max_concurrency=2, known=known).status

    a, b, c = queued(), queued(), queued()
    try:
        # Both deliveries read the run while it was queued; one claim wins.
        assert claim(a, "w1", known=a) is ClaimStatus.CLAIMED
        assert claim(a, "w2", known=a) is ClaimStatus.GONE
        assert claim(b, "w3") is ClaimStatus.CLAIMED
        assert claim(c, "w4") is ClaimStatus.AT_CAPACITY  # a and b hold both slots
    finally:
        for run in (a, b):
            lifecycle.finish(run.id, 1, Finish(RunStatus.SUCCEEDED, exit_code=0))
        lifecycle.cancel(c.id, tenant=None)
    d = queued()
    assert claim(d, "w5") is ClaimStatus.CLAIMED  # and the slots come back
    lifecycle.finish(d.id, 1, Finish(RunStatus.SUCCEEDED, exit_code=0))


def test_a_due_run_is_enqueued_once_and_a_job_being_claimed_counts_as_held(
        store: Store, rel_settings: Settings) -> None:
    """Every worker runs the requeue pass: two finding the same due run must not both
    enqueue it, and a job a worker dequeued a moment ago is not lost yet."""
    run, _ = store.create_run(NewRun(
        tenant="rel", processor="rel-echo", version="1", image=f"x@sha256:{'0' * 64}",
        queue=f"once-{uuid.uuid4().hex[:8]}", input={}, timeout_seconds=10, max_attempts=1,
        manifest_revision="sha256:test"))
    queue = RunQueue.from_url(rel_settings.redis_url)
    try:
        assert queue.holds(run) is False
        assert queue.enqueue_once(run) is True
        assert queue.enqueue_once(run) is False  # the second pass stands back
        lane = lane_key(run.queue, run.tenant, run.priority)
        assert queue.redis.llen(lane) == 1
        assert queue.depths([run.queue]) == {run.queue: 1}
        assert queue.holds(run) is True
        # A worker has dequeued it and is claiming it: still held, for a while.
        key = f"rq:job:{job_id(run.id, 1)}"
        queue.redis.lpop(lane)
        now = datetime.now(UTC)
        queue.redis.hset(key, mapping={"status": "started",
                                       "started_at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
        assert queue.holds(run) is True
        stale = now - timedelta(seconds=STARTED_HOLD_SECONDS + 1)
        queue.redis.hset(key, "started_at", stale.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        assert queue.holds(run) is False  # its worker died between dequeue and claim
    finally:
        queue.redis.delete(f"rq:job:{job_id(run.id, 1)}",
                           lane_key(run.queue, run.tenant, run.priority))
        Lifecycle(store).cancel(run.id, tenant=None)


def _container(client: docker.DockerClient, labels: dict[str, str]) -> str:
    created = client.api.create_container("runner-base/busybox:local", ["sleep", "300"],
                                          labels=labels)
    client.api.start(created["Id"])
    container_id: str = created["Id"]
    return container_id


def test_reconciler_removes_exactly_the_right_containers(
        store: Store, rel_settings: Settings, docker_client: docker.DockerClient) -> None:
    lifecycle = Lifecycle(store)
    ended = submit_rel(store, rel_settings, "rel-echo", {})
    lifecycle.cancel(ended.id, tenant=None)
    live = submit_rel(store, rel_settings, "slow", {})
    claim = lifecycle.claim(live.id, attempt=1, worker_id=f"sweep-{SESSION}",
                            lease_seconds=600)
    assert claim.run is not None
    ours = {MANAGED_LABEL: "true", INSTANCE_LABEL: rel_settings.instance,
            WORKER_LABEL: f"sweep-{SESSION}"}
    made = {
        "ended run": _container(docker_client, {**ours, RUN_LABEL: ended.id,
                                                ATTEMPT_LABEL: "1"}),
        "unknown run": _container(docker_client, {**ours, RUN_LABEL: str(uuid.uuid4())}),
        "stale attempt": _container(docker_client, {**ours, RUN_LABEL: live.id,
                                                    ATTEMPT_LABEL: "0"}),
        "live attempt": _container(docker_client, {**ours, RUN_LABEL: live.id,
                                                   ATTEMPT_LABEL: "1"}),
        "another deployment's": _container(docker_client, {
            **ours, INSTANCE_LABEL: "someone-else", RUN_LABEL: str(uuid.uuid4())}),
        "unlabelled": _container(docker_client, {"purpose": f"not-ours-{SESSION}"}),
    }
    try:
        reconciler = build_reconciler(rel_settings, store=store)
        reconciler.grace_seconds = 0
        time.sleep(1.1)  # container timestamps have one-second resolution
        report = reconciler.run_once()
        remaining = {c.id for c in docker_client.containers.list(all=True, sparse=True)}
        removed = {name for name, cid in made.items() if cid not in remaining}
        assert removed == {"ended run", "unknown run", "stale attempt"}
        assert set(report.removed_containers) == {made[n] for n in removed}
    finally:
        for cid in made.values():
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(cid, force=True)
        lifecycle.cancel(live.id, tenant=None)
        lifecycle.finish(live.id, 1, Finish(RunStatus.CANCELED, error_code="canceled"))
