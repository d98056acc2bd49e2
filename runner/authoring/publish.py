"""Build processor images, push them to a registry and read back the pinned digest.

`processor.yaml` in a processor directory names it; with `template: python|shell`
the template's files are laid under the directory's own, so a processor can be one
script and a few lines of YAML.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import structlog
import yaml

from runner.errors import PublishError

log = structlog.get_logger(__name__)

TEMPLATES = Path(__file__).resolve().parents[2] / "processor-templates"
LOCAL_BASES = {"python": "runner-base/python:local", "shell": "runner-base/busybox:local"}
MANIFEST_MEDIA_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
])
ENTRY_KEYS = ("description", "limits", "retry", "queue", "max_concurrency", "input_schema")


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
            meta = yaml.safe_load(meta_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PublishError(f"{meta_path}: cannot read: {exc}") from exc
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


def publish(path: Path, *, registry: str, client: docker.DockerClient,
            base: str | None = None, local_base: bool = False) -> dict[str, Any]:
    """Build, push and return the allowlist entry pinning the pushed digest."""
    proc = ProcessorDir.load(path)
    build(proc, registry=registry, client=client, base=base, local_base=local_base)
    image = push(proc, registry=registry, client=client)
    log.info("processor_published", name=proc.name, version=proc.version, image=image)
    return allowlist_entry(proc, image)
