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

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
import regex
import yaml
import yaml.composer
import yaml.constructor
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator

from runner.errors import ManifestError
from runner.manifest.model import (
    IMAGE_REF,
    MAX_SIZE_BYTES,
    MIN_CPUS,
    MIN_LOG_BYTES,
    MIN_MEMORY_BYTES,
    MIN_OUTPUT_BYTES,
    MIN_TIMEOUT_SECONDS,
    Limits,
    Manifest,
    Processor,
    RetryPolicy,
)
from runner.units import parse_duration, parse_size

# A manifest is a short list of entries; past this it is refused before it is parsed.
MAX_MANIFEST_BYTES = 1024 * 1024
# The time all of an input_schema's patterns may take on one input, together: Python's
# re takes 84 s for `(a+)+$` on 30 a's and a "!", doubling with each character more.
INPUT_PATTERN_BUDGET_SECONDS = 0.25


@cache
def schema() -> dict[str, Any]:
    """The manifest's JSON Schema (Draft 2020-12)."""
    text = resources.files("runner.manifest").joinpath("schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""

    def __init__(self, key: object, first: yaml.Node, again: yaml.Node) -> None:
        self.key, self.key_node = key, again
        first_line, again_line = first.start_mark.line + 1, again.start_mark.line + 1
        super().__init__(None, None, f"duplicate key {key!r} (first at line {first_line}, "
                         f"again at line {again_line}): YAML keys must be unique",
                         again.start_mark)


class _PlainDumper(yaml.SafeDumper):
    """SafeDumper that writes a value used twice out twice: a manifest holds no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_manifest(data: Any) -> str:
    """YAML for a manifest (or a piece of one) that this parser accepts: keys in their
    given order, and no anchors or aliases even where the same object appears twice."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False)


class YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: `on`, `off`, `yes`, `no` stay strings.

    The manifest's retry policy has an `on:` key, which YAML 1.1 would read as True.
    It refuses an anchor or alias (each value is written out, so a few lines cannot
    expand into millions of nodes) and a key given twice in one mapping (YAML says keys
    are unique; PyYAML would let the last one silently win).
    """

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        anchor, mark = getattr(event, "anchor", None), getattr(event, "start_mark", None)
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, f"a YAML alias (*{anchor}) is not allowed in a manifest: "
                "write each value out", mark)
        if anchor is not None:
            raise yaml.composer.ComposerError(
                None, None, f"a YAML anchor (&{anchor}) is not allowed in a manifest: "
                "write each value out", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader refuses it below
                continue
            if first is not key_node:
                raise DuplicateKeyError(key, first, key_node)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as exc:  # e.g. over Python's 4,300 digits for an int
            raise yaml.constructor.ConstructorError(
                None, None, f"{str(node.value)[:20]}... is not a usable integer ({exc})",
                node.start_mark) from exc


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
YamlLoader.add_constructor("tag:yaml.org,2002:int", YamlLoader.construct_yaml_int)


def _path_to(root: yaml.Node, target: yaml.Node) -> list[str | int]:
    """The path of the mapping key or value `target` under `root` (empty if not found)."""
    stack: list[tuple[yaml.Node, list[str | int]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = [*path, key.value]
                if target is key or target is value:
                    return child
                stack.append((value, child))
        elif isinstance(node, yaml.SequenceNode):
            for index, value in enumerate(node.value):
                if target is value:
                    return [*path, index]
                stack.append((value, [*path, index]))
    return []


def load_yaml(text: str, *, source: str = "<string>") -> tuple[yaml.Node | None, Any]:
    """The YAML node tree and data of `text`, read once by `YamlLoader`.

    Raises:
        ManifestError: over MAX_MANIFEST_BYTES, not YAML, an anchor or alias, a
            duplicate key, or nested too deeply; the problem names the line.
    """
    size = len(text.encode(errors="surrogatepass"))
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(problems=[f"{source}: the manifest is {size} bytes, over the "
                                      f"{MAX_MANIFEST_BYTES // 1024**2} MiB cap"], source=source)
    loader = YamlLoader(text)
    root: yaml.Node | None = None
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    except DuplicateKeyError as exc:
        line = exc.key_node.start_mark.line + 1
        where = _path_text(_path_to(root, exc.key_node)) if root is not None else "(document)"
        raise ManifestError(problems=[f"{source}:{line}: {where}: {exc.problem}"],
                            source=source) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(problems=[f"{source}{line}: not valid YAML: {problem}"],
                            source=source) from exc
    except RecursionError:
        raise ManifestError(problems=[f"{source}: not valid YAML: nested too deeply"],
                            source=source) from None
    finally:
        loader.dispose()


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


def _walk(value: Any) -> Iterator[tuple[list[str | int], Any]]:
    """Every value under `value` with its path, depth first, without recursion."""
    stack: list[tuple[list[str | int], Any]] = [([], value)]
    while stack:
        path, item = stack.pop()
        yield path, item
        if isinstance(item, dict):
            stack.extend(([*path, key], child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(([*path, index], child)
                         for index, child in reversed(list(enumerate(item))))


# input_schema: code the API runs on client input -------------------------------------

_pattern_budget: ContextVar[list[float] | None] = ContextVar("pattern_budget", default=None)


class PatternTimeoutError(Exception):
    """An input_schema pattern ran out of the time budget of one input's check."""

    def __init__(self, pattern: str, seconds: float) -> None:
        self.pattern, self.seconds = pattern, seconds
        super().__init__(f"the input_schema pattern {pattern!r} took over the {seconds:g} s "
                         "budget of one input's patterns")


@contextlib.contextmanager
def pattern_budget(seconds: float = INPUT_PATTERN_BUDGET_SECONDS) -> Iterator[None]:
    """Let every pattern search of the validations inside share `seconds` in all."""
    token = _pattern_budget.set([seconds, seconds])
    try:
        yield
    finally:
        _pattern_budget.reset(token)


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


def _search(pattern: str, text: str) -> bool:
    """`re.search` on the regex engine, stopped when the budget is spent."""
    budget = _pattern_budget.get()
    if budget is None:  # outside `pattern_budget`: each search gets a whole budget
        budget = [INPUT_PATTERN_BUDGET_SECONDS, INPUT_PATTERN_BUDGET_SECONDS]
    if budget[0] <= 0:
        raise PatternTimeoutError(pattern, budget[1])
    started = time.perf_counter()
    try:
        # concurrent: the GIL is released while it matches, so a slow pattern holds up
        # only its own request's thread, not the API's event loop and other requests.
        found = _compiled(pattern).search(text, concurrent=True, timeout=budget[0])
        return found is not None
    except TimeoutError:
        budget[0] = 0.0
        raise PatternTimeoutError(pattern, budget[1]) from None
    finally:
        budget[0] -= time.perf_counter() - started


# The keywords of jsonschema that run Python's re (jsonschema/_keywords.py), on the
# regex engine instead. unevaluatedProperties also runs patternProperties' patterns
# with re, so the two together are refused at parse time.

def _pattern(validator: Any, pattern: str, instance: Any,
             schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Mapping[str, Any], instance: Any,
                        schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any,
                           schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [key for key in instance if key not in properties
              and not any(_search(pattern, key) for pattern in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        joined = ", ".join(repr(each) for each in sorted(extras))
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            listed = ", ".join(repr(each) for each in sorted(patterns))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {listed}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(
                f"Additional properties are not allowed ({joined} {verb} unexpected)")


_InputValidator: Any = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator, {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    })


def input_schema_validator(schema: Mapping[str, Any]) -> Validator:
    """A validator of `schema` (Draft 2020-12) that retrieves nothing and bounds patterns.

    Its registry holds no resources and cannot retrieve any, so a `$ref` outside the
    schema (and the JSON Schema meta-schemas) raises `referencing.exceptions.Unresolvable`
    instead of being fetched; its patterns raise `PatternTimeoutError` past the budget.
    Build it once per schema: it caches what it resolves.
    """
    validator: Validator = _InputValidator(dict(schema), registry=referencing.Registry())
    return validator


_REFERENCES = ("$ref", "$dynamicRef")


def _input_schema_problems(value: Mapping[str, Any]) -> Iterator[tuple[list[str | int], str]]:
    """Problems of an input_schema that the meta-schema accepts, each with its path."""
    resource = referencing.jsonschema.DRAFT202012.create_resource(dict(value))
    resolver = referencing.Registry().resolver_with_root(resource)
    root_id = resource.id() or ""
    bases: dict[tuple[str | int, ...], str] = {}  # each container's base URI
    unevaluated: list[list[str | int]] = []
    has_pattern_properties = False
    for path, item in _walk(value):
        if not isinstance(item, dict | list):
            continue
        base = bases.get(tuple(path[:-1]), root_id)
        if isinstance(item, dict) and path and isinstance(item.get("$id"), str):
            base = urldefrag(urljoin(base, item["$id"]))[0]
        bases[tuple(path)] = base
        if isinstance(item, list):
            continue
        for keyword in _REFERENCES:
            ref = item.get(keyword)
            if not isinstance(ref, str):
                continue
            if not ref.startswith("#"):
                yield ([*path, keyword], f"{ref!r} is not allowed: only local references "
                       "(#...) into this schema are, and nothing is ever fetched")
                continue
            try:
                resolver.lookup(urljoin(base, ref) if base != root_id else ref)
            except referencing.exceptions.Unresolvable:
                yield [*path, keyword], f"{ref!r} points to nothing in this schema"
        patterns: list[tuple[list[str | int], object]] = []
        if "pattern" in item and isinstance(item["pattern"], str):
            patterns.append(([*path, "pattern"], item["pattern"]))
        if isinstance(item.get("patternProperties"), dict):
            has_pattern_properties = True
            patterns += [([*path, "patternProperties", key], key)
                         for key in item["patternProperties"]]
        for where, pattern in patterns:
            try:
                _compiled(str(pattern))
            except regex.error as exc:
                yield where, f"pattern {pattern!r} does not compile: {exc}"
        if "unevaluatedProperties" in item:
            unevaluated.append([*path, "unevaluatedProperties"])
    if has_pattern_properties and unevaluated:
        yield (unevaluated[0], "unevaluatedProperties cannot be combined with "
               "patternProperties in one input_schema (its patterns would run unbounded); "
               "use additionalProperties")


def _not_finite(data: Any) -> Iterator[tuple[list[str | int], float]]:
    for path, item in _walk(data):
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
                for path, message in _input_schema_problems(entry["input_schema"]):
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
        ))
    return Manifest(processors=tuple(processors), revision=revision_of(text), source=source)


def revision_of(text: str) -> str:
    """A manifest's revision: the SHA-256 of its text."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_text(path: Path) -> str:
    """The manifest file's text, read no further than its size cap.

    Raises:
        ManifestError: the file cannot be read, is over MAX_MANIFEST_BYTES or is not
            UTF-8.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
            size = max(len(data), os.fstat(handle.fileno()).st_size)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror}",
                            source=str(path)) from exc
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(problems=[f"{path}: the manifest is {size} bytes, over the "
                                      f"{MAX_MANIFEST_BYTES // 1024**2} MiB cap"],
                            source=str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: the manifest is not UTF-8 text (byte {exc.start})",
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
