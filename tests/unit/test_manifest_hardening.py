"""The manifest against values and YAML that would quietly mean something else.

Every limit has a floor (no value means "unlimited" or one the engine refuses); the
YAML may hold no alias, no anchor and no duplicate key, and is at most 1 MiB; an
input_schema may reference only itself, and its patterns must compile. Each problem
names its line, in `parse_manifest`, `runner manifest validate`, hot reload and
processor.yaml alike (docs/operators.md, "The manifest").
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from runner.authoring.localrun import processor_settings
from runner.authoring.publish import ProcessorDir, publish
from runner.errors import ManifestError
from runner.manifest import ManifestSource, load_manifest, parse_manifest
from runner.manifest.model import (
    MIN_CPUS,
    MIN_LOG_BYTES,
    MIN_MEMORY_BYTES,
    MIN_OUTPUT_BYTES,
    MIN_TIMEOUT_SECONDS,
)
from runner.manifest.yamlio import MAX_MANIFEST_BYTES

IMAGE = "127.0.0.1:5000/processors/echo@sha256:" + "a" * 64


def manifest(limit: str = "cpus: 0.5", *, default: str = "memory: 256Mi",
             extra: str = "") -> str:
    """A manifest whose processor limit is on line 10 and default limit on line 4."""
    return textwrap.dedent(f"""\
        version: 1
        defaults:
          limits:
            {default}
        processors:
          - name: echo
            version: "1.0.0"
            image: {IMAGE}
            limits:
              {limit}
        """) + extra


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, source="m.yaml")
    return caught.value.problems


# (4) floors -------------------------------------------------------------------------

@pytest.mark.parametrize(("limit", "words"), [
    ("memory: 0", "0 bytes is below the minimum of 6Mi"),
    ('memory: "0.1"', "0.1 is 0 bytes, below the minimum of 6Mi"),
    ("memory: 1Mi", "below the minimum of 6Mi"),
    ("memory: 6291455", "6291455 bytes is below the minimum of 6Mi"),
    ("cpus: 1.0e-10", "1e-10 CPUs is below the minimum of 0.01"),
    ("cpus: 0.004", "below the minimum of 0.01"),
    ("cpus: 0", "below the minimum of 0.01"),
    ("cpus: -1", "below the minimum of 0.01"),
    ("log_bytes: 0", "0 bytes is below the minimum of 1Ki"),
    ("log_bytes: 1023", "below the minimum of 1Ki"),
    ("output_bytes: 0", "below the minimum of 1Ki"),
    ('output_bytes: "0.5Ki"', "below the minimum of 1Ki"),
    ("timeout: 0s", "below the minimum of 1s"),
    ("timeout: 0", "0s is below the minimum of 1s"),
    ("timeout: 500ms", "500ms is below the minimum of 1s"),
    ("timeout: 0.0001s", "below the minimum of 1s"),
    ("pids: 0", "less than the minimum of 1"),
    ("timeout: .inf", "not a finite number"),
    ("timeout: .nan", "not a finite number"),
    ("cpus: .nan", "not a finite number"),
    ("memory: 99999999999999999999999", "above the maximum"),
    ('memory: "' + "9" * 400 + 'Gi"', "above the maximum"),
    ('timeout: "' + "9" * 400 + 's"', "is not a finite duration"),
])
def test_a_limit_below_its_floor_is_refused_naming_the_line(limit: str, words: str) -> None:
    found = problems(manifest(limit))
    key = limit.split(":")[0]
    assert len(found) == 1, found
    assert found[0].startswith(f"m.yaml:10: processors[0].limits.{key}: "), found
    assert words in found[0]


@pytest.mark.parametrize("limit", [
    "memory: 6Mi", "memory: 6291456", "cpus: 0.01", "pids: 1", "timeout: 1s",
    "timeout: 1", "log_bytes: 1Ki", "output_bytes: 1024",
])
def test_a_limit_at_its_floor_is_accepted(limit: str) -> None:
    parse_manifest(manifest(limit))


def test_the_floors_are_the_documented_ones() -> None:
    assert (MIN_CPUS, MIN_MEMORY_BYTES, MIN_TIMEOUT_SECONDS, MIN_LOG_BYTES,
            MIN_OUTPUT_BYTES) == (0.01, 6 * 1024**2, 1.0, 1024, 1024)


def test_a_backoff_that_parses_to_infinity_is_refused() -> None:
    found = problems(manifest(extra='    retry: {backoff: {max: "' + "9" * 400 + 's"}}\n'))
    assert len(found) == 1 and found[0].startswith(
        "m.yaml:11: processors[0].retry.backoff.max: "), found
    assert "not a finite duration" in found[0]


def test_a_default_below_its_floor_names_the_defaults_line() -> None:
    found = problems(manifest(default="memory: 0"))
    assert found == [found[0]] and found[0].startswith("m.yaml:4: defaults.limits.memory: ")


@pytest.mark.parametrize(("limit", "words"), [
    ("cpus: lots", "'lots' is not a number of CPUs"),
    ('cpus: "0.5"', "'0.5' is not a number of CPUs"),
    ("cpus: 1e-10", "'1e-10' is not a number of CPUs"),
    ("cpus: [1]", "is not a number of CPUs"),
    ("pids: many", "'many' is not a whole number of processes"),
    ("pids: 1.5", "1.5 is not a whole number of processes"),
    ("memory: [1]", "[1] is not a size"),
    ("memory: true", "True is not a size"),
    ("output_bytes: lots", "'lots' is not a size"),
    ("timeout: forever", "'forever' is not a duration"),
])
def test_a_limit_that_is_not_a_number_says_what_it_should_be(limit: str, words: str) -> None:
    found = problems(manifest(limit))
    assert len(found) == 1, found
    assert found[0].startswith("m.yaml:10: ") and words in found[0], found


def test_hot_reload_refuses_a_below_floor_edit_and_keeps_the_last_good(
        tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text(manifest("memory: 64Mi"))
    source = ManifestSource(path)
    good = source.current()
    path.write_text(manifest('memory: "0.1"'))
    with structlog.testing.capture_logs() as logs:
        assert source.current() is good
    refused = [e for e in logs if e["event"] == "manifest_reload_refused"]
    assert len(refused) == 1 and source.reloads_refused == 1
    assert refused[0]["problems"][0].startswith(f"{path}:10: processors[0].limits.memory: ")
    assert refused[0]["revision_in_force"] == good.revision
    echo = source.current().find("echo")
    assert echo is not None and echo.limits.memory_bytes == 64 * 1024**2


def processor_dir(tmp_path: Path, limits: str) -> Path:
    (tmp_path / "processor.yaml").write_text(
        f'name: floors\nversion: "1"\ntemplate: shell\nlimits: {limits}\n')
    return tmp_path


def test_processor_yaml_below_a_floor_names_processor_yaml(tmp_path: Path) -> None:
    proc = ProcessorDir.load(processor_dir(tmp_path, "{memory: 1Mi, cpus: 0.001}"))
    with pytest.raises(ManifestError) as caught:
        processor_settings(proc, registry="127.0.0.1:5000")
    meta = tmp_path / "processor.yaml"
    assert [p.split(": ")[:2] for p in caught.value.problems] == [
        [str(meta), "limits.memory"], [str(meta), "limits.cpus"]]
    assert all("below the minimum" in p for p in caught.value.problems)


def test_publish_refuses_processor_yaml_below_a_floor_before_building(
        tmp_path: Path) -> None:
    class NoDocker:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"publish used Docker ({name}) before checking the limits")

    with pytest.raises(ManifestError) as caught:
        publish(processor_dir(tmp_path, "{timeout: 0s}"), registry="127.0.0.1:5000",
                client=NoDocker())  # type: ignore[arg-type]
    assert caught.value.problems == [
        f"{tmp_path / 'processor.yaml'}: limits.timeout: 0s is below the minimum of 1s "
        "(no limit may mean unlimited)"]


# (6a) input_schema references --------------------------------------------------------

def with_schema(schema: str) -> str:
    return manifest(extra=f"    input_schema:\n{textwrap.indent(schema, '      ')}")


@pytest.mark.parametrize("ref", [
    "http://127.0.0.1:9/s.json", "https://json-schema.org/draft/2020-12/schema",
    "other.json", "urn:x:y", "//evil.example/s",
])
@pytest.mark.parametrize("keyword", ["$ref", "$dynamicRef"])
def test_a_remote_reference_in_input_schema_is_refused_naming_the_line(
        keyword: str, ref: str) -> None:
    found = problems(with_schema(textwrap.dedent(f"""\
        type: object
        properties:
          a:
            {keyword}: "{ref}"
        """)))
    assert len(found) == 1, found
    assert found[0].startswith(
        f"m.yaml:15: processors[0].input_schema.properties.a.{keyword}: "), found
    assert "only local references" in found[0]


def test_a_local_reference_that_points_nowhere_is_refused() -> None:
    found = problems(with_schema(textwrap.dedent("""\
        type: object
        properties:
          a: {$ref: "#/$defs/missing"}
        $defs:
          b: {type: string}
        """)))
    assert len(found) == 1, found
    assert found[0].startswith("m.yaml:14: processors[0].input_schema.properties.a.$ref: ")
    assert "points to nothing" in found[0]


def test_local_references_and_anchors_are_accepted() -> None:
    parse_manifest(with_schema(textwrap.dedent("""\
        type: object
        properties:
          a: {$ref: "#/$defs/b"}
          c: {$ref: "#name"}
          d: {$ref: "#"}
          e:
            $id: "https://nested.example/e"
            $ref: "#/$defs/f"
            $defs: {f: {type: integer}}
        $defs:
          b: {type: string}
          n: {$anchor: name, type: integer}
        """)))


# (6c) patterns that compile with the engine used; no pattern walk outside the budget --

def test_unevaluated_properties_with_pattern_properties_is_refused() -> None:
    found = problems(with_schema(textwrap.dedent("""\
        type: object
        patternProperties: {"^x": {}}
        unevaluatedProperties: false
        """)))
    assert len(found) == 1, found
    assert found[0].startswith(
        "m.yaml:14: processors[0].input_schema.unevaluatedProperties: "), found
    assert "patternProperties" in found[0]


def test_a_pattern_that_does_not_compile_is_refused() -> None:
    found = problems(with_schema('type: object\nproperties: {a: {pattern: "a{2,1}"}}\n'))
    assert len(found) == 1 and "input_schema" in found[0], found


# (6d) aliases and anchors -----------------------------------------------------------

def alias_bomb(levels: int) -> str:
    """Ten times more nodes per level, each level a line: 10**levels when expanded."""
    lines = ["    input_schema:", "      $defs:", "        l0: &l0 {type: object}"]
    for level in range(1, levels + 1):
        aliases = ", ".join([f"*l{level - 1}"] * 10)
        lines.append(f"        l{level}: &l{level} {{allOf: [{aliases}]}}")
    return manifest(extra="\n".join(lines) + "\n")


def test_an_alias_bomb_is_refused_at_once_naming_the_line() -> None:
    # Before: 4 levels (526 bytes) took 2.6 s to parse, 5 levels (602 bytes) 33 s,
    # all of it under the hot-reload lock. Now the first anchor stops the parse.
    started = time.perf_counter()
    found = problems(alias_bomb(5))
    assert time.perf_counter() - started < 0.5
    assert found == ["m.yaml:13: not valid YAML: a YAML anchor (&l0) is not allowed in a "
                     "manifest: write each value out"]


def test_a_single_alias_is_refused_naming_its_line() -> None:
    text = manifest("cpus: 0.5") + (f'  - name: other\n    version: "1.0.0"\n'
                                    f"    image: {IMAGE}\n    limits: *shared\n")
    found = problems(text)
    assert found == ["m.yaml:14: not valid YAML: a YAML alias (*shared) is not allowed in a "
                     "manifest: write each value out"]


# (6e) size cap -----------------------------------------------------------------------

def test_a_manifest_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    filler = "x" * (MAX_MANIFEST_BYTES + 10)
    text = manifest(extra=f"    description: {filler}\n")
    found = problems(text)
    assert found == [f"m.yaml: the manifest is {len(text.encode())} bytes, over the "
                     "1 MiB cap"]
    path = tmp_path / "big.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert caught.value.problems == [f"{path}: the manifest is {len(text.encode())} bytes, "
                                     "over the 1 MiB cap"]


def test_a_manifest_at_the_size_cap_is_read() -> None:
    text = manifest()
    text += "    description: " + "x" * (MAX_MANIFEST_BYTES - len(text) - 18) + "\n"
    assert len(text.encode()) <= MAX_MANIFEST_BYTES
    parse_manifest(text)


def test_deep_nesting_is_a_problem_not_a_crash() -> None:
    found = problems(manifest(extra="    description: " + "[" * 20_000 + "]" * 20_000 + "\n"))
    assert len(found) == 1 and "nested too deeply" in found[0], found


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(manifest(extra="    description: caf\xe9\n").encode("latin-1"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "not UTF-8" in caught.value.message


# (6f) duplicate keys ------------------------------------------------------------------

def test_a_duplicate_key_names_both_lines() -> None:
    text = manifest() + f"    image: {IMAGE.replace('a' * 64, 'b' * 64)}\n"
    found = problems(text)
    assert found == ["m.yaml:11: processors[0].image: duplicate key 'image' (first at line "
                     "8, again at line 11): YAML keys must be unique"]


def test_a_duplicate_top_level_key_names_both_lines() -> None:
    found = problems(manifest() + "version: 1\n")
    assert found == ["m.yaml:11: version: duplicate key 'version' (first at line 1, again "
                     "at line 11): YAML keys must be unique"]


def test_a_duplicate_key_in_a_flow_mapping_is_refused() -> None:
    found = problems(manifest("{cpus: 0.5, cpus: 2}"))
    assert len(found) == 1 and "duplicate key 'cpus'" in found[0], found
