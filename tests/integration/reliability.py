"""Helpers for the fault-injection tests: submit on the reliability queue, wait on the DB."""

from __future__ import annotations

import time
from typing import Any

import docker

from runner.domain import RunStatus
from runner.manifest import load_manifest
from runner.queue import RunQueue
from runner.runs import Submission, submit
from runner.settings import Settings
from runner.store import Run, Store
from tests.integration.conftest import containers_of


def submit_rel(store: Store, settings: Settings, processor: str,
               input: dict[str, Any] | None = None, **options: Any) -> Run:
    return submit(Submission(tenant="rel", processor=processor, version=None,
                             input=input or {}, **options),
                  manifest=load_manifest(settings.manifest), store=store,
                  queue=RunQueue.from_url(settings.redis_url), default_queue=settings.queue,
                  stop_grace_seconds=settings.stop_grace_seconds)


def wait_for(store: Store, run_id: str, *statuses: RunStatus, attempt: int | None = None,
             timeout: float = 120) -> Run:
    deadline = time.monotonic() + timeout
    while True:
        run = store.get_run(run_id)
        assert run is not None
        if run.status in statuses and (attempt is None or run.attempt == attempt):
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} is {run.status} (attempt {run.attempt}), "
                                 f"wanted {statuses} attempt {attempt}")
        time.sleep(0.05)


def wait_terminal(store: Store, run_id: str, timeout: float = 120) -> Run:
    return wait_for(store, run_id, *[s for s in RunStatus if s.terminal], timeout=timeout)


def running_container(client: docker.DockerClient, run_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for container in containers_of(client, run_id):
            if container.status == "running":
                return container
        time.sleep(0.05)
    raise AssertionError(f"no running container for {run_id}")
