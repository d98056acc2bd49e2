"""Parse manifest YAML: checked by a JSON Schema, every problem named by YAML line.

`parse_manifest` is the one way text becomes a `Manifest`; `load_manifest` reads a
file first. Both raise `ManifestError` listing every problem found.

What the text may not do, so that it means what it shows (docs/operators.md, "The
manifest"): be over 1 MiB, hold a YAML anchor or alias (a few lines of aliases expand
into millions of nodes), repeat a key (the last would silently win), give a limit
below its floor or a number that is not finite, or hold an input_schema that
references anything outside itself, has a pattern that does not compile, or combines
`unevaluatedProperties` with `patternProperties`.

An input_schema is code the API runs on every submission, so it is run by
`input_schema_validator`: a Draft 2020-12 validator whose registry retrieves nothing
and whose patterns run on the `regex` engine within a time budget shared by one
input's whole check (`pattern_budget`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
import yaml.composer
import yaml.constructor
from jsonschema.exceptions import ValidationError

from runner.errors import ManifestError
from runner.manifest.inputschema import input_schema_problems, walk
from runner.manifest.model import (
    IMAGE_REF,
    MAX_SIZE_BYTES,
    MIN_CPUS,
    MIN_LOG_BYTES,
    MIN_MEMORY_BYTES,
    MIN_OUTPUT_BYTES,
    MIN_TIMEOUT_SECONDS,
    Accepts,
    Limits,
    Manifest,
    Processor,
    RetryPolicy,
)
from runner.manifest.yamlio import (
    line_of,
    load_yaml,
    path_text,
    read_text,
)
from runner.units import parse_duration, parse_size


@cache
def schema() -> dict[str, Any]:
    """The manifest's JSON Schema (Draft 2020-12)."""
    text = resources.files("runner.manifest").joinpath("schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


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
        line = line_of(self.root, path)
        where = f"{self.source}:{line}" if line else self.source
        self._found.setdefault(f"{where}: {path_text(path)}: {message}", line or 0)

    @property
    def items(self) -> list[str]:
        """Problems in file order, each once."""
        return sorted(self._found, key=lambda text: self._found[text])


def _size_text(value: int) -> str:
    for unit, factor in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Each size limit: its floor and why the floor is there.
_SIZE_FLOORS = {
    "memory": (MIN_MEMORY_BYTES, "Docker refuses a smaller memory limit"),
    "log_bytes": (MIN_LOG_BYTES, "no limit may mean unlimited"),
    "output_bytes": (MIN_OUTPUT_BYTES, "no limit may mean unlimited"),
}
# What a limit's value must be, for the schema's type errors.
_LIMIT_FORMS = {
    "cpus": "is not a number of CPUs (use e.g. 0.5 or 2)",
    "pids": "is not a whole number of processes (use e.g. 128)",
}


def _limit_problem(key: str, value: Any) -> str | None:
    """Why a limit's value is below its floor or too large, or None.

    A value of the wrong type or form is the schema's to report (its message is
    replaced in `parse_manifest`); a number that is not finite, the finite check's.
    """
    if key == "cpus":
        if not _is_number(value) or not math.isfinite(value) or value >= MIN_CPUS:
            return None
        return (f"{value:g} CPUs is below the minimum of {MIN_CPUS:g} (the kernel's "
                "smallest CPU quota, 1 ms per 100 ms)")
    if key in _SIZE_FLOORS:
        floor, why = _SIZE_FLOORS[key]
        try:
            size = parse_size(value)
        except (ValueError, TypeError):
            return None
        except OverflowError:
            size = MAX_SIZE_BYTES + 1
        if size > MAX_SIZE_BYTES:
            return f"{value} is above the maximum of {MAX_SIZE_BYTES} bytes"
        if size >= floor:
            return None
        shown = f"{value} bytes is" if _is_number(value) else f"{value} is {size} bytes,"
        return f"{shown} below the minimum of {_size_text(floor)} ({why})"
    if key == "timeout":
        try:
            seconds = parse_duration(value)
        except (ValueError, TypeError):
            return None
        if not math.isfinite(seconds):  # a number's is the finite check's to report
            return None if _is_number(value) else f"{value[:20]}... is not a finite duration"
        if seconds >= MIN_TIMEOUT_SECONDS:
            return None
        shown = f"{value:g}s" if _is_number(value) else str(value)
        return (f"{shown} is below the minimum of {MIN_TIMEOUT_SECONDS:g}s "
                "(no limit may mean unlimited)")
    return None


_DURATION_TEXT = re.compile(r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)?$")  # the schema's duration


def _backoffs(data: Mapping[str, Any]) -> Iterator[tuple[list[str | int], Mapping[str, Any]]]:
    """Every `retry.backoff` mapping of the manifest, with its path."""
    places: list[tuple[list[str | int], Any]] = [(["defaults"], data.get("defaults"))]
    entries = data.get("processors")
    if isinstance(entries, list):
        places += [(["processors", index], entry) for index, entry in enumerate(entries)]
    for where, holder in places:
        retry = holder.get("retry") if isinstance(holder, dict) else None
        backoff = retry.get("backoff") if isinstance(retry, dict) else None
        if isinstance(backoff, dict):
            yield [*where, "retry", "backoff"], backoff


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


def _not_finite(data: Any) -> Iterator[tuple[list[str | int], float]]:
    for path, item in walk(data):
        if isinstance(item, float) and not math.isfinite(item):
            yield path, item


def _schema_message(error: ValidationError) -> str:
    path = list(error.absolute_path)
    if path and path[-1] == "image":
        return image_problem(error.instance) or error.message
    if error.schema is schema()["$defs"]["size"]:
        return f"{error.instance!r} is not a size (use e.g. 256Mi, 4Mi, 1Gi or bytes)"
    if error.schema is schema()["$defs"]["duration"]:
        return f"{error.instance!r} is not a duration (use e.g. 30s, 5m, 500ms)"
    if (error.validator == "type" and len(path) >= 2 and path[-2] == "limits"
            and path[-1] in _LIMIT_FORMS):
        return f"{error.instance!r} {_LIMIT_FORMS[str(path[-1])]}"
    return error.message


def parse_manifest(text: str, *, source: str = "<string>") -> Manifest:
    """Validate manifest text and build the frozen manifest.

    Raises:
        ManifestError: with one problem per invalid place, each naming line and path.
    """
    try:
        return _parse(text, source)
    except RecursionError:
        raise ManifestError(problems=[f"{source}: the manifest is nested too deeply"],
                            source=source) from None


def _parse(text: str, source: str) -> Manifest:
    root, data = load_yaml(text, source=source)
    problems = _Problems(source, root)
    if not isinstance(data, dict):
        problems.add([], "the manifest must be a mapping with version and processors")
        raise ManifestError(problems=problems.items, source=source)

    for path, number in _not_finite(data):
        problems.add(path, f"{number} is not a finite number")
    validator = jsonschema.Draft202012Validator(schema())
    for error in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path)):
        problems.add(list(error.absolute_path), _schema_message(error))
    defaults = data.get("defaults")
    blocks: list[tuple[list[str | int], Any]] = []
    if isinstance(defaults, dict):
        blocks.append((["defaults", "limits"], defaults.get("limits")))
    entries = data.get("processors")
    entries = entries if isinstance(entries, list) else []
    named: set[tuple[str, str]] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        key = (entry.get("name"), entry.get("version"))
        if isinstance(key[0], str) and isinstance(key[1], str):
            if (key[0], key[1]) in named:
                problems.add(["processors", index],
                             f"duplicate processor {key[0]} version {key[1]}")
            named.add((key[0], key[1]))
        blocks.append((["processors", index, "limits"], entry.get("limits")))
        accepts = entry.get("accepts")
        if (isinstance(accepts, dict) and "max_bytes" in accepts
                and (why := _accepts_problem(accepts["max_bytes"])) is not None):
            problems.add(["processors", index, "accepts", "max_bytes"], why)
        problem = image_problem(entry.get("image")) if "image" in entry else None
        if problem and isinstance(entry.get("image"), str):
            problems.add(["processors", index, "image"], problem)
        if isinstance(entry.get("input_schema"), dict):
            where: list[str | int] = ["processors", index, "input_schema"]
            try:
                jsonschema.Draft202012Validator.check_schema(entry["input_schema"])
            except jsonschema.SchemaError as exc:
                problems.add([*where, *exc.absolute_path],
                             f"not a valid JSON Schema: {exc.message}")
            else:
                for path, message in input_schema_problems(entry["input_schema"]):
                    problems.add([*where, *path], message)
    for where, limits in blocks:
        if isinstance(limits, dict):
            for key, value in limits.items():
                floor = _limit_problem(str(key), value)
                if floor:
                    problems.add([*where, key], floor)
    for where, backoff in _backoffs(data):
        for name, value in backoff.items():
            if isinstance(value, str) and _DURATION_TEXT.match(value) and not math.isfinite(
                    parse_duration(value)):
                problems.add([*where, name], f"{value[:20]}... is not a finite duration")
    if problems.items:
        raise ManifestError(problems=problems.items, source=source)

    defaults = defaults or {}
    base_limits = _limits(defaults.get("limits") or {}, Limits())
    base_retry = _retry(defaults.get("retry") or {}, RetryPolicy())
    processors: list[Processor] = []
    for entry in entries:
        match = IMAGE_REF.match(entry["image"])
        assert match is not None  # checked above
        processors.append(Processor(
            name=entry["name"],
            version=entry["version"],
            image=entry["image"],
            repo=match["repo"],
            digest=match["digest"],
            limits=_limits(entry.get("limits") or {}, base_limits),
            retry=_retry(entry.get("retry") or {}, base_retry),
            queue=entry.get("queue"),
            max_concurrency=entry.get("max_concurrency"),
            description=entry.get("description", ""),
            input_schema=entry.get("input_schema") or {"type": "object"},
            accepts=_accepts(entry.get("accepts")),
            reusable=entry.get("reusable", True),
            require=tuple(sorted(entry.get("require") or ())),
        ))
    return Manifest(processors=tuple(processors), revision=revision_of(text), source=source)


def _accepts(block: Any) -> Accepts:
    """The `accepts` block as a record (validated by the schema and `_accepts_problem`)."""
    if not isinstance(block, dict):
        return Accepts()
    return Accepts(media_types=tuple(block.get("media_types") or ("*/*",)),
                   max_bytes=parse_size(block["max_bytes"]) if "max_bytes" in block else None,
                   max_files=block.get("max_files"))


def _accepts_problem(value: Any) -> str | None:
    """Why an `accepts.max_bytes` means nothing (zero: no file could ever pass), or None."""
    try:
        size = parse_size(value)
    except (ValueError, TypeError, OverflowError):
        return None  # the schema's to report
    if size < 1:
        return f"{value} is no bytes: a file cap of zero would refuse every file"
    if size > MAX_SIZE_BYTES:
        return f"{value} is above the maximum of {MAX_SIZE_BYTES} bytes"
    return None


def revision_of(text: str) -> str:
    """A manifest's revision: the SHA-256 of its text."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest file.

    Raises:
        ManifestError: the file is missing, unreadable or invalid.
    """
    return parse_manifest(read_text(path), source=str(path))


def iter_problems(exc: ManifestError) -> Iterator[str]:
    """Each problem of a manifest error, one per line."""
    yield from exc.problems or [exc.message]
