"""input_schema: code the API runs on client input, run so that it is bounded.

`input_schema_validator` builds a Draft 2020-12 validator whose registry retrieves
nothing (a remote `$ref` is an error, never a request) and whose `pattern`,
`patternProperties` and `additionalProperties` run on the `regex` engine within one
time budget shared by an input's whole check (`pattern_budget`): Python's `re` takes
84 s for `(a+)+$` on 30 a's and a "!". `input_schema_problems` is what the manifest
parser refuses in a schema before it is ever used.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from functools import lru_cache
from typing import Any
from urllib.parse import urldefrag, urljoin

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
import regex
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator

# The time all of an input_schema's patterns may take on one input, together.
INPUT_PATTERN_BUDGET_SECONDS = 0.25


def walk(value: Any) -> Iterator[tuple[list[str | int], Any]]:
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


def input_schema_problems(value: Mapping[str, Any]) -> Iterator[tuple[list[str | int], str]]:
    """Problems of an input_schema that the meta-schema accepts, each with its path."""
    resource = referencing.jsonschema.DRAFT202012.create_resource(dict(value))
    resolver = referencing.Registry().resolver_with_root(resource)
    root_id = resource.id() or ""
    bases: dict[tuple[str | int, ...], str] = {}  # each container's base URI
    unevaluated: list[list[str | int]] = []
    has_pattern_properties = False
    for path, item in walk(value):
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
