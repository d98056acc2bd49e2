"""Parse manifest YAML: checked by a JSON Schema, every problem named by YAML line.

`parse_manifest` is the one way text becomes a `Manifest`; `load_manifest` reads a
file first. Both raise `ManifestError` listing every problem found.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from runner.errors import ManifestError
from runner.manifest.model import (
    IMAGE_REF,
    Limits,
    Manifest,
    Processor,
    RetryPolicy,
)
from runner.units import parse_duration, parse_size


@cache
def schema() -> dict[str, Any]:
    """The manifest's JSON Schema (Draft 2020-12)."""
    text = resources.files("runner.manifest").joinpath("schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


class YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: `on`, `off`, `yes`, `no` stay strings.

    The manifest's retry policy has an `on:` key, which YAML 1.1 would read as True.
    """


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
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


def image_problem(value: object) -> str | None:
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
        output_bytes=(parse_size(raw["output_bytes"]) if "output_bytes" in raw
                      else base.output_bytes),
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
        root = yaml.compose(text, Loader=YamlLoader)
        data = yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader
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
            message = image_problem(error.instance) or error.message
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
        problem = image_problem(entry.get("image")) if "image" in entry else None
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


def read_text(path: Path) -> str:
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
    return parse_manifest(read_text(path), source=str(path))


def iter_problems(exc: ManifestError) -> Iterator[str]:
    """Each problem of a manifest error, one per line."""
    yield from exc.problems or [exc.message]
