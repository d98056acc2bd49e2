"""A rolling upgrade: a worker of the release before the last migration, checked out
from this repository's history, serves runs beside a worker of this release, on the
database already upgraded for this one (migrations are additive)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.control.queue import RunQueue
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.manifest import ManifestSource
from runner.settings import Settings
from tests.integration.conftest import SESSION
from tests.support.processes import RunnerProcess, WorkerProcess, child_env
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
NEWEST = sorted((ROOT / "migrations" / "versions").glob("0*.py"))[-1]


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The code just before the newest migration was added, as a work tree."""
    added = git("log", "--format=%H", "-n1", "--diff-filter=A", "--",
                str(NEWEST.relative_to(ROOT)))
    assert added, f"{NEWEST.name} is not in this checkout's history"
    tree = tmp_path_factory.mktemp("previous") / "tree"
    git("worktree", "add", "--detach", str(tree), f"{added}~1")
    try:
        yield tree
    finally:
        git("worktree", "remove", "--force", str(tree))


def test_a_previous_release_worker_runs_beside_this_one(
        previous_release: Path, settings: Settings, store: Store, tmp_path: Path) -> None:
    upgraded = settings.model_copy(update={"queue": f"rolling-{SESSION}",
                                           "worker_id": f"new-{SESSION}"})
    old_env = {**child_env(upgraded), "RUNNER_WORKER_ID": f"old-{SESSION}",
               "PYTHONPATH": str(previous_release)}
    # -P: the old tree on PYTHONPATH, not this checkout's, provides `runner`.
    old = RunnerProcess("old-worker", ["worker"], env=old_env, log_path=tmp_path / "old.log",
                        prefix=[sys.executable, "-P"])
    new = None
    try:
        old.wait_ready(marker="worker_started", timeout=90)
        new = WorkerProcess(upgraded, tmp_path / "new.log")
        # Really two releases: only this one's worker takes tenants in turn.
        assert "tenant_weights" not in old.events("worker_started")[0]
        assert "tenant_weights" in new.events("worker_started")[0]
        manifests = ManifestSource(upgraded.manifest)

        def submit_some(queue: RunQueue, count: int) -> list[str]:
            return [submit(Submission(tenant="acme", processor="sleep", version=None,
                                      input={"seconds": 0.5}),
                           manifest=manifests.current(), store=store, queue=queue,
                           default_queue=upgraded.queue, stop_grace_seconds=1).id
                    for _ in range(count)]

        def ended(ids: list[str]) -> bool:
            return all((r := store.get_run(i)) is not None and r.status.terminal for i in ids)

        def workers(ids: list[str]) -> set[str]:
            wait_until(lambda: ended(ids), timeout=180,
                       message="the mixed workers did not finish")
            finals = [store.get_run(i) for i in ids]
            assert all(r is not None and r.status.value == "succeeded" for r in finals), finals
            return {store.attempts(i)[0]["worker_id"].split("-")[0] for i in ids}

        # While old workers run, the APIs run with RUNNER_FAIR_DEQUEUE=off: every run on
        # the queue's one list, which workers of both releases serve.
        assert workers(submit_some(RunQueue.from_url(upgraded.redis_url, fair=False),
                                   8)) == {"old", "new"}
        # Fair lanes (the default once every worker is upgraded): only this release's
        # worker reads them, and none is left behind.
        assert workers(submit_some(RunQueue.from_url(upgraded.redis_url), 4)) == {"new"}
    finally:
        old.stop()
        if new is not None:
            new.stop()
