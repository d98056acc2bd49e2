"""Build processor images, push them to a registry and read back the pinned digest.

`processor.yaml` in a processor directory names it; with `template: python|shell`
the template's files are laid under the directory's own, so a processor can be one
script and a few lines of YAML.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import structlog

from runner.errors import ManifestError, PublishError
from runner.manifest import Processor, parse_manifest
from runner.manifest.yamlio import dump_manifest, load_yaml

log = structlog.get_logger(__name__)

TEMPLATES = Path(__file__).resolve().parents[2] / "processor-templates"
LOCAL_BASES = {"python": "runner-base/python:local", "shell": "runner-base/busybox:local"}
MANIFEST_MEDIA_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
])
ENTRY_KEYS = ("description", "limits", "retry", "queue", "max_concurrency", "input_schema",
              "accepts", "reusable")
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64


@dataclass(frozen=True)
class ProcessorDir:
    path: Path
    name: str
    version: str
    template: str | None
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> ProcessorDir:
        """Raises: PublishError when processor.yaml is missing or incomplete."""
        meta_path = path / "processor.yaml"
        try:
            text = meta_path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PublishError(f"{meta_path}: cannot read: {exc}") from exc
        try:  # the manifest's reader: no anchors, aliases or duplicate keys, by line
            meta = load_yaml(text, source=str(meta_path))[1] or {}
        except ManifestError as exc:
            raise PublishError(exc.message) from exc
        if not isinstance(meta, dict):
            raise PublishError(f"{meta_path}: must be a mapping with name and version")
        for key in ("name", "version"):
            if not isinstance(meta.get(key), str) or not meta[key]:
                raise PublishError(f"{meta_path}: '{key}' must be a non-empty string")
        template = meta.get("template")
        if template is not None and template not in LOCAL_BASES:
            raise PublishError(f"{meta_path}: template must be one of {sorted(LOCAL_BASES)}")
        if template is None and not (path / "Dockerfile").exists():
            raise PublishError(f"{path}: needs a Dockerfile or 'template:' in processor.yaml")
        return cls(path=path, name=meta["name"], version=meta["version"], template=template,
                   meta=meta)

    def repository(self, registry: str) -> str:
        return f"{registry}/processors/{self.name}"


def _context(proc: ProcessorDir, into: Path) -> Path:
    """The build context: the template's files, overlaid by the processor's own."""
    if proc.template is not None:
        shutil.copytree(TEMPLATES / proc.template, into, dirs_exist_ok=True)
    shutil.copytree(proc.path, into, dirs_exist_ok=True)
    return into


def build(proc: ProcessorDir, *, registry: str, client: docker.DockerClient,
          base: str | None = None, local_base: bool = False) -> str:
    """Build the processor image tagged `registry/processors/NAME:VERSION`; its id.

    Raises:
        PublishError: the build failed (its last log lines are in the message).
    """
    if base is None and local_base:
        if proc.template is None:
            raise PublishError(f"{proc.path}: --local-base needs 'template:' in processor.yaml")
        base = LOCAL_BASES[proc.template]
    tag = f"{proc.repository(registry)}:{proc.version}"
    with tempfile.TemporaryDirectory(prefix="runner-build-") as tmp:
        context = _context(proc, Path(tmp) / "context")
        try:
            image, _logs = client.images.build(
                path=str(context), tag=tag, rm=True, forcerm=True, pull=False,
                buildargs={"BASE": base} if base else None,
                labels={"io.container-runner.processor": proc.name,
                        "io.container-runner.version": proc.version},
            )
        except docker.errors.BuildError as exc:
            tail = [str(line.get("stream", line.get("error", ""))).strip()
                    for line in list(exc.build_log)[-5:]]
            raise PublishError(f"build of {tag} failed: {exc.msg}: {' | '.join(tail)}") from exc
        except docker.errors.DockerException as exc:
            raise PublishError(f"build of {tag} failed: {exc}") from exc
    image_id: str = image.id
    log.info("processor_built", tag=tag, image_id=image_id)
    return image_id


def registry_digest(repository: str, tag: str, *, timeout: float = 10) -> str:
    """Ask the registry which manifest digest `repository:tag` points at now.

    Raises:
        PublishError: the registry does not know the tag or cannot be reached.
    """
    host, _, name = repository.partition("/")
    scheme = "http" if host.startswith(("127.", "localhost", "[::1]")) else "https"
    url = f"{scheme}://{host}/v2/{name}/manifests/{tag}"
    try:
        response = httpx.head(url, headers={"Accept": MANIFEST_MEDIA_TYPES}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise PublishError(f"registry {host} unreachable: {exc}") from exc
    digest = response.headers.get("Docker-Content-Digest")
    if response.status_code != 200 or not digest:
        raise PublishError(f"registry has no {repository}:{tag} (HTTP {response.status_code})")
    return str(digest)


def push(proc: ProcessorDir, *, registry: str, client: docker.DockerClient) -> str:
    """Push the built tag and return the pinned reference `repo@sha256:...`.

    The digest is read back from the registry and must match what the push reported.

    Raises:
        PublishError: the push failed or the registry disagrees with it.
    """
    repository = proc.repository(registry)
    pushed: str | None = None
    try:
        for event in client.api.push(repository, tag=proc.version, stream=True, decode=True):
            if "error" in event:
                raise PublishError(f"push of {repository}:{proc.version} failed: "
                                   f"{event['error']}")
            digest = (event.get("aux") or {}).get("Digest")
            if digest:
                pushed = digest
    except docker.errors.DockerException as exc:
        raise PublishError(f"push of {repository}:{proc.version} failed: {exc}") from exc
    remote = registry_digest(repository, proc.version)
    if pushed is not None and pushed != remote:
        raise PublishError(f"registry reports {remote} for {repository}:{proc.version}, "
                           f"but the push reported {pushed}")
    return f"{repository}@{remote}"


def allowlist_entry(proc: ProcessorDir, image: str) -> dict[str, Any]:
    """The manifest entry for a published processor."""
    entry: dict[str, Any] = {"name": proc.name, "version": proc.version, "image": image}
    entry.update({k: proc.meta[k] for k in ENTRY_KEYS if k in proc.meta})
    return entry


def _entry_problem(problem: str, meta: Path) -> str:
    """A problem of the synthetic one-entry manifest, said about processor.yaml."""
    match = re.match(r"^<processor\.yaml>(?::\d+)?: (?:processors\[0\](?:\.|: ))?(.*)$",
                     problem, re.DOTALL)
    return f"{meta}: {match[1]}" if match else problem


def entry_settings(proc: ProcessorDir, *, registry: str) -> Processor:
    """processor.yaml's entry as a manifest would take it: limits, retry, input_schema.

    The entry (with a placeholder digest) goes through `parse_manifest`, so every
    manifest rule holds for it (limit floors, input_schema references and patterns);
    `publish` checks it before building, `runner processor run` uses it.

    Raises:
        ManifestError: each problem names processor.yaml and the entry's path.
    """
    image = f"{proc.repository(registry)}@{PLACEHOLDER_DIGEST}"
    text = dump_manifest({"version": 1, "processors": [allowlist_entry(proc, image)]})
    meta = proc.path / "processor.yaml"
    try:
        return parse_manifest(text, source="<processor.yaml>").processors[0]
    except ManifestError as exc:
        raise ManifestError(problems=[_entry_problem(p, meta)
                                      for p in exc.problems or [exc.message]]) from exc


def refuse_volumes(proc: ProcessorDir, image_id: str, *, client: docker.DockerClient) -> None:
    """Refuse an image that declares a `VOLUME`: workers refuse to run it
    (`image_not_allowed`), since each declared path would be a writable, executable
    disk path outside /run/out and /tmp.

    Raises:
        PublishError: naming the declared volumes.
    """
    try:
        attrs = client.api.inspect_image(image_id)
    except docker.errors.DockerException as exc:
        raise PublishError(f"inspect of {image_id} failed: {exc}") from exc
    volumes = sorted((attrs.get("Config") or {}).get("Volumes") or {})
    if volumes:
        raise PublishError(f"{proc.path}: the image declares VOLUME {', '.join(volumes)}; "
                           f"workers refuse such images (image_not_allowed): remove the "
                           f"VOLUME instruction (from the Dockerfile or its base image) and "
                           f"write to /run/out or /tmp")


def publish(path: Path, *, registry: str, client: docker.DockerClient,
            base: str | None = None, local_base: bool = False) -> dict[str, Any]:
    """Build, push and return the allowlist entry pinning the pushed digest. An image
    that declares a `VOLUME` is refused before it is pushed.

    Raises:
        ManifestError: the entry processor.yaml makes would be refused by a manifest
            (checked before the build; each problem names processor.yaml).
    """
    proc = ProcessorDir.load(path)
    entry_settings(proc, registry=registry)  # processor.yaml's problems before any build
    image_id = build(proc, registry=registry, client=client, base=base, local_base=local_base)
    refuse_volumes(proc, image_id, client=client)
    image = push(proc, registry=registry, client=client)
    log.info("processor_published", name=proc.name, version=proc.version, image=image)
    return allowlist_entry(proc, image)
