"""`runner ops status`, `check` and `stuck`: gather the facts, judge them, report."""

from __future__ import annotations

import os
import socket
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import typer

from runner.cli.ops.common import (
    DockerOpt,
    JsonOpt,
    MarginOpt,
    age,
    docker_client,
    emit,
    ops_app,
    ops_command,
    redacted,
    settings,
)
from runner.control.lifecycle import Lifecycle
from runner.control.queue import RunQueue, queue_tags, served_queues, unserved
from runner.control.rows import aware
from runner.control.store import Store
from runner.domain import Run, RunStatus, utcnow
from runner.errors import ManifestError, RunnerError
from runner.settings import Settings

# Facts ------------------------------------------------------------------------

def _database_facts(store: Store, now: datetime, *, grace: float) -> dict[str, Any]:
    counts = store.count_runs_by_status()
    queued = store.queued_runs()
    running = store.running_runs()
    queues = store.run_queues()
    dead = store.dead_letter_counts(since=now - timedelta(hours=1))
    waiting = [r.next_attempt_at or r.created_at for r in queued]
    return {
        "runs_by_status": {s.value: int(counts.get(s.value, 0)) for s in RunStatus},
        "queued": {
            "count": len(queued),
            "oldest_age_s": max((age(w, now) or 0 for w in waiting), default=0),
            "by_processor": dict(Counter(r.processor for r in queued)),
            "by_tenant": dict(Counter(r.tenant for r in queued)),
        },
        "running": [_running_row(r, now, grace=grace) for r in running],
        "dead_letters_last_hour": [{"processor": p, "error_code": c, "count": n}
                                   for p, c, n in dead],
        "queues": sorted(queues),
    }


def _running_row(run: Run, now: datetime, *, grace: float) -> dict[str, Any]:
    lease = run.lease_expires_at
    lease_left = None if lease is None else round((lease - now).total_seconds(), 1)
    age_s = age(run.started_at, now) or 0.0
    reasons = []
    if lease_left is None or lease_left < 0:
        reasons.append("lease expired")
    if age_s > run.timeout_seconds + grace:
        reasons.append(f"running {age_s:.0f}s, past its {run.timeout_seconds:g}s timeout")
    return {"id": run.id, "processor": run.processor, "tenant": run.tenant,
            "attempt": run.attempt, "worker_id": run.worker_id, "age_s": age_s,
            "lease_left_s": lease_left, "cancel_requested": run.cancel_requested_at is not None,
            "stuck": reasons}


def _redis_facts(cfg: Settings, store: Store, queues: set[str]) -> dict[str, Any]:
    from redis.exceptions import RedisError
    from rq import Worker

    from runner.control.queue import RunQueue

    queue = RunQueue.from_url(cfg.redis_url)
    try:
        queue.ping()
        depth = queue.depths(sorted(queues))
        workers = [_worker_row(w) for w in Worker.all(connection=queue.redis)
                   if set(w.queue_names()) & queues]
        cutoff = utcnow() - timedelta(seconds=cfg.reconcile_grace_seconds)
        missing = [run.id for run in Lifecycle(store).due_queued(older_than=cutoff)
                   if not queue.holds(run)]
    except (RedisError, RunnerError) as exc:
        message = getattr(exc, "message", str(exc))
        return {"ok": False, "error": message}
    return {"ok": True, "queue_depth": depth, "workers": workers,
            "queued_runs_missing_from_redis": missing}


def _worker_row(worker: Any) -> dict[str, Any]:
    alive: bool | str = "unknown (another host)"
    if worker.hostname == socket.gethostname() and worker.pid:
        try:
            state = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            alive = "stopped (SIGSTOP?)" if state in ("T", "t") else state != "Z"
        except (OSError, IndexError):
            alive = False
    beat = aware(worker.last_heartbeat)
    return {"name": worker.name, "queues": worker.queue_names(), "state": worker.get_state(),
            "current_job": worker.get_current_job_id(), "pid": worker.pid,
            "hostname": worker.hostname, "alive": alive,
            "last_heartbeat_age_s": age(beat, utcnow())}


def _manifest_facts(path: Path) -> dict[str, Any]:
    from runner.manifest import load_manifest

    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        return {"path": str(path), "valid": False, "problems": exc.problems or [exc.message]}
    return {"path": str(path), "valid": True, "revision": manifest.revision,
            "processors": [f"{p.name} {p.version}" for p in manifest.processors]}


def _api_facts() -> dict[str, Any] | None:
    import httpx

    url, key = os.environ.get("RUNNER_API_URL"), os.environ.get("RUNNER_API_KEY")
    if not url:
        return None
    facts: dict[str, Any] = {"url": url}
    try:
        ready = httpx.get(f"{url}/readyz", timeout=10)
        facts["ready"] = ready.status_code == 200
        facts["checks"] = ready.json().get("checks")
        if key:
            answer = httpx.get(f"{url}/v1/processors", timeout=10,
                               headers={"Authorization": f"Bearer {key}"})
            facts["key_status"] = answer.status_code
            if answer.status_code == 200:
                facts["manifest_revision"] = answer.json().get("manifest_revision")
    except (httpx.HTTPError, ValueError) as exc:
        facts.update(ready=False, error=f"unreachable: {exc}")
    return facts


def _docker_facts() -> dict[str, Any]:
    try:
        docker_client(5)
    except RunnerError as exc:
        return {"ok": False, "error": exc.message}
    return {"ok": True, "host": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")}


def _collect(cfg: Settings, *, docker: bool, margin: float) -> dict[str, Any]:
    now = utcnow()
    store = Store(cfg.database_url)
    report: dict[str, Any] = {
        "database": redacted(cfg.database_url), "redis_url": redacted(cfg.redis_url),
        "manifest": _manifest_facts(cfg.manifest), "api": _api_facts(),
        "docker": _docker_facts() if docker else None,
    }
    try:
        db = _database_facts(store, now, grace=cfg.stop_grace_seconds + margin)
        report["db"] = {"ok": True, **db}
        queues = {cfg.queue, *db["queues"]}
        report["redis"] = _redis_facts(cfg, store, queues)
        if report["redis"].get("ok"):
            report["unserved"] = unserved(store.queued_by_queue(), served_queues(
                RunQueue.from_url(cfg.redis_url).redis))
    except RunnerError as exc:
        report["db"] = {"ok": False, "error": exc.message}
        report["redis"] = {"ok": None, "error": "not checked (database unavailable)"}
    finally:
        store.close()
    report["problems"], report["warnings"] = _judge(report)
    return report


def _judge(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What needs an operator (problems) and what deserves a look (warnings)."""
    problems, warnings = [], []
    db, redis, manifest = report["db"], report["redis"], report["manifest"]
    if not db["ok"]:
        problems.append(f"database unreachable: {db['error']}")
    if redis.get("ok") is False:
        problems.append(f"redis unreachable: {redis['error']}")
    if not manifest["valid"]:
        problems.append(f"manifest {manifest['path']} is invalid (running processes keep "
                        f"the last good one): {'; '.join(manifest['problems'])}")
    docker = report["docker"]
    if docker is not None and not docker["ok"]:
        problems.append(f"docker unreachable: {docker['error']}")
    api = report["api"]
    if api is not None:
        if not api.get("ready"):
            problems.append(f"API at {api['url']} not ready: "
                            f"{api.get('error') or api.get('checks')}")
        elif api.get("key_status") not in (None, 200):
            problems.append(f"RUNNER_API_KEY answered HTTP {api['key_status']}")
        elif (manifest["valid"] and api.get("manifest_revision")
              and api["manifest_revision"] != manifest["revision"]):
            problems.append(f"API has manifest {api['manifest_revision'][:19]} in force, "
                            f"the file is {manifest['revision'][:19]}")
    if db["ok"]:
        stuck = [r for r in db["running"] if r["stuck"]]
        if stuck:
            problems.append(f"{len(stuck)} running run(s) stuck: "
                            + ", ".join(f"{r['id']} ({'; '.join(r['stuck'])})" for r in stuck))
        dead = sum(d["count"] for d in db["dead_letters_last_hour"])
        if dead:
            warnings.append(f"{dead} dead letter(s) in the last hour "
                            "(runner ops dead-letters --since 1h)")
    if redis.get("ok"):
        missing = redis["queued_runs_missing_from_redis"]
        if missing:
            problems.append(f"{len(missing)} queued run(s) due but not in Redis "
                            "(Redis lost them; `runner reconcile` re-enqueues)")
        live = [w for w in redis["workers"] if w["alive"] is True
                or str(w["alive"]).startswith("unknown")]
        if db["ok"] and db["queued"]["count"] and not live:
            problems.append(f"{db['queued']['count']} queued run(s) and no live worker "
                            "serves their queues")
        elif live:
            for queue, count in sorted(report.get("unserved", {}).items()):
                tags = sorted(queue_tags(queue)[1])
                needs = f" (needs a host tagged {', '.join(tags)})" if tags else ""
                problems.append(f"{count} queued run(s) on queue {queue} that no live "
                                f"worker serves{needs}")
        for w in redis["workers"]:
            if w["alive"] is not True and not str(w["alive"]).startswith("unknown"):
                warnings.append(f"worker {w['name']} is registered but not alive "
                                f"({w['alive']})")
    return problems, warnings


def _status_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"database  {r['database']}: " + ("ok" if r["db"]["ok"] else r["db"]["error"])]
    redis = r["redis"]
    lines.append(f"redis     {r['redis_url']}: " + ("ok" if redis.get("ok") else redis["error"]))
    m = r["manifest"]
    lines.append(f"manifest  {m['path']}: " + (
        f"valid, revision {m['revision'][:19]}, {len(m['processors'])} processor(s)"
        if m["valid"] else f"INVALID ({len(m['problems'])} problem(s))"))
    if r["docker"] is not None:
        d = r["docker"]
        lines.append("docker    " + (f"ok ({d['host']})" if d["ok"] else d["error"]))
    if r["api"] is not None:
        a = r["api"]
        lines.append(f"api       {a['url']}: " + ("ready" if a.get("ready") else
                                                  f"NOT READY {a.get('error') or a.get('checks')}")
                     + (f", manifest {a['manifest_revision'][:19]}"
                        if a.get("manifest_revision") else ""))
    if redis.get("ok"):
        lines.append("queues    " + ", ".join(f"{q}={n}" for q, n in
                                              redis["queue_depth"].items()))
        lines.append(f"workers   {len(redis['workers'])} registered")
        for w in redis["workers"]:
            lines.append(f"  {w['name']}  {w['state']}  alive={w['alive']}  "
                         f"job={w['current_job'] or '-'}")
        lines.append(f"missing   {len(redis['queued_runs_missing_from_redis'])} queued run(s) "
                     "due but not in Redis")
    db = r["db"]
    if db["ok"]:
        lines.append("runs      " + ", ".join(f"{s}={n}" for s, n in
                                              db["runs_by_status"].items()))
        q = db["queued"]
        lines.append(f"queued    {q['count']}, oldest {q['oldest_age_s']:.0f}s; by processor "
                     f"{q['by_processor']}; by tenant {q['by_tenant']}")
        for run in db["running"]:
            lease = run["lease_left_s"]
            lines.append(f"  running {run['id']} {run['processor']} attempt {run['attempt']} "
                         f"on {run['worker_id']}, {run['age_s']:.0f}s, lease "
                         + ("none" if lease is None else f"{lease:+.1f}s")
                         + (f"  STUCK: {'; '.join(run['stuck'])}" if run["stuck"] else ""))
        for d in db["dead_letters_last_hour"]:
            lines.append(f"  dead letters last hour: {d['processor']} {d['error_code']} "
                         f"x{d['count']}")
    lines += [f"PROBLEM   {p}" for p in r["problems"]]
    lines += [f"WARNING   {w}" for w in r["warnings"]]
    if not r["problems"]:
        lines.append("OK        no problems found")
    return lines



@ops_app.command("status")
@ops_command
def status(as_json: JsonOpt = False, docker: DockerOpt = True, margin: MarginOpt = 120) -> None:
    """Everything at once: services, queues, workers, runs, problems (always exits 0)."""
    report = _collect(settings(), docker=docker, margin=margin)
    emit(report, as_json, _status_lines(report))


@ops_app.command("check")
@ops_command
def check(as_json: JsonOpt = False, docker: DockerOpt = True, margin: MarginOpt = 120) -> None:
    """The problems `status` finds; exit 1 if there is any."""
    report = _collect(settings(), docker=docker, margin=margin)
    lines = ([f"PROBLEM {p}" for p in report["problems"]]
             + [f"WARNING {w}" for w in report["warnings"]])
    emit({"problems": report["problems"], "warnings": report["warnings"]}, as_json,
          lines or ["ok"])
    if report["problems"]:
        raise typer.Exit(1)


@ops_app.command("stuck")
@ops_command
def stuck(as_json: JsonOpt = False, margin: MarginOpt = 120) -> None:
    """Running runs whose lease expired or that run past their timeout; exit 1 if any."""
    cfg = settings()
    store = Store(cfg.database_url)
    try:
        facts = _database_facts(store, utcnow(), grace=cfg.stop_grace_seconds + margin)
    finally:
        store.close()
    found = [r for r in facts["running"] if r["stuck"]]
    emit(found, as_json, [f"{r['id']}  {r['processor']}  attempt {r['attempt']}  worker "
                           f"{r['worker_id']}  age {r['age_s']:.0f}s  lease "
                           f"{r['lease_left_s']}s  {'; '.join(r['stuck'])}" for r in found]
          or [f"no stuck runs ({len(facts['running'])} running)"])
    if found:
        raise typer.Exit(1)
