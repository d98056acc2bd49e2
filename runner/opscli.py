"""`runner ops ...`: operator commands the runbooks use to diagnose and recover.

Reads go straight to the database, Redis, Docker and the registry, so they work while
the API is down. Every status change goes through `runner.lifecycle` (cancel) or
`runner.runs` (replay); nothing here writes a run's status itself.

Exit status: 0 fine, 1 the command found a problem (or, for a recovery command, did
not finish it), 2 the command itself could not run (one `error:` line on stderr).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import delete, distinct, func, select

from runner.cliutil import exits_on_error
from runner.domain import ErrorCode, RunStatus
from runner.errors import ManifestError, RunnerError
from runner.lifecycle import Lifecycle
from runner.logs import configure_logging
from runner.models import LogChunkRow, RunRow
from runner.settings import Settings, load_settings
from runner.store import Store, _aware, utcnow
from runner.units import parse_duration

ops_app = typer.Typer(help="Operator commands: inspect and recover a deployment.",
                      no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ProcessorOpt = Annotated[str | None, typer.Option(help="Only this processor.")]
ACTIVE = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
TERMINAL = [s.value for s in RunStatus if s.terminal]


# Errors of the runner: one `error:` line and exit status 2 (1 means "found a problem").
ops_command = exits_on_error(2)


def _settings() -> Settings:
    cfg = load_settings()
    configure_logging(service="ops", fmt=cfg.log_format, level="error")
    return cfg


def _emit(data: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


def _age(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else round((now - moment).total_seconds(), 1)


def _duration(value: str, option: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise RunnerError(f"{option}: {exc}") from exc


def _redacted(url: str) -> str:
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.rpartition("//")[2]:
        return url
    scheme, _, user = head.rpartition("//")
    return f"{scheme}//{user.split(':')[0]}:***@{tail}"


# Facts ------------------------------------------------------------------------

def _database_facts(store: Store, now: datetime, *, grace: float) -> dict[str, Any]:
    with store.session() as session:
        counts = dict(session.execute(select(RunRow.status, func.count())
                                      .group_by(RunRow.status)).all())
        queued = list(session.scalars(select(RunRow).where(
            RunRow.status == RunStatus.QUEUED.value)))
        running = list(session.scalars(select(RunRow).where(
            RunRow.status == RunStatus.RUNNING.value).order_by(RunRow.started_at)))
        queues = set(session.scalars(select(distinct(RunRow.queue))))
        hour_ago = now - timedelta(hours=1)
        dead = session.execute(select(RunRow.processor, RunRow.error_code, func.count())
                               .where(RunRow.status == RunStatus.DEAD_LETTER.value,
                                      RunRow.finished_at >= hour_ago)
                               .group_by(RunRow.processor, RunRow.error_code)).all()
    waiting = [(_aware(r.next_attempt_at) or _aware(r.created_at) or now) for r in queued]
    return {
        "runs_by_status": {s.value: int(counts.get(s.value, 0)) for s in RunStatus},
        "queued": {
            "count": len(queued),
            "oldest_age_s": max((_age(w, now) or 0 for w in waiting), default=0),
            "by_processor": dict(Counter(r.processor for r in queued)),
            "by_tenant": dict(Counter(r.tenant for r in queued)),
        },
        "running": [_running_row(r, now, grace=grace) for r in running],
        "dead_letters_last_hour": [{"processor": p, "error_code": c, "count": n}
                                   for p, c, n in dead],
        "queues": sorted(queues),
    }


def _running_row(row: RunRow, now: datetime, *, grace: float) -> dict[str, Any]:
    started, lease = _aware(row.started_at), _aware(row.lease_expires_at)
    lease_left = None if lease is None else round((lease - now).total_seconds(), 1)
    age = _age(started, now) or 0.0
    reasons = []
    if lease_left is None or lease_left < 0:
        reasons.append("lease expired")
    if age > row.timeout_seconds + grace:
        reasons.append(f"running {age:.0f}s, past its {row.timeout_seconds:g}s timeout")
    return {"id": row.id, "processor": row.processor, "tenant": row.tenant,
            "attempt": row.attempt, "worker_id": row.worker_id, "age_s": age,
            "lease_left_s": lease_left, "cancel_requested": row.cancel_requested_at is not None,
            "stuck": reasons}


def _redis_facts(cfg: Settings, store: Store, queues: set[str]) -> dict[str, Any]:
    from redis.exceptions import RedisError
    from rq import Queue, Worker

    from runner.queue import RunQueue

    queue = RunQueue.from_url(cfg.redis_url)
    try:
        queue.ping()
        depth = {name: int(Queue(name, connection=queue.redis).count) for name in sorted(queues)}
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
    beat = _aware(worker.last_heartbeat)
    return {"name": worker.name, "queues": worker.queue_names(), "state": worker.get_state(),
            "current_job": worker.get_current_job_id(), "pid": worker.pid,
            "hostname": worker.hostname, "alive": alive,
            "last_heartbeat_age_s": _age(beat, utcnow())}


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


def _docker_client(timeout: float = 10) -> Any:
    import docker

    from runner.errors import DockerUnavailableError

    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except Exception as exc:  # docker-py raises several unrelated types here
        raise DockerUnavailableError(f"Docker engine unreachable: {exc}") from exc
    return client


def _docker_facts() -> dict[str, Any]:
    try:
        _docker_client(5)
    except RunnerError as exc:
        return {"ok": False, "error": exc.message}
    return {"ok": True, "host": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")}


def _collect(cfg: Settings, *, docker: bool, margin: float) -> dict[str, Any]:
    now = utcnow()
    store = Store(cfg.database_url)
    report: dict[str, Any] = {
        "database": _redacted(cfg.database_url), "redis_url": _redacted(cfg.redis_url),
        "manifest": _manifest_facts(cfg.manifest), "api": _api_facts(),
        "docker": _docker_facts() if docker else None,
    }
    try:
        db = _database_facts(store, now, grace=cfg.stop_grace_seconds + margin)
        report["db"] = {"ok": True, **db}
        queues = {cfg.queue, *db["queues"]}
        report["redis"] = _redis_facts(cfg, store, queues)
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


MarginOpt = Annotated[float, typer.Option(
    help="Seconds past its timeout (plus stop grace) before a running run counts as stuck.")]
DockerOpt = Annotated[bool, typer.Option(help="Also check the Docker engine (DOCKER_HOST).")]


@ops_app.command("status")
@ops_command
def status(as_json: JsonOpt = False, docker: DockerOpt = True, margin: MarginOpt = 120) -> None:
    """Everything at once: services, queues, workers, runs, problems (always exits 0)."""
    report = _collect(_settings(), docker=docker, margin=margin)
    _emit(report, as_json, _status_lines(report))


@ops_app.command("check")
@ops_command
def check(as_json: JsonOpt = False, docker: DockerOpt = True, margin: MarginOpt = 120) -> None:
    """The problems `status` finds; exit 1 if there is any."""
    report = _collect(_settings(), docker=docker, margin=margin)
    lines = ([f"PROBLEM {p}" for p in report["problems"]]
             + [f"WARNING {w}" for w in report["warnings"]])
    _emit({"problems": report["problems"], "warnings": report["warnings"]}, as_json,
          lines or ["ok"])
    if report["problems"]:
        raise typer.Exit(1)


@ops_app.command("stuck")
@ops_command
def stuck(as_json: JsonOpt = False, margin: MarginOpt = 120) -> None:
    """Running runs whose lease expired or that run past their timeout; exit 1 if any."""
    cfg = _settings()
    store = Store(cfg.database_url)
    try:
        facts = _database_facts(store, utcnow(), grace=cfg.stop_grace_seconds + margin)
    finally:
        store.close()
    found = [r for r in facts["running"] if r["stuck"]]
    _emit(found, as_json, [f"{r['id']}  {r['processor']}  attempt {r['attempt']}  worker "
                           f"{r['worker_id']}  age {r['age_s']:.0f}s  lease "
                           f"{r['lease_left_s']}s  {'; '.join(r['stuck'])}" for r in found]
          or [f"no stuck runs ({len(facts['running'])} running)"])
    if found:
        raise typer.Exit(1)


# Dead letters and replay ----------------------------------------------------------

def _dead_letters(store: Store, *, since: float, processor: str | None,
                  error_code: str | None) -> list[dict[str, Any]]:
    """Dead letters ended in the last `since` seconds, each with its replays' states."""
    now = utcnow()
    query = select(RunRow).where(RunRow.status == RunStatus.DEAD_LETTER.value,
                                 RunRow.finished_at >= now - timedelta(seconds=since))
    if processor:
        query = query.where(RunRow.processor == processor)
    if error_code:
        query = query.where(RunRow.error_code == error_code)
    with store.session() as session:
        rows = list(session.scalars(query.order_by(RunRow.id)))
        replays = session.execute(select(RunRow.replay_of, RunRow.id, RunRow.status).where(
            RunRow.replay_of.in_([r.id for r in rows]))).all() if rows else []
    by_original: dict[str, list[dict[str, str]]] = {}
    for original, replay_id, replay_status in replays:
        if original is not None:
            by_original.setdefault(original, []).append({"id": replay_id,
                                                         "status": replay_status})
    found = []
    for r in rows:
        states = {x["status"] for x in by_original.get(r.id, [])}
        found.append({
            "id": r.id, "tenant": r.tenant, "processor": r.processor, "version": r.version,
            "error_code": r.error_code, "error_stage": r.error_stage,
            "error_message": r.error_message, "attempts": r.attempt, "image": r.image,
            "finished_age_s": _age(_aware(r.finished_at), now),
            "replays": by_original.get(r.id, []),
            "resolved": RunStatus.SUCCEEDED.value in states,
            "replay_pending": bool(states & set(ACTIVE)),
        })
    return found


SinceOpt = Annotated[str, typer.Option(help="How far back, e.g. 30m, 1h, 24h.")]
CodeOpt = Annotated[ErrorCode | None, typer.Option(help="Only this error code.")]


@ops_app.command("dead-letters")
@ops_command
def dead_letters(since: SinceOpt = "1h", processor: ProcessorOpt = None,
                 error_code: CodeOpt = None, as_json: JsonOpt = False,
                 unresolved: Annotated[bool, typer.Option(
                     help="Only those not (being) replayed to success; exit 1 if any.")] = False
                 ) -> None:
    """Dead letters by processor and error code, with their replays."""
    cfg = _settings()
    store = Store(cfg.database_url)
    try:
        found = _dead_letters(store, since=_duration(since, "--since"), processor=processor,
                              error_code=error_code)
    finally:
        store.close()
    if unresolved:
        found = [d for d in found if not d["resolved"]]
    groups = Counter((d["processor"], d["error_code"]) for d in found)
    lines = [f"{len(found)} dead letter(s) in the last {since}"]
    lines += [f"  {p:<20} {c:<20} x{n}" for (p, c), n in groups.most_common()]
    for d in found:
        replays = ", ".join(f"{x['id']} {x['status']}" for x in d["replays"]) or "none"
        lines.append(f"{d['id']}  {d['processor']} {d['version']}  {d['error_code']} "
                     f"[{d['error_stage']}] after {d['attempts']} attempt(s): "
                     f"{(d['error_message'] or '')[:120]}  replays: {replays}")
    _emit(found, as_json, lines)
    if unresolved and found:
        raise typer.Exit(1)


@ops_app.command("replay")
@ops_command
def replay_dead_letters(since: SinceOpt = "1h", processor: ProcessorOpt = None,
                        error_code: CodeOpt = None,
                        yes: Annotated[bool, typer.Option(
                            "--yes", help="Replay; without it, only list.")] = False) -> None:
    """Replay dead letters not already replayed (each as a new run, on today's pin)."""
    from runner.manifest import load_manifest
    from runner.queue import RunQueue
    from runner.runs import replay

    cfg = _settings()
    store = Store(cfg.database_url)
    try:
        todo = [d for d in _dead_letters(store, since=_duration(since, "--since"),
                                         processor=processor, error_code=error_code)
                if not d["resolved"] and not d["replay_pending"]]
        if not yes:
            for d in todo:
                typer.echo(f"would replay {d['id']} ({d['processor']} {d['error_code']})")
            typer.echo(f"{len(todo)} dead letter(s) to replay; add --yes to replay them")
            return
        manifest, queue = load_manifest(cfg.manifest), RunQueue.from_url(cfg.redis_url)
        failed = 0
        for d in todo:
            try:
                new = replay(d["id"], tenant=None, manifest=manifest, store=store, queue=queue,
                             default_queue=cfg.queue, stop_grace_seconds=cfg.stop_grace_seconds,
                             input_max_bytes=cfg.input_max_bytes)
                typer.echo(f"replayed {d['id']} as {new.id}")
            except RunnerError as exc:
                failed += 1
                typer.echo(f"could not replay {d['id']}: {exc.message}", err=True)
        typer.echo(f"{len(todo) - failed} replayed, {failed} refused")
    finally:
        store.close()
    if failed:
        raise typer.Exit(1)


# Backlog ----------------------------------------------------------------------

@ops_app.command("cancel-queued")
@ops_command
def cancel_queued(processor: ProcessorOpt = None,
                  tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
                  yes: Annotated[bool, typer.Option(
                      "--yes", help="Cancel; without it, only count.")] = False) -> None:
    """Cancel queued runs of a processor and/or tenant (a flood); running ones are kept."""
    if processor is None and tenant is None:
        raise RunnerError("give --processor and/or --tenant")
    cfg = _settings()
    store = Store(cfg.database_url)
    try:
        query = select(RunRow.id).where(RunRow.status == RunStatus.QUEUED.value)
        if processor:
            query = query.where(RunRow.processor == processor)
        if tenant:
            query = query.where(RunRow.tenant == tenant)
        with store.session() as session:
            ids = list(session.scalars(query))
        if not yes:
            typer.echo(f"{len(ids)} queued run(s) match; add --yes to cancel them")
            return
        lifecycle = Lifecycle(store)
        done = sum(lifecycle.end_queued(run_id, RunStatus.CANCELED, error_code=ErrorCode.CANCELED,
                                        message="canceled by an operator (runner ops "
                                                "cancel-queued)", stage="queue")
                   for run_id in ids)
        typer.echo(f"canceled {done} queued run(s); {len(ids) - done} had already left the queue")
    finally:
        store.close()


@ops_app.command("wait-idle")
@ops_command
def wait_idle(processor: ProcessorOpt = None,
              timeout: Annotated[str, typer.Option(help="Give up after this long.")] = "5m"
              ) -> None:
    """Wait until no run is queued or running; exit 1 if that takes longer than --timeout."""
    cfg = _settings()
    store = Store(cfg.database_url)
    deadline = time.monotonic() + _duration(timeout, "--timeout")
    query = select(RunRow.status, func.count()).where(RunRow.status.in_(ACTIVE))
    if processor:
        query = query.where(RunRow.processor == processor)
    last = 0.0
    try:
        while True:
            with store.session() as session:
                active = dict(session.execute(query.group_by(RunRow.status)).all())
            if not active:
                typer.echo("idle: no queued or running runs")
                return
            if time.monotonic() > deadline:
                typer.echo(f"still active after {timeout}: {active}", err=True)
                raise typer.Exit(1)
            if time.monotonic() - last > 10:
                typer.echo(f"waiting: {active}")
                last = time.monotonic()
            time.sleep(1)
    finally:
        store.close()


# Images and the registry ------------------------------------------------------------

def _registry_has(ref: str) -> str:
    import httpx

    from runner.publish import MANIFEST_MEDIA_TYPES

    name, _, digest = ref.partition("@")
    host, _, repo = name.partition("/")
    if not repo or not ("." in host or ":" in host or host == "localhost"):
        return "not checked (no registry host in the reference)"
    scheme = "http" if host.startswith(("127.", "localhost", "[::1]")) else "https"
    try:
        answer = httpx.head(f"{scheme}://{host}/v2/{repo}/manifests/{digest}", timeout=10,
                            headers={"Accept": MANIFEST_MEDIA_TYPES})
    except httpx.HTTPError as exc:
        return f"registry {host} unreachable: {exc}"
    return "present" if answer.status_code == 200 else f"missing (HTTP {answer.status_code})"


def _is_local(client: Any, ref: str) -> bool:
    import docker.errors

    try:
        attrs = client.api.inspect_image(ref)
    except docker.errors.ImageNotFound:
        return False
    return ref in (attrs.get("RepoDigests") or [])


@ops_app.command("images")
@ops_command
def images(pull: Annotated[bool, typer.Option(
               help="Pull every pinned image that is not local yet.")] = False,
           as_json: JsonOpt = False) -> None:
    """Each pinned image: local on this engine? in its registry? Exit 1 if one is neither."""
    from runner.manifest import load_manifest
    from runner.sandbox import Sandbox, SandboxConfig

    cfg = _settings()
    manifest = load_manifest(cfg.manifest)
    client = _docker_client(cfg.pull_timeout_seconds)
    sandbox = Sandbox(client, SandboxConfig(user=cfg.container_user))
    rows = []
    for proc in manifest.processors:
        local = _is_local(client, proc.image)
        pulled = None
        if pull and not local:
            try:
                sandbox.ensure_image(proc.image)
                local, pulled = True, "pulled"
            except RunnerError as exc:
                pulled = f"pull failed: {exc.message}"
        rows.append({"processor": f"{proc.name} {proc.version}", "image": proc.image,
                     "local": local, "registry": _registry_has(proc.image), "pull": pulled})
    bad = [r for r in rows if not r["local"] and r["registry"] != "present"]
    _emit(rows, as_json, [f"{r['processor']:<24} local={'yes' if r['local'] else 'NO':<3} "
                          f"registry={r['registry']}" + (f"  {r['pull']}" if r["pull"] else "")
                          + f"\n    {r['image']}" for r in rows]
          + [f"PROBLEM {len(bad)} pinned image(s) neither local nor in their registry"] * bool(bad))
    if bad:
        raise typer.Exit(1)


# Disk ---------------------------------------------------------------------------

def _image_refs(client: Any, prefix: str) -> list[tuple[str, str, int]]:
    """(reference, image id, size) of every local image reference under `prefix`."""
    found = []
    for image in client.api.images():
        for ref in (image.get("RepoTags") or []) + (image.get("RepoDigests") or []):
            if ref.startswith(prefix):
                found.append((ref, image["Id"], int(image.get("Size") or 0)))
    return found


def _pinned_ids(client: Any, cfg: Settings) -> set[str]:
    from runner.manifest import load_manifest

    ids = set()
    for proc in load_manifest(cfg.manifest).processors:
        if _is_local(client, proc.image):
            ids.add(client.api.inspect_image(proc.image)["Id"])
    return ids


PrefixOpt = Annotated[str | None, typer.Option(
    help="Image references to consider (default: $RUNNER_REGISTRY/processors/).")]


@ops_app.command("disk")
@ops_command
def disk(prefix: PrefixOpt = None, as_json: JsonOpt = False) -> None:
    """Where the space goes: stored run logs, truncated runs, unpinned processor images."""
    cfg = _settings()
    store = Store(cfg.database_url)
    size = func.length(LogChunkRow.data)
    day_ago = utcnow() - timedelta(days=1)
    try:
        with store.session() as session:
            total = session.scalar(select(func.coalesce(func.sum(size), 0)))
            by_processor = session.execute(
                select(RunRow.processor, func.sum(size)).join(RunRow, RunRow.id ==
                                                              LogChunkRow.run_id)
                .group_by(RunRow.processor).order_by(func.sum(size).desc()).limit(10)).all()
            top = session.execute(
                select(LogChunkRow.run_id, func.sum(size)).group_by(LogChunkRow.run_id)
                .order_by(func.sum(size).desc()).limit(5)).all()
            truncated = session.execute(
                select(RunRow.processor, func.count()).where(
                    RunRow.log_truncated.is_(True), RunRow.created_at >= day_ago)
                .group_by(RunRow.processor)).all()
            db_size = None
            if store.engine.dialect.name == "postgresql":
                db_size = session.scalar(select(func.pg_database_size(func.current_database())))
    finally:
        store.close()
    if db_size is None and cfg.database_url.startswith("sqlite:///"):
        path = Path(cfg.database_url.removeprefix("sqlite:///"))
        db_size = path.stat().st_size if path.exists() else 0
    data: dict[str, Any] = {
        "database_bytes": db_size, "log_bytes": int(total or 0),
        "log_bytes_by_processor": {p: int(n) for p, n in by_processor},
        "top_runs_by_log_bytes": {r: int(n) for r, n in top},
        "truncated_runs_last_day": {p: int(n) for p, n in truncated},
    }
    client = _docker_client()
    pinned = _pinned_ids(client, cfg)
    refs = _image_refs(client, prefix or f"{cfg.registry}/processors/")
    data["unpinned_images"] = sorted({ref for ref, image_id, _ in refs if image_id not in pinned})
    data["unpinned_image_bytes"] = sum({i: s for _, i, s in refs if i not in pinned}.values())
    lines = [f"database size     {db_size} bytes", f"stored run logs   {data['log_bytes']} bytes"]
    lines += [f"  {p:<20} {n} bytes" for p, n in data["log_bytes_by_processor"].items()]
    lines += [f"  run {r}  {n} bytes" for r, n in data["top_runs_by_log_bytes"].items()]
    lines += [f"truncated (24h)   {p}: {n} run(s)"
              for p, n in data["truncated_runs_last_day"].items()]
    lines.append(f"unpinned images   {len(data['unpinned_images'])} reference(s), "
                 f"{data['unpinned_image_bytes']} bytes")
    lines += [f"  {ref}" for ref in data["unpinned_images"]]
    _emit(data, as_json, lines)


@ops_app.command("prune-logs")
@ops_command
def prune_logs(older_than: Annotated[str, typer.Option(
                   help="Runs that ended longer ago than this, e.g. 30d is 720h.")],
               processor: ProcessorOpt = None,
               yes: Annotated[bool, typer.Option("--yes", help="Delete; without it, count.")]
               = False) -> None:
    """Delete the stored output of runs that ended before a cutoff (runs themselves stay)."""
    cfg = _settings()
    store = Store(cfg.database_url)
    cutoff = utcnow() - timedelta(seconds=_duration(older_than, "--older-than"))
    ended = select(RunRow.id).where(RunRow.status.in_(TERMINAL), RunRow.finished_at < cutoff)
    if processor:
        ended = ended.where(RunRow.processor == processor)
    chosen = LogChunkRow.run_id.in_(ended)
    try:
        with store.session() as session:
            chunks, size = session.execute(select(
                func.count(), func.coalesce(func.sum(func.length(LogChunkRow.data)), 0))
                .where(chosen)).one()
            if yes:
                session.execute(delete(LogChunkRow).where(chosen)
                                .execution_options(synchronize_session=False))
    finally:
        store.close()
    verb = "deleted" if yes else "would delete (add --yes)"
    typer.echo(f"{verb} {chunks} log chunk(s), {size} bytes, of runs ended before "
               f"{cutoff.isoformat(timespec='seconds')}")


@ops_app.command("prune-images")
@ops_command
def prune_images(prefix: PrefixOpt = None,
                 yes: Annotated[bool, typer.Option("--yes", help="Remove; without it, list.")]
                 = False) -> None:
    """Untag local processor images the manifest no longer pins and no container uses."""
    import docker.errors

    cfg = _settings()
    client = _docker_client()
    pinned = _pinned_ids(client, cfg)
    in_use = {c.get("ImageID") for c in client.api.containers(all=True)}
    removed = 0
    for ref, image_id, _size in _image_refs(client, prefix or f"{cfg.registry}/processors/"):
        if image_id in pinned or image_id in in_use:
            continue
        if not yes:
            typer.echo(f"would remove {ref}")
            continue
        try:
            client.api.remove_image(ref)
            removed += 1
            typer.echo(f"removed {ref}")
        except docker.errors.APIError as exc:
            typer.echo(f"kept {ref}: {exc.explanation or exc}", err=True)
    if yes:
        typer.echo(f"{removed} reference(s) removed")


# The manifest --------------------------------------------------------------------

@ops_app.command("manifest-install")
@ops_command
def manifest_install(new: Path) -> None:
    """Validate NEW, keep the current file as FILE.prev, and swap NEW in atomically."""
    from runner.manifest import load_manifest

    cfg = _settings()
    fresh = load_manifest(new)  # an invalid file stops here, one line per problem
    target = cfg.manifest
    if target.exists():
        try:
            load_manifest(target)
            shutil.copy2(target, target.with_name(target.name + ".prev"))
        except ManifestError:
            typer.echo(f"{target} is invalid now; not kept as .prev", err=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(new.read_bytes())
    os.replace(tmp, target)
    typer.echo(f"installed {new} as {target}: revision {fresh.revision[:19]}, "
               f"{len(fresh.processors)} processor(s); running processes load it on their "
               "next lookup")
