#!/usr/bin/env python3
"""Measure the image size and the cold and warm start time of each processor template.

    var/venv/bin/python scripts/template-start-times.py [--runs 10] [--json FILE]

Each template (processor-templates/python and /shell) is run through the production
sandbox (`runner.sandbox.Sandbox`, the workers' settings) with the template's own
main file and an empty input:

- cold: the image and every layer under it are removed from the engine, pulled
  again from the registry by digest (the production pull path; its time is reported
  apart), then run once. So that a cold pull really fetches everything, the template
  is built on a private copy of its local base (a single new layer made with
  `docker export | docker import`), never shared with runner-base/*.
- warm: the image stays local; each run is the next one.

Per run it records `first output` (from asking the sandbox to run until the
processor's first log byte: container create, input delivery, start, the
interpreter's start-up) and `total` (until the container is removed and the outcome
classified). It prints p50 (and min/max) of each, plus the images' sizes: on disk
(uncompressed, built on the real local base) and over the wire (compressed layers in
the registry). Needs Docker, the registry (RUNNER_REGISTRY, default 127.0.0.1:5000)
and the local base images (`make images`). Removes only the images it made.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.authoring.localrun import local_config, processor_settings, run_image  # noqa: E402
from runner.authoring.publish import (  # noqa: E402
    LOCAL_BASES,
    MANIFEST_MEDIA_TYPES,
    ProcessorDir,
    build,
    push,
)
from runner.sandbox import Sandbox  # noqa: E402
from runner.settings import load_settings  # noqa: E402

TEMPLATES = ("python", "shell")
TOKEN = secrets.token_hex(3)


def private_base(client: docker.DockerClient, template: str, workdir: Path) -> str:
    """A copy of the template's local base whose one layer no other image shares."""
    base = LOCAL_BASES[template]
    config = client.api.inspect_image(base)["Config"]
    container = client.api.create_container(base, command=["true"])["Id"]
    tarball = workdir / f"{template}-base.tar"
    try:
        with tarball.open("wb") as out:
            for chunk in client.api.export(container):
                out.write(chunk)
    finally:
        client.api.remove_container(container, force=True)
    changes = [f"ENV {item}" for item in config.get("Env") or []]
    if config.get("Cmd"):
        changes.append(f"CMD {json.dumps(config['Cmd'])}")
    tag = f"runner-timing/{template}-base:{TOKEN}"
    client.api.import_image(src=str(tarball), repository=tag.split(":")[0], tag=TOKEN,
                            changes=changes)
    tarball.unlink()
    return tag


def wire_size(reference: str) -> int:
    """Compressed bytes a host pulls for `repo@digest` (layers + config)."""
    repo, _, digest = reference.partition("@")
    host, _, name = repo.partition("/")
    response = httpx.get(f"http://{host}/v2/{name}/manifests/{digest}",
                         headers={"Accept": MANIFEST_MEDIA_TYPES}, timeout=30)
    response.raise_for_status()
    manifest = response.json()
    return int(sum(layer["size"] for layer in manifest["layers"])
               + manifest["config"]["size"])


def timed_run(sandbox: Sandbox, processor: Any, image: str) -> dict[str, float]:
    first: list[float] = []

    def on_log(chunk: bytes) -> None:
        if not first:
            first.append(time.perf_counter())

    began = time.perf_counter()
    done = run_image(sandbox, processor, image, b"{}", on_log=on_log)
    ended = time.perf_counter()
    if not done.succeeded or not first:
        raise RuntimeError(f"template run failed: {done.finish} {done.logs!r}")
    return {"first_output_ms": (first[0] - began) * 1000, "total_ms": (ended - began) * 1000}


def remove_everywhere(client: docker.DockerClient, reference: str) -> None:
    """Remove the pulled image (all its tags and digests) so the next pull is cold."""
    try:
        image_id = client.api.inspect_image(reference)["Id"]
    except docker.errors.ImageNotFound:
        return
    client.api.remove_image(image_id, force=True)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "n": len(values)}


def measure(client: docker.DockerClient, template: str, runs: int, registry: str,
            workdir: Path) -> dict[str, Any]:
    config = local_config(load_settings(registry=registry))
    proc = ProcessorDir.load(ROOT / "processor-templates" / template)
    processor = processor_settings(proc, registry=registry)

    # Size as authors get it: built on the shared local base.
    local_id = build(proc, registry=f"{registry}/timing-local-{TOKEN}", client=client,
                     local_base=True)
    disk_bytes = int(client.api.inspect_image(local_id)["Size"])
    base_bytes = int(client.api.inspect_image(LOCAL_BASES[template])["Size"])
    client.api.remove_image(local_id, force=True)

    base = private_base(client, template, workdir)
    timing_registry = f"{registry}/timing-{TOKEN}"
    build(proc, registry=timing_registry, client=client, base=base)
    reference = push(proc, registry=timing_registry, client=client)
    wire_bytes = wire_size(reference)
    remove_everywhere(client, reference)
    client.api.remove_image(base, force=True)

    pulls, cold = [], []
    try:
        for _ in range(runs):
            remove_everywhere(client, reference)
            # A new sandbox per cold run, as after a worker restart: it remembers no
            # image it checked before, so the pull below really happens.
            sandbox = Sandbox(client, config)
            began = time.perf_counter()
            sandbox.ensure_image(reference)
            pulls.append((time.perf_counter() - began) * 1000)
            cold.append(timed_run(sandbox, processor, reference))
        warm = [timed_run(sandbox, processor, reference) for _ in range(runs)]
    finally:
        remove_everywhere(client, reference)
    return {
        "template": template,
        "image_disk_bytes": disk_bytes,
        "base_disk_bytes": base_bytes,
        "added_by_template_bytes": disk_bytes - base_bytes,
        "image_wire_bytes": wire_bytes,
        "pull_ms": summary(pulls),
        "cold_first_output_ms": summary([r["first_output_ms"] for r in cold]),
        "cold_total_ms": summary([r["total_ms"] for r in cold]),
        "warm_first_output_ms": summary([r["first_output_ms"] for r in warm]),
        "warm_total_ms": summary([r["total_ms"] for r in warm]),
    }


def mb(value: int) -> str:
    return f"{value / 1e6:.1f} MB"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| Template | Image on disk | Pulled (compressed) | Pull from local registry | "
             "Cold: first output / total | Warm: first output / total |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['template']} | {mb(r['image_disk_bytes'])} | {mb(r['image_wire_bytes'])} | "
            f"{r['pull_ms']['p50']:.0f} ms | "
            f"{r['cold_first_output_ms']['p50']:.0f} / {r['cold_total_ms']['p50']:.0f} ms | "
            f"{r['warm_first_output_ms']['p50']:.0f} / {r['warm_total_ms']['p50']:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="cold and warm runs each")
    parser.add_argument("--registry", default=load_settings().registry)
    parser.add_argument("--template", action="append", choices=TEMPLATES)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    client = docker.from_env(timeout=300)
    results = []
    with tempfile.TemporaryDirectory(prefix="template-timing-") as tmp:
        for template in args.template or TEMPLATES:
            print(f"measuring {template} ({args.runs} cold + {args.runs} warm runs)...",
                  file=sys.stderr, flush=True)
            results.append(measure(client, template, args.runs, args.registry, Path(tmp)))
    print(table(results))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
