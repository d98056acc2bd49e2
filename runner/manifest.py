"""The allowlist manifest: YAML checked by a JSON Schema, parsed once into frozen objects.

Every error names the YAML line and the path inside the document. `ManifestSource`
reloads an edited file on the next lookup and keeps the last good manifest in force
when an edit is invalid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import structlog
import yaml

from runner.errors import ManifestError
from runner.units import parse_duration, parse_size

log = structlog.get_logger(__name__)

IMAGE_REF = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:\.[a-z0-9-]+)*(?::[0-9]{1,5})?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"@(?P<digest>sha256:[a-f0-9]{64})$"
)
# Exit 75 is the processor contract's "retry me"; the other two are the platform's own
# transient failures. Retries happen only when max_attempts is above 1.
DEFAULT_RETRY_ON = frozenset({"exit:75", "worker_lost", "docker_unavailable"})


@dataclass(frozen=True)
class Limits:
    """Resource limits of one processor, in base units."""

    cpus: float = 1.0
    memory_bytes: int = 256 * 1024**2
    pids: int = 128
    timeout_seconds: float = 300.0
    log_bytes: int = 4 * 1024**2


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts are retried (applied by the executor)."""

    max_attempts: int = 1
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    on: frozenset[str] = DEFAULT_RETRY_ON


@dataclass(frozen=True)
class Processor:
    """One allowlisted processor version and its pinned image."""

    name: str
    version: str
    image: str
    repo: str
    digest: str
    limits: Limits
    retry: RetryPolicy
    queue: str | None = None
    max_concurrency: int | None = None
    description: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def public(self) -> dict[str, Any]:
        """The processor as API clients see it."""
        return {
            "name": self.name,
            "version": self.version,
            "image": self.image,
            "description": self.description,
            "limits": {
                "cpus": self.limits.cpus,
                "memory_bytes": self.limits.memory_bytes,
                "pids": self.limits.pids,
                "timeout_seconds": self.limits.timeout_seconds,
                "log_bytes": self.limits.log_bytes,
            },
            "max_attempts": self.retry.max_attempts,
            "max_concurrency": self.max_concurrency,
            "input_schema": dict(self.input_schema),
        }


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version))


@dataclass(frozen=True)
class Manifest:
    """A validated manifest; `revision` is the SHA-256 of the file's bytes."""

    processors: tuple[Processor, ...]
    revision: str
    source: str = "<string>"

    def find(self, name: str, version: str | None = None) -> Processor | None:
        """The named processor at `version`, or its highest version when none is given."""
        matches = [p for p in self.processors if p.name == name]
        if version is not None:
            matches = [p for p in matches if p.version == version]
        if not matches:
            return None
        return max(matches, key=lambda p: _version_key(p.version))

    def allows(self, name: str, version: str, image: str) -> bool:
        """True when exactly this image is pinned for this processor version."""
        found = self.find(name, version)
        return found is not None and found.image == image


@cache
def schema() -> dict[str, Any]:
    """The manifest's JSON Schema (Draft 2020-12)."""
    text = resources.files("runner").joinpath("manifest_schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: `on`, `off`, `yes`, `no` stay strings.

    The manifest's retry policy has an `on:` key, which YAML 1.1 would read as True.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _line_of(node: yaml.Node | None, path: list[str | int]) -> int | None:
    """1-based line of the YAML node at `path`, or of its deepest existing parent."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    child = value
                    break
        elif (isinstance(node, yaml.SequenceNode) and isinstance(part, int)
              and 0 <= part < len(node.value)):
            child = node.value[part]
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line


def _path_text(path: list[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def _image_problem(value: object) -> str | None:
    """Why an image reference is not acceptable, or None when it is."""
    if not isinstance(value, str):
        return "must be a string repo@sha256:<64 hex>"
    if IMAGE_REF.match(value):
        return None
    if "@" not in value:
        last = value.rsplit("/", 1)[-1]
        if ":" in last:
            return f"{value!r} is pinned by tag; only repo@sha256:<64 hex> references are allowed"
        return f"{value!r} is a bare name; only repo@sha256:<64 hex> references are allowed"
    return f"{value!r} has a malformed digest; expected repo@sha256:<64 lowercase hex>"


class _Problems:
    def __init__(self, source: str, root: yaml.Node | None) -> None:
        self.source, self.root = source, root
        self._found: dict[str, int] = {}

    def add(self, path: list[str | int], message: str) -> None:
        line = _line_of(self.root, path)
        where = f"{self.source}:{line}" if line else self.source
        self._found.setdefault(f"{where}: {_path_text(path)}: {message}", line or 0)

    @property
    def items(self) -> list[str]:
        """Problems in file order, each once."""
        return sorted(self._found, key=lambda text: self._found[text])


def _limits(raw: Mapping[str, Any], base: Limits) -> Limits:
    return Limits(
        cpus=float(raw.get("cpus", base.cpus)),
        memory_bytes=parse_size(raw["memory"]) if "memory" in raw else base.memory_bytes,
        pids=int(raw.get("pids", base.pids)),
        timeout_seconds=(
            parse_duration(raw["timeout"]) if "timeout" in raw else base.timeout_seconds
        ),
        log_bytes=parse_size(raw["log_bytes"]) if "log_bytes" in raw else base.log_bytes,
    )


def _retry(raw: Mapping[str, Any], base: RetryPolicy) -> RetryPolicy:
    backoff = raw.get("backoff", {})
    return RetryPolicy(
        max_attempts=int(raw.get("max_attempts", base.max_attempts)),
        backoff_initial_seconds=(
            parse_duration(backoff["initial"]) if "initial" in backoff
            else base.backoff_initial_seconds
        ),
        backoff_max_seconds=(
            parse_duration(backoff["max"]) if "max" in backoff else base.backoff_max_seconds
        ),
        on=frozenset(raw["on"]) if "on" in raw else base.on,
    )


def parse_manifest(text: str, *, source: str = "<string>") -> Manifest:
    """Validate manifest text and build the frozen manifest.

    Raises:
        ManifestError: with one problem per invalid place, each naming line and path.
    """
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(problems=[f"{source}{line}: not valid YAML: {problem}"]) from exc
    problems = _Problems(source, root)
    if not isinstance(data, dict):
        problems.add([], "the manifest must be a mapping with version and processors")
        raise ManifestError(problems=problems.items, source=source)

    validator = jsonschema.Draft202012Validator(schema())
    for error in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path)):
        path = list(error.absolute_path)
        if path and path[-1] == "image":
            message = _image_problem(error.instance) or error.message
        elif error.schema is schema()["$defs"]["size"]:
            message = f"{error.instance!r} is not a size (use e.g. 256Mi, 4Mi, 1Gi or bytes)"
        elif error.schema is schema()["$defs"]["duration"]:
            message = f"{error.instance!r} is not a duration (use e.g. 30s, 5m, 500ms)"
        else:
            message = error.message
        problems.add(path, message)
    for index, entry in enumerate(data.get("processors") or []):
        if not isinstance(entry, dict):
            continue
        problem = _image_problem(entry.get("image")) if "image" in entry else None
        if problem and isinstance(entry.get("image"), str):
            problems.add(["processors", index, "image"], problem)
        if isinstance(entry.get("input_schema"), dict):
            try:
                jsonschema.Draft202012Validator.check_schema(entry["input_schema"])
            except jsonschema.SchemaError as exc:
                problems.add(["processors", index, "input_schema", *exc.absolute_path],
                             f"not a valid JSON Schema: {exc.message}")
    if problems.items:
        raise ManifestError(problems=problems.items, source=source)

    defaults = data.get("defaults") or {}
    base_limits = _limits(defaults.get("limits") or {}, Limits())
    base_retry = _retry(defaults.get("retry") or {}, RetryPolicy())
    processors: list[Processor] = []
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(data.get("processors") or []):
        key = (entry["name"], entry["version"])
        if key in seen:
            problems.add(["processors", index],
                         f"duplicate processor {key[0]} version {key[1]}")
            continue
        seen.add(key)
        match = IMAGE_REF.match(entry["image"])
        assert match is not None  # checked above
        limits = _limits(entry.get("limits") or {}, base_limits)
        if limits.timeout_seconds <= 0:
            problems.add(["processors", index, "limits", "timeout"], "must be above 0")
        processors.append(Processor(
            name=entry["name"],
            version=entry["version"],
            image=entry["image"],
            repo=match["repo"],
            digest=match["digest"],
            limits=limits,
            retry=_retry(entry.get("retry") or {}, base_retry),
            queue=entry.get("queue"),
            max_concurrency=entry.get("max_concurrency"),
            description=entry.get("description", ""),
            input_schema=entry.get("input_schema") or {"type": "object"},
        ))
    if problems.items:
        raise ManifestError(problems=problems.items, source=source)
    return Manifest(processors=tuple(processors), revision=revision_of(text), source=source)


def revision_of(text: str) -> str:
    """A manifest's revision: the SHA-256 of its text."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror}",
                            source=str(path)) from exc


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest file.

    Raises:
        ManifestError: the file is missing, unreadable or invalid.
    """
    return parse_manifest(_read(path), source=str(path))


# A file modified this close to when it was last read may have been modified again
# since within the same timestamp tick, keeping its size and inode (git calls this
# "racy clean"): until it is older than that, its content is checked, not its stat.
RACY_NS = 2_000_000_000


class ManifestSource:
    """The manifest in force for a long-running process, reloaded when its file changes.

    A cheap `stat` on each `current()` call notices edits (and for two seconds after
    an edit, a hash of the file's text, so a second same-size edit within one
    timestamp tick is not missed); an invalid edit is refused with an error log and
    the last good manifest stays in force.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._looked_at = time.time_ns()
        self._signature = self._stat()
        self._manifest = load_manifest(path)
        self._seen: str | None = self._manifest.revision  # the text last read, good or bad
        self.reloads_ok = 0
        self.reloads_refused = 0

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _unchanged(self, signature: tuple[int, int, int] | None) -> bool:
        racy = self._signature is not None and (
            self._signature[0] > self._looked_at - RACY_NS)
        return signature == self._signature and not racy

    def current(self) -> Manifest:
        """The manifest in force, reloading the file first if it changed."""
        if self._unchanged(self._stat()):
            return self._manifest
        with self._lock:
            looked_at = time.time_ns()  # before the stat, so a later edit counts as racy
            signature = self._stat()
            if self._unchanged(signature):
                return self._manifest
            self._signature, self._looked_at = signature, looked_at
            try:
                text = _read(self.path)
            except ManifestError as exc:
                if self._seen is not None:  # once per outage, not on every look
                    self._seen = None
                    self._refuse(exc)
                return self._manifest
            revision = revision_of(text)
            if revision == self._seen:
                return self._manifest  # touched, or checked again while racy
            self._seen = revision
            try:
                fresh = parse_manifest(text, source=str(self.path))
            except ManifestError as exc:
                self._refuse(exc)
                return self._manifest
            if fresh.revision != self._manifest.revision:
                self.reloads_ok += 1
                log.info("manifest_reloaded", path=str(self.path), revision=fresh.revision,
                         previous=self._manifest.revision, processors=len(fresh.processors))
            self._manifest = fresh
            return fresh

    def _refuse(self, exc: ManifestError) -> None:
        self.reloads_refused += 1
        log.error("manifest_reload_refused", path=str(self.path),
                  problems=exc.problems or [exc.message],
                  revision_in_force=self._manifest.revision)


def entry_for(*, name: str, version: str, image: str) -> dict[str, Any]:
    """A manifest entry pinning `image` for a processor version."""
    if _image_problem(image):
        raise ManifestError(f"{name} {version}: {_image_problem(image)}")
    return {"name": name, "version": version, "image": image}


def pin(path: Path, entry: Mapping[str, Any]) -> Manifest:
    """Add or re-pin a processor entry in the manifest file at `path`.

    Other entries keep their settings; a missing file is created. The result is
    validated before it replaces the file, so a failed pin changes nothing.

    Raises:
        ManifestError: the file is invalid, or would be after the change.
    """
    data: dict[str, Any] = {"version": 1, "processors": []}
    if path.exists():
        load_manifest(path)  # refuse to edit a file that is already broken
        loaded = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506
        if isinstance(loaded, dict):
            data = loaded
    processors: list[dict[str, Any]] = list(data.get("processors") or [])
    for existing in processors:
        if existing.get("name") == entry["name"] and existing.get("version") == entry["version"]:
            existing.update(entry)
            break
    else:
        processors.append(dict(entry))
    data["processors"] = processors
    text = yaml.safe_dump(data, sort_keys=False)
    manifest = parse_manifest(text, source=str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return manifest


def iter_problems(exc: ManifestError) -> Iterator[str]:
    """Each problem of a manifest error, one per line."""
    yield from exc.problems or [exc.message]
