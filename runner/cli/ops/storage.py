"""`runner ops images`, `disk`, `prune-logs`, `prune-runs`, `prune-images` and
`manifest-install`."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from runner.cli.ops.common import (
    JsonOpt,
    PrefixOpt,
    ProcessorOpt,
    docker_client,
    duration,
    emit,
    ops_app,
    ops_command,
    settings,
)
from runner.control.store import Store
from runner.domain import utcnow
from runner.errors import ManifestError, RunnerError
from runner.settings import Settings

# Images and the registry ------------------------------------------------------------

def _registry_has(ref: str) -> str:
    import httpx

    from runner.authoring.publish import MANIFEST_MEDIA_TYPES

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


@ops_app.command("images")
@ops_command
def images(pull: Annotated[bool, typer.Option(
               help="Pull every pinned image that is not local yet.")] = False,
           as_json: JsonOpt = False) -> None:
    """Each pinned image: local on this engine? in its registry? Exit 1 if one is neither."""
    from runner.manifest import load_manifest
    from runner.sandbox import Sandbox, SandboxConfig

    cfg = settings()
    manifest = load_manifest(cfg.manifest)
    client = docker_client(cfg.pull_timeout_seconds)
    sandbox = Sandbox(client, SandboxConfig(user=cfg.container_user))
    rows = []
    for proc in manifest.processors:
        local = sandbox.images.is_local(proc.image)
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
    emit(rows, as_json, [f"{r['processor']:<24} local={'yes' if r['local'] else 'NO':<3} "
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
    from runner.sandbox.images import Images

    images = Images(client.api)
    ids = set()
    for proc in load_manifest(cfg.manifest).processors:
        if images.is_local(proc.image):
            ids.add(client.api.inspect_image(proc.image)["Id"])
    return ids


@ops_app.command("disk")
@ops_command
def disk(prefix: PrefixOpt = None, as_json: JsonOpt = False) -> None:
    """Where the space goes: stored run logs, truncated runs, unpinned processor images."""
    cfg = settings()
    store = Store(cfg.database_url)
    day_ago = utcnow() - timedelta(days=1)
    try:
        total = store.stored_log_bytes()
        by_processor = store.log_bytes_by_processor(limit=10)
        top = store.top_runs_by_log_bytes(limit=5)
        truncated = store.truncated_runs_by_processor(since=day_ago)
        db_size = store.database_bytes()
    finally:
        store.close()
    if db_size is None and cfg.database_url.startswith("sqlite:///"):
        path = Path(cfg.database_url.removeprefix("sqlite:///"))
        db_size = path.stat().st_size if path.exists() else 0
    data: dict[str, Any] = {
        "database_bytes": db_size, "log_bytes": total,
        "log_bytes_by_processor": by_processor,
        "top_runs_by_log_bytes": top,
        "truncated_runs_last_day": truncated,
    }
    client = docker_client()
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
    emit(data, as_json, lines)


@ops_app.command("prune-logs")
@ops_command
def prune_logs(older_than: Annotated[str, typer.Option(
                   help="Runs that ended longer ago than this, e.g. 30d is 720h.")],
               processor: ProcessorOpt = None,
               yes: Annotated[bool, typer.Option("--yes", help="Delete; without it, count.")]
               = False) -> None:
    """Delete the stored output of runs that ended before a cutoff (runs themselves stay)."""
    cfg = settings()
    store = Store(cfg.database_url)
    cutoff = utcnow() - timedelta(seconds=duration(older_than, "--older-than"))
    try:
        if yes:
            chunks, size = store.delete_logs_ended_before(cutoff=cutoff, processor=processor)
        else:
            chunks, size = store.logs_ended_before(cutoff=cutoff, processor=processor)
    finally:
        store.close()
    verb = "deleted" if yes else "would delete (add --yes)"
    typer.echo(f"{verb} {chunks} log chunk(s), {size} bytes, of runs ended before "
               f"{cutoff.isoformat(timespec='seconds')}")


@ops_app.command("prune-runs")
@ops_command
def prune_runs(older_than: Annotated[str, typer.Option(
                   help="Runs that ended longer ago than this, e.g. 30d.")],
               batch: Annotated[int, typer.Option(min=1, max=100_000,
                                                  help="Runs deleted per transaction.")] = 500,
               yes: Annotated[bool, typer.Option("--yes", help="Delete; without it, count.")]
               = False) -> None:
    """Delete runs that ended before a cutoff, with their attempts and stored output,
    in small batches (what RUNNER_RETENTION_DAYS does in the reconciler). Queued and
    running runs are never deleted."""
    cfg = settings()
    store = Store(cfg.database_url)
    cutoff = utcnow() - timedelta(seconds=duration(older_than, "--older-than"))
    try:
        total = store.count_runs_ended_before(cutoff=cutoff)
        if not yes:
            typer.echo(f"would delete {total} run(s) ended before "
                       f"{cutoff.isoformat(timespec='seconds')} (add --yes)")
            return
        deleted = 0
        while (done := store.prune_runs_ended_before(cutoff=cutoff, batch=batch)):
            deleted += done
            typer.echo(f"deleted {deleted} of {total} run(s)", err=True)
    finally:
        store.close()
    typer.echo(f"deleted {deleted} run(s) ended before {cutoff.isoformat(timespec='seconds')}")


@ops_app.command("prune-images")
@ops_command
def prune_images(prefix: PrefixOpt = None,
                 yes: Annotated[bool, typer.Option("--yes", help="Remove; without it, list.")]
                 = False) -> None:
    """Untag local processor images the manifest no longer pins and no container uses."""
    import docker.errors

    cfg = settings()
    client = docker_client()
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

    cfg = settings()
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
