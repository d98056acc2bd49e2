"""Manifest validation: JSON Schema plus our own checks, every error naming its line."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

from runner.errors import ManifestError
from runner.manifest import ManifestSource, parse_manifest, pin

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
GOOD = textwrap.dedent(f"""\
    version: 1
    defaults:
      limits: {{cpus: 1.0, memory: 256Mi, pids: 128, timeout: 300s, log_bytes: 4Mi}}
    processors:
      - name: echo
        version: "1.0.0"
        image: 127.0.0.1:5000/processors/echo@{DIGEST}
        limits: {{cpus: 0.5, memory: 128Mi, timeout: 30s}}
        retry: {{max_attempts: 3, backoff: {{initial: 1s, max: 60s}}, on: [timeout, "exit:75"]}}
        input_schema: {{type: object}}
    """)


def with_image(image: str) -> str:
    return GOOD.replace(f"127.0.0.1:5000/processors/echo@{DIGEST}", image)


def another(version: str) -> str:
    """One more echo entry, pinned to OTHER."""
    return (f'  - name: echo\n    version: "{version}"\n'
            f'    image: 127.0.0.1:5000/processors/echo@{OTHER}\n')


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, source="m.yaml")
    return caught.value.problems


def test_contract_example_parses_into_frozen_objects() -> None:
    manifest = parse_manifest(GOOD)
    echo = manifest.find("echo")
    assert echo is not None
    assert echo.digest == DIGEST and echo.repo == "127.0.0.1:5000/processors/echo"
    assert echo.limits.cpus == 0.5
    assert echo.limits.memory_bytes == 128 * 1024**2
    assert echo.limits.pids == 128  # from defaults
    assert echo.limits.timeout_seconds == 30
    assert echo.limits.log_bytes == 4 * 1024**2
    # `on:` must stay a key, not turn into YAML 1.1's boolean True.
    assert echo.retry.on == frozenset({"timeout", "exit:75"})
    assert echo.retry.max_attempts == 3
    with pytest.raises(AttributeError):
        echo.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(("image", "words"), [
    ("127.0.0.1:5000/processors/echo:1.0.0", "pinned by tag"),
    ("echo", "bare name"),
    ("127.0.0.1:5000/processors/echo@sha256:1234", "malformed digest"),
    ("127.0.0.1:5000/processors/echo@sha256:" + "A" * 64, "malformed digest"),
    ("127.0.0.1:5000/processors/echo:1.0@md5:" + "a" * 32, "malformed digest"),
])
def test_refused_image_references_name_the_line(image: str, words: str) -> None:
    found = problems(with_image(image))
    assert len(found) == 1
    assert found[0].startswith("m.yaml:7: processors[0].image: ")
    assert words in found[0]


def test_every_problem_is_reported_in_line_order() -> None:
    text = GOOD + (
        '  - name: second\n'
        '    version: "1"\n'
        '    image: busybox:latest\n'
        '    limits: {memory: lots, pids: 0}\n'
        '    colour: blue\n')
    found = problems(text)
    assert [p.split(":")[1] for p in found] == ["11", "13", "14", "14"]
    assert any("colour" in p for p in found)
    assert any("'lots' is not a size" in p for p in found)


def test_duplicate_processor_version() -> None:
    text = GOOD + another("1.0.0")
    found = problems(text)
    assert found == ["m.yaml:11: processors[1]: duplicate processor echo version 1.0.0"]


def test_not_yaml_names_the_line() -> None:
    found = problems("version: 1\nprocessors: [\n  - {")
    assert found[0].startswith("m.yaml:")
    assert "not valid YAML" in found[0]


def test_invalid_input_schema_is_refused() -> None:
    found = problems(GOOD.replace("input_schema: {type: object}",
                                  "input_schema: {type: 12}"))
    assert "input_schema" in found[0] and "not a valid JSON Schema" in found[0]


def test_highest_version_is_the_default() -> None:
    text = GOOD + another("1.10.0")
    manifest = parse_manifest(text)
    found = manifest.find("echo")
    assert found is not None and found.version == "1.10.0"
    assert manifest.allows("echo", "1.0.0", f"127.0.0.1:5000/processors/echo@{DIGEST}")
    assert not manifest.allows("echo", "1.0.0", f"127.0.0.1:5000/processors/echo@{OTHER}")


def test_source_reloads_edits_and_refuses_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text(GOOD)
    source = ManifestSource(path)
    first = source.current()

    path.write_text(with_image("127.0.0.1:5000/processors/echo:latest"))
    with structlog.testing.capture_logs() as logs:
        kept = source.current()
    assert kept is first
    refused = [e for e in logs if e["event"] == "manifest_reload_refused"]
    assert refused and "pinned by tag" in refused[0]["problems"][0]
    assert source.reloads_refused == 1

    path.write_text(with_image(f"127.0.0.1:5000/processors/echo@{OTHER}"))
    fresh = source.current()
    assert fresh.revision != first.revision
    echo = fresh.find("echo")
    assert echo is not None and echo.digest == OTHER


def test_source_sees_a_same_size_edit_within_one_timestamp_tick(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text(with_image(f"127.0.0.1:5000/processors/echo@{DIGEST}"))
    source = ManifestSource(path)
    first = source.current()
    before = os.stat(path)
    # A re-pin of the same length, written in place, stamped with the same mtime:
    # size, inode and mtime all match what the source saw.
    path.write_text(with_image(f"127.0.0.1:5000/processors/echo@{OTHER}"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (
        before.st_size, before.st_ino, before.st_mtime_ns)
    echo = source.current().find("echo")
    assert echo is not None and echo.digest == OTHER
    assert source.reloads_ok == 1 and first.find("echo").digest == DIGEST  # type: ignore[union-attr]
    # Checked again and again while racy, it counts one reload, not one per look.
    for _ in range(3):
        source.current()
    assert source.reloads_ok == 1 and source.reloads_refused == 0


def test_source_counts_one_refusal_while_the_file_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text(GOOD)
    source = ManifestSource(path)
    first = source.current()
    path.unlink()
    assert [source.current() for _ in range(3)] == [first] * 3
    assert source.reloads_refused == 1
    path.write_text(GOOD)
    assert source.current().revision == first.revision
    assert source.reloads_ok == 0 and source.reloads_refused == 1


def test_pin_adds_and_repins_without_touching_others(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text(GOOD)
    pin(path, {"name": "echo", "version": "1.0.0",
               "image": f"127.0.0.1:5000/processors/echo@{OTHER}"})
    pin(path, {"name": "new", "version": "2", "image": f"r.example/new@{DIGEST}"})
    manifest = parse_manifest(path.read_text())
    echo = manifest.find("echo")
    assert echo is not None and echo.digest == OTHER
    assert echo.limits.memory_bytes == 128 * 1024**2  # kept
    assert manifest.find("new") is not None


def test_pin_refuses_a_tag_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text(GOOD)
    with pytest.raises(ManifestError):
        pin(path, {"name": "echo", "version": "1.0.0", "image": "echo:latest"})
    assert path.read_text() == GOOD


def test_validate_command_exit_code_and_lines(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(with_image("echo"))
    ok = subprocess.run([sys.executable, "-m", "runner", "manifest", "validate", str(good)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "1 processor(s)" in ok.stdout
    failed = subprocess.run([sys.executable, "-m", "runner", "manifest", "validate",
                             str(good), str(bad)], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert f"{bad}:7: processors[0].image: 'echo' is a bare name" in failed.stderr


def test_shipped_example_manifest_is_valid() -> None:
    from runner.manifest import load_manifest

    root = Path(__file__).resolve().parents[2]
    manifest = load_manifest(root / "manifests" / "example.yaml")
    assert [p.name for p in manifest.processors] == ["echo"]


def test_zero_timeout_is_refused() -> None:
    found = problems(GOOD.replace("timeout: 30s", "timeout: 0s"))
    assert found == ["m.yaml:8: processors[0].limits.timeout: 0s is below the minimum of 1s "
                     "(no limit may mean unlimited)"]
