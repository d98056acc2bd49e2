"""`runner manifest validate|diff|pin` as an operator's CI calls them (typer's CliRunner).

The contract for CI: exit 0 only when every file is valid; each problem on its own
stderr line as `error: FILE:LINE: PATH: MESSAGE`; several files in one call.
`diff` follows diff(1): 0 same, 1 different, 2 invalid input.
"""

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from runner.cli import app

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
REPO = "127.0.0.1:5000/processors"
GOOD = textwrap.dedent(f"""\
    version: 1
    processors:
      - name: echo
        version: "1.0.0"
        image: {REPO}/echo@{A}
        limits: {{cpus: 0.5, memory: 64Mi}}
    """)
# Three problems, on lines 5, 7 and 10.
BAD = textwrap.dedent(f"""\
    version: 1
    processors:
      - name: echo
        version: "1.0.0"
        image: {REPO}/echo:latest
      - name: sleep
        version: 2
        image: {REPO}/sleep@{A}
        limits:
          memory: lots
    """)
PROBLEM = re.compile(r"^error: (?P<file>[^:]+):(?P<line>\d+): (?P<path>\S+): (?P<message>.+)$")

runner = CliRunner()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(stderr: str) -> list[dict[str, str]]:
    found = []
    for line in stderr.splitlines():
        match = PROBLEM.match(line)
        assert match, f"not FILE:LINE: PATH: MESSAGE: {line!r}"
        found.append(match.groupdict())
    return found


def test_validate_good_file_exits_0(tmp_path: Path) -> None:
    path = write(tmp_path, "good.yaml", GOOD)
    result = runner.invoke(app, ["manifest", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{path}: ok, 1 processor(s), revision sha256:")
    assert result.stderr == ""


def test_validate_reports_every_problem_with_file_line_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", BAD)
    result = runner.invoke(app, ["manifest", "validate", str(path)])
    assert result.exit_code == 1
    found = problems(result.stderr)
    assert [(p["file"], p["line"], p["path"]) for p in found] == [
        (str(path), "5", "processors[0].image"),
        (str(path), "7", "processors[1].version"),
        (str(path), "10", "processors[1].limits.memory"),
    ]
    assert "pinned by tag" in found[0]["message"]
    assert "'lots' is not a size" in found[2]["message"]


def test_validate_checks_every_file_and_fails_if_any_is_bad(tmp_path: Path) -> None:
    good = write(tmp_path, "good.yaml", GOOD)
    bad = write(tmp_path, "bad.yaml", BAD)
    other = write(tmp_path, "other.yaml", GOOD.replace(A, B))
    result = runner.invoke(app, ["manifest", "validate", str(good), str(bad), str(other)])
    assert result.exit_code == 1
    # Both good files are reported after the bad one: the first error does not stop it.
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [str(good),
                                                                           str(other)]
    assert {p["file"] for p in problems(result.stderr)} == {str(bad)}


def test_validate_all_good_files_exit_0(tmp_path: Path) -> None:
    paths = [str(write(tmp_path, f"m{i}.yaml", GOOD)) for i in range(3)]
    assert runner.invoke(app, ["manifest", "validate", *paths]).exit_code == 0


def test_validate_not_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", "version: 1\nprocessors:\n  - name: [unclosed\n")
    result = runner.invoke(app, ["manifest", "validate", str(path)])
    assert result.exit_code == 1
    assert re.match(rf"^error: {re.escape(str(path))}:\d+: not valid YAML: ", result.stderr)


def test_validate_missing_file_is_an_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["manifest", "validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert result.stderr == f"error: {tmp_path / 'nope.yaml'}: cannot read manifest: " \
                            "No such file or directory\n"


def test_validate_without_files_is_a_usage_error() -> None:
    assert runner.invoke(app, ["manifest", "validate"]).exit_code == 2


def test_validate_duplicate_versions_and_zero_timeout(tmp_path: Path) -> None:
    text = GOOD + textwrap.indent(textwrap.dedent(f"""\
        - name: echo
          version: "1.0.0"
          image: {REPO}/echo@{B}
          limits: {{timeout: 0ms}}
        """), "  ")
    result = runner.invoke(app, ["manifest", "validate", str(write(tmp_path, "d.yaml", text))])
    assert result.exit_code == 1
    # Both problems, each on its line: the duplicate does not hide the entry's limits.
    assert [(p["line"], p["path"]) for p in problems(result.stderr)] == [
        ("7", "processors[1]"), ("10", "processors[1].limits.timeout")]
    assert "duplicate processor echo version 1.0.0" in result.stderr
    assert "0ms is below the minimum of 1s" in result.stderr


def test_validate_names_each_limit_below_its_floor(tmp_path: Path) -> None:
    text = GOOD.replace("limits: {cpus: 0.5, memory: 64Mi}", textwrap.dedent("""\
        limits:
              cpus: 0.004
              memory: "0.1"
              log_bytes: 0
              output_bytes: 512
              timeout: 0s""").rstrip())
    result = runner.invoke(app, ["manifest", "validate", str(write(tmp_path, "f.yaml", text))])
    assert result.exit_code == 1
    found = problems(result.stderr)
    assert [(p["line"], p["path"]) for p in found] == [
        ("7", "processors[0].limits.cpus"), ("8", "processors[0].limits.memory"),
        ("9", "processors[0].limits.log_bytes"), ("10", "processors[0].limits.output_bytes"),
        ("11", "processors[0].limits.timeout")]
    assert all("below the minimum" in p["message"] for p in found)
    assert "0.1 is 0 bytes" in found[1]["message"]


def test_validate_names_both_lines_of_a_duplicate_key(tmp_path: Path) -> None:
    text = GOOD + f"    image: {REPO}/echo@{B}\n"
    result = runner.invoke(app, ["manifest", "validate", str(write(tmp_path, "k.yaml", text))])
    assert result.exit_code == 1
    [found] = problems(result.stderr)
    assert (found["line"], found["path"]) == ("7", "processors[0].image")
    assert found["message"] == ("duplicate key 'image' (first at line 5, again at line 7): "
                                "YAML keys must be unique")


def test_validate_refuses_an_alias(tmp_path: Path) -> None:
    text = GOOD.replace("limits: {cpus: 0.5, memory: 64Mi}", "limits: &l {cpus: 0.5}")
    result = runner.invoke(app, ["manifest", "validate", str(write(tmp_path, "a.yaml", text))])
    assert result.exit_code == 1
    assert result.stderr == (f"error: {tmp_path / 'a.yaml'}:6: not valid YAML: a YAML anchor "
                             "(&l) is not allowed in a manifest: write each value out\n")


# diff ---------------------------------------------------------------------

def test_diff_equal_exits_0(tmp_path: Path) -> None:
    old, new = write(tmp_path, "old.yaml", GOOD), write(tmp_path, "new.yaml", GOOD)
    result = runner.invoke(app, ["manifest", "diff", str(old), str(new)])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no differences" in result.stderr


def test_diff_shows_repin_and_exits_1(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", GOOD)
    new = write(tmp_path, "new.yaml", GOOD.replace(A, B).replace("64Mi", "128Mi"))
    result = runner.invoke(app, ["manifest", "diff", str(old), str(new)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [f"~ echo 1.0.0: re-pinned {A} -> {B}",
                                          "    limits.memory: 64Mi -> 128Mi"]


def test_diff_json(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", GOOD)
    new = write(tmp_path, "new.yaml", GOOD.replace('"1.0.0"', '"1.1.0"'))
    result = runner.invoke(app, ["manifest", "diff", "--json", str(old), str(new)])
    assert result.exit_code == 1
    body = json.loads(result.stdout)
    assert body["equal"] is False
    assert [(e["name"], e["version"]) for e in body["added"]] == [("echo", "1.1.0")]
    assert [(e["name"], e["version"]) for e in body["removed"]] == [("echo", "1.0.0")]


@pytest.mark.parametrize("which", ["old", "new"])
def test_diff_invalid_or_missing_input_exits_2(tmp_path: Path, which: str) -> None:
    good, bad = write(tmp_path, "good.yaml", GOOD), write(tmp_path, "bad.yaml", BAD)
    args = [str(bad), str(good)] if which == "old" else [str(good), str(bad)]
    result = runner.invoke(app, ["manifest", "diff", *args])
    assert result.exit_code == 2
    assert len(problems(result.stderr)) == 3
    missing = runner.invoke(app, ["manifest", "diff", str(good), str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "cannot read manifest" in missing.stderr


# pin (by digest; pinning a tag needs the registry: tests/integration/test_authoring.py)

def test_pin_digest_adds_then_repins(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    args = ["manifest", "pin", f"{REPO}/echo@{A}", "--name", "echo", "--version", "1.0.0",
            "--manifest", str(path)]
    assert runner.invoke(app, args).exit_code == 0
    args[2] = f"{REPO}/echo@{B}"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    entries = yaml.safe_load(path.read_text())["processors"]
    assert entries == [{"name": "echo", "version": "1.0.0", "image": f"{REPO}/echo@{B}"}]


@pytest.mark.parametrize("image", [f"{REPO}/echo", f"{REPO}/echo:1.0@{A}",
                                   f"{REPO}/echo@sha256:12"])
def test_pin_refuses_what_is_neither_digest_nor_tag(tmp_path: Path, image: str) -> None:
    path = tmp_path / "m.yaml"
    result = runner.invoke(app, ["manifest", "pin", image, "--name", "echo", "--version", "1",
                                 "--manifest", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not path.exists()
