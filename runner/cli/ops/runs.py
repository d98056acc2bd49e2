"""`runner ops dead-letters`, `replay`, `cancel-queued` and `wait-idle`."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from typing import Annotated, Any

import typer

from runner.cli.ops.common import (
    ACTIVE,
    CodeOpt,
    JsonOpt,
    ProcessorOpt,
    SinceOpt,
    age,
    duration,
    emit,
    ops_app,
    ops_command,
    settings,
)
from runner.control.files import catalog_for, run_files
from runner.control.lifecycle import Lifecycle
from runner.control.notify import RunEndNotice
from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.control.webhooks import WebhookRules
from runner.domain import ErrorCode, RunStatus, utcnow
from runner.errors import RunnerError

# Dead letters and replay ----------------------------------------------------------

def _dead_letters(store: Store, *, since: float, processor: str | None,
                  error_code: str | None) -> list[dict[str, Any]]:
    """Dead letters ended in the last `since` seconds, each with its replays' states."""
    now = utcnow()
    rows = store.dead_letters(since=now - timedelta(seconds=since), processor=processor,
                              error_code=error_code)
    by_original: dict[str, list[dict[str, str]]] = {}
    for original, replay_id, replay_status in store.replays_of([r.id for r in rows]):
        by_original.setdefault(original, []).append({"id": replay_id, "status": replay_status})
    found = []
    for r in rows:
        states = {x["status"] for x in by_original.get(r.id, [])}
        found.append({
            "id": r.id, "tenant": r.tenant, "processor": r.processor, "version": r.version,
            "error_code": r.error_code, "error_stage": r.error_stage,
            "error_message": r.error_message, "attempts": r.attempt, "image": r.image,
            "finished_age_s": age(r.finished_at, now),
            "replays": by_original.get(r.id, []),
            "resolved": RunStatus.SUCCEEDED.value in states,
            "replay_pending": bool(states & set(ACTIVE)),
        })
    return found



@ops_app.command("dead-letters")
@ops_command
def dead_letters(since: SinceOpt = "1h", processor: ProcessorOpt = None,
                 error_code: CodeOpt = None, as_json: JsonOpt = False,
                 unresolved: Annotated[bool, typer.Option(
                     help="Only those not (being) replayed to success; exit 1 if any.")] = False
                 ) -> None:
    """Dead letters by processor and error code, with their replays."""
    cfg = settings()
    store = Store(cfg.database_url)
    try:
        found = _dead_letters(store, since=duration(since, "--since"), processor=processor,
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
    emit(found, as_json, lines)
    if unresolved and found:
        raise typer.Exit(1)


@ops_app.command("replay")
@ops_command
def replay_dead_letters(since: SinceOpt = "1h", processor: ProcessorOpt = None,
                        error_code: CodeOpt = None,
                        yes: Annotated[bool, typer.Option(
                            "--yes", help="Replay; without it, only list.")] = False) -> None:
    """Replay dead letters not already replayed (each as a new run, on today's pin)."""
    from runner.control.runs import replay
    from runner.manifest import load_manifest

    cfg = settings()
    store = Store(cfg.database_url)
    try:
        todo = [d for d in _dead_letters(store, since=duration(since, "--since"),
                                         processor=processor, error_code=error_code)
                if not d["resolved"] and not d["replay_pending"]]
        if not yes:
            for d in todo:
                typer.echo(f"would replay {d['id']} ({d['processor']} {d['error_code']})")
            typer.echo(f"{len(todo)} dead letter(s) to replay; add --yes to replay them")
            return
        manifest = load_manifest(cfg.manifest)
        queue = RunQueue.from_url(cfg.redis_url, fair=cfg.fair_dequeue == "on")
        # The API's rules for the replays' files and webhooks, under these settings.
        files, webhooks = run_files(catalog_for(cfg, store), cfg), WebhookRules.from_settings(cfg)
        failed = 0
        for d in todo:
            try:
                new = replay(d["id"], tenant=None, manifest=manifest, store=store, queue=queue,
                             default_queue=cfg.queue, stop_grace_seconds=cfg.stop_grace_seconds,
                             input_max_bytes=cfg.input_max_bytes, file_rules=files,
                             webhook_rules=webhooks)
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
    cfg = settings()
    store = Store(cfg.database_url)
    try:
        ids = store.queued_run_ids(processor=processor, tenant=tenant)
        if not yes:
            typer.echo(f"{len(ids)} queued run(s) match; add --yes to cancel them")
            return
        # Each cancel is told to the run-end listeners, so held long polls answer now.
        redis = RunQueue.from_url(cfg.redis_url).redis
        lifecycle = Lifecycle(store, listeners=[RunEndNotice(redis, cfg.instance)])
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
    cfg = settings()
    store = Store(cfg.database_url)
    deadline = time.monotonic() + duration(timeout, "--timeout")
    last = 0.0
    try:
        while True:
            active = store.count_runs_by_status(statuses=ACTIVE, processor=processor)
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

