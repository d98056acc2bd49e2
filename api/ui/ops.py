"""`/ui/processors`, `/ui/workers` and `/ui/dead-letters`: what runs where, and what
did not.

Processors are the manifest in force (`ManifestSource.current`, the API's own), with
its revision, the file's modification time, the reloads counted so far, and, when the
file on disk is not the revision in force, why it was refused. Workers are RQ's
registrations in Redis (`runner.control.uiqueries`, what `runner ops status` reads);
the API cannot reach Docker, so Docker's state is what the workers show: a worker
only starts after it reached its engine, and a platform that lost it ends runs as
`docker_unavailable`. A worker's current run is a link only when it is the viewer's
tenant's; another tenant's is not even named.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from api.deps import Services
from api.ui.access import State, Svc, User
from api.ui.security import UiRoute, templates
from runner.control.uiqueries import queue_depths, registered_workers
from runner.domain import ErrorCode, utcnow
from runner.errors import ManifestError, RunnerError
from runner.manifest.parse import parse_manifest, revision_of
from runner.manifest.yamlio import read_text

router = APIRouter(route_class=UiRoute)

DOCKER_WINDOW = timedelta(minutes=15)
DEAD_LETTER_PAGE = 50
DEAD_LETTER_TAIL_BYTES = 2048
DEAD_LETTER_TAIL_LINES = 3


def _manifest_file(svc: Services, revision: str) -> dict[str, Any]:
    """The manifest file as it is on disk now, beside the revision in force."""
    path = svc.manifests.path
    facts: dict[str, Any] = {"path": str(path), "mtime": None, "revision": None,
                             "in_force": False, "problems": []}
    try:
        facts["mtime"] = datetime.fromtimestamp(os.stat(path).st_mtime, UTC)
        text = read_text(path)
    except (OSError, ManifestError) as exc:
        facts["problems"] = [getattr(exc, "message", str(exc))]
        return facts
    facts["revision"] = revision_of(text)
    facts["in_force"] = facts["revision"] == revision
    if not facts["in_force"]:
        try:
            parse_manifest(text, source=str(path))
        except ManifestError as exc:
            facts["problems"] = exc.problems or [exc.message]
    return facts


@router.get("/ui/processors")
def processors_page(request: Request, user: User, svc: Svc) -> Response:
    """Every processor version the manifest in force allows, and how it got there."""
    manifest = svc.manifests.current()
    entries = sorted(manifest.processors, key=lambda p: (p.name, p.version))
    return templates.TemplateResponse(request, "processors.html", {
        "user": user, "nav": "processors", "processors": entries,
        "revision": manifest.revision, "file": _manifest_file(svc, manifest.revision),
        "reloads_ok": svc.manifests.reloads_ok,
        "reloads_refused": svc.manifests.reloads_refused})


def _check(probe: Callable[[], object]) -> str:
    try:
        probe()
    except RunnerError as exc:
        return exc.message
    return "ok"


@router.get("/ui/workers")
def workers_page(request: Request, user: User, svc: Svc, state: State) -> Response:
    """Hosts and their workers, queue depths, and what each dependency reports."""
    readiness = {"database": _check(svc.store.ping), "redis": _check(svc.queue.ping),
                 "manifest": _check(svc.manifests.current)}
    workers: list[Any] = []
    depths: dict[str, int] = {}
    links: set[str] = set()
    try:
        # The queues runs are sent to now: the default and any a processor names.
        queues = {svc.settings.queue, *(p.queue for p in svc.manifests.current().processors
                                        if p.queue)}
        workers = registered_workers(svc.queue.redis, queues)
        depths = queue_depths(svc.queue.redis, queues)
        links = state.queries.tenant_run_ids(
            tenant=user.tenant, ids=[w.run_id for w in workers if w.run_id])
    except RunnerError as exc:
        readiness["redis"] = exc.message if readiness["redis"] == "ok" else readiness["redis"]
    hosts: dict[str, dict[str, int]] = {}
    for worker in workers:
        host = hosts.setdefault(worker.hostname, {"alive": 0, "busy": 0, "draining": 0})
        host["alive"] += 1
        host["busy"] += worker.state == "busy"
        host["draining"] += worker.draining
    try:
        docker_errors: int | None = state.queries.recent_error_count(
            error_code=ErrorCode.DOCKER_UNAVAILABLE.value, since=utcnow() - DOCKER_WINDOW)
    except RunnerError:
        docker_errors = None
    if not workers:
        docker = "unknown: no live worker to report it"
    elif docker_errors:
        docker = (f"{docker_errors} run(s) ended docker_unavailable in the last "
                  f"{int(DOCKER_WINDOW.total_seconds() // 60)} minutes")
    else:
        docker = "ok"
    readiness["docker (from the workers)"] = docker
    return templates.TemplateResponse(request, "workers.html", {
        "user": user, "nav": "workers", "hosts": hosts, "workers": workers,
        "links": links, "depths": depths, "readiness": readiness, "now": utcnow()})


def _tail(svc: Services, run_id: str, log_bytes: int) -> list[str]:
    start = max(0, log_bytes - DEAD_LETTER_TAIL_BYTES)
    text = svc.store.read_logs_since(run_id, start, DEAD_LETTER_TAIL_BYTES)
    return text.decode(errors="replace").splitlines()[-DEAD_LETTER_TAIL_LINES:]


@router.get("/ui/dead-letters")
def dead_letters_page(request: Request, user: User, svc: Svc, state: State,
                      cursor: Annotated[str | None, Query(max_length=200)] = None
                      ) -> Response:
    """The tenant's dead letters, newest first, each with why and its last lines."""
    found, next_cursor = state.queries.dead_letters(tenant=user.tenant,
                                                    limit=DEAD_LETTER_PAGE, cursor=cursor)
    replays: dict[str, list[dict[str, str]]] = {}
    for original, replay_id, status in svc.store.replays_of([d.id for d in found]):
        replays.setdefault(original, []).append({"id": replay_id, "status": status})
    rows = [{"run": d, "tail": _tail(svc, d.id, d.log_bytes),
             "replays": replays.get(d.id, [])} for d in found]
    return templates.TemplateResponse(request, "dead_letters.html", {
        "user": user, "nav": "dead-letters", "rows": rows,
        "total": state.queries.count_dead_letters(tenant=user.tenant),
        "next_url": f"/ui/dead-letters?cursor={next_cursor}" if next_cursor else None})
