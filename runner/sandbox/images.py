"""Pinned images on the engine: make them local, and prove they carry the pinned digest.

The one place digests are checked: the worker (before each create and in the prefetch
at start) and `runner ops images` both go through `Images`. A pull is always by
digest, never by tag.

An image that declares a `VOLUME` is refused here too (`ImageNotAllowedError`): the
engine would give each declared path an anonymous volume on the host's disk, writable
and executable, around the read-only root and outside the /run bound.
"""

from __future__ import annotations

import time
from typing import Any

import docker
import docker.errors
import structlog

from runner.errors import (
    DigestMismatchError,
    DockerUnavailableError,
    ImageNotAllowedError,
    ImagePullError,
    SandboxError,
)
from runner.sandbox.spec import IMAGE_ID
from runner.sandbox.translate import docker_errors

log = structlog.get_logger(__name__)


class Images:
    """Verified local images of one engine, cached by pinned reference.

    Image ids are content hashes, so a cached entry can only go stale by the image
    being deleted: a create then fails with 404, `forget` drops the entry, and the
    next `ensure` checks (and pulls) again.
    """

    def __init__(self, api: docker.APIClient, *, allow_image_ids: bool = False) -> None:
        self.api = api
        self.allow_image_ids = allow_image_ids
        self._verified: dict[str, str] = {}

    def ensure(self, ref: str) -> tuple[str, bool]:
        """Make the pinned image local (pulling by digest only when missing): its id,
        and whether it had to be pulled.

        Raises:
            ImagePullError: the registry did not deliver the image.
            DigestMismatchError: the local image does not carry the pinned digest.
            DockerUnavailableError: the engine is unreachable.
        """
        known = self._verified.get(ref)
        if known is not None:
            return known, False
        if self.allow_image_ids and IMAGE_ID.match(ref):
            return self._local_image(ref), False
        image_id, pulled = self._check(ref)
        self._verified[ref] = image_id
        return image_id, pulled

    def forget(self, ref: str) -> None:
        self._verified.pop(ref, None)

    def prefetch(self, refs: list[str]) -> dict[str, str]:
        """Make each pinned image local ahead of its first run. Problems are logged,
        not raised (the run itself reports them). Returns ref -> problem."""
        problems: dict[str, str] = {}
        for ref in refs:
            if ref in self._verified:
                continue
            try:
                self.ensure(ref)
            except SandboxError as exc:
                problems[ref] = exc.message
                log.warning("image_prefetch_failed", image=ref, error=exc.message)
        return problems

    def is_local(self, ref: str) -> bool:
        """Whether the engine holds `ref` under its pinned digest (no pull)."""
        attrs = self._inspect(ref)
        return attrs is not None and ref in (attrs.get("RepoDigests") or [])

    def _inspect(self, ref: str) -> dict[str, Any] | None:
        with docker_errors("inspect image"):
            try:
                attrs: dict[str, Any] = self.api.inspect_image(ref)
            except docker.errors.ImageNotFound:
                return None
        return attrs

    def _local_image(self, image_id: str) -> str:
        attrs = self._inspect(image_id)
        if attrs is None:
            raise ImagePullError(f"no local image {image_id}", image=image_id)
        refuse_volumes(image_id, attrs)
        return str(attrs["Id"])

    def _check(self, ref: str) -> tuple[str, bool]:
        repo, _, digest = ref.partition("@")
        pulled = False
        attrs = self._inspect(ref)
        if attrs is None:
            started = time.monotonic()
            try:
                with docker_errors("pull"):
                    self.api.pull(repo, tag=digest)
            except DockerUnavailableError:
                raise
            except SandboxError as exc:
                raise ImagePullError(f"pull of {ref} failed: {exc.__cause__ or exc}",
                                     image=ref) from exc
            pulled = True
            log.info("image_pulled", image=ref,
                     duration_ms=round((time.monotonic() - started) * 1000, 1))
            attrs = self._inspect(ref)
            if attrs is None:
                raise ImagePullError(f"{ref} is not local after its pull", image=ref)
        if ref not in (attrs.get("RepoDigests") or []):
            raise DigestMismatchError(
                f"local image {attrs.get('Id')} does not carry the pinned digest {ref}",
                image=ref)
        refuse_volumes(ref, attrs)
        return str(attrs["Id"]), pulled


def declared_volumes(attrs: dict[str, Any]) -> list[str]:
    """The paths an image's config declares as `VOLUME` (from `inspect_image`)."""
    return sorted((attrs.get("Config") or {}).get("Volumes") or {})


def refuse_volumes(ref: str, attrs: dict[str, Any]) -> None:
    """Raises: ImageNotAllowedError when the image declares a `VOLUME`."""
    volumes = declared_volumes(attrs)
    if volumes:
        raise ImageNotAllowedError(
            f"{ref} declares VOLUME {', '.join(volumes)}: each would be a writable, "
            f"executable disk path outside /run/out and /tmp, so the image is refused",
            image=ref, volumes=volumes, stage="image")
