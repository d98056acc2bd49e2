"""The templates' file helpers and the wordcount sample, on a temporary /run.

The Python helper is loaded from processor-templates/ with its INPUT_DIR, OUTPUT_DIR
and RESULT_PATH pointed at a temporary directory; the shell helper is sourced by
`sh` with RUNNER_IN and RUNNER_OUT reassigned. What they do in a real container is
the integration tests' to show.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

TEMPLATES = Path(__file__).resolve().parents[2] / "processor-templates"


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.fixture
def helper(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """runner_processor, importable by that name (as in the image), on `run_root`."""
    spec = importlib.util.spec_from_file_location(
        "runner_processor", TEMPLATES / "python" / "runner_processor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "INPUT_DIR", str(run_root / "in"))
    monkeypatch.setattr(module, "OUTPUT_DIR", str(run_root / "out"))
    monkeypatch.setattr(module, "RESULT_PATH", str(run_root / "out" / "result.json"))
    monkeypatch.setitem(sys.modules, "runner_processor", module)
    return module


def test_input_files_are_the_regular_files_in_run_in_by_name(helper: ModuleType,
                                                             run_root: Path) -> None:
    (run_root / "in" / "text").write_text("a")
    (run_root / "in" / "b.csv").write_text("b")
    (run_root / "in" / "subdir").mkdir()
    assert helper.input_files() == {"b.csv": run_root / "in" / "b.csv",
                                    "text": run_root / "in" / "text"}
    assert helper.input_file("text") == run_root / "in" / "text"


def test_no_run_in_directory_means_no_files(helper: ModuleType, run_root: Path) -> None:
    (run_root / "in").rmdir()
    assert helper.input_files() == {}


def test_a_file_not_submitted_is_a_clear_error_naming_those_there_are(
        helper: ModuleType, run_root: Path) -> None:
    (run_root / "in" / "other").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no file 'text' .*\(files: other\)"):
        helper.input_file("text")
    with pytest.raises(ValueError, match="not a file name"):
        helper.input_file("../out/result.json")


def test_artifact_path_creates_parents_under_run_out(helper: ModuleType, run_root: Path) -> None:
    path = helper.artifact_path("report/pages/1.csv")
    assert path == run_root / "out" / "report" / "pages" / "1.csv"
    assert path.parent.is_dir() and not path.exists()
    assert helper.artifact_path("sub/result.json") == run_root / "out" / "sub" / "result.json"


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "", "a//b", "./a", "a/",
                                  "result.json", "nul\x00"])
def test_artifact_path_refuses_names_outside_run_out_and_the_result(
        name: str, helper: ModuleType, run_root: Path) -> None:
    with pytest.raises(ValueError, match="artifact_path"):
        helper.artifact_path(name)
    assert sorted(p.name for p in run_root.rglob("*")) == ["in", "out"]


def test_write_artifact_writes_bytes_or_text_and_leaves_no_temporary_file(
        helper: ModuleType, run_root: Path) -> None:
    assert helper.write_artifact("a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert helper.write_artifact("d/b.txt", "é\n").read_bytes() == "é\n".encode()
    assert sorted(str(p.relative_to(run_root / "out")) for p in (run_root / "out").rglob("*")) \
        == ["a.bin", "d", "d/b.txt"]
    with pytest.raises(TypeError, match="bytes or str"):
        helper.write_artifact("c.json", {"not": "bytes"})


def test_a_failed_write_artifact_removes_its_temporary_file(helper: ModuleType,
                                                            run_root: Path) -> None:
    (run_root / "out" / "taken").mkdir()  # the rename onto a directory fails
    with pytest.raises(OSError):
        helper.write_artifact("taken", b"data")
    assert [p.name for p in (run_root / "out").iterdir()] == ["taken"]


def test_wordcount_counts_its_text_into_counts_csv_and_the_result(
        helper: ModuleType, run_root: Path) -> None:
    (run_root / "in" / "text").write_bytes(
        "The cat and the hat.\nDon't stop; the END\n\xff".encode("latin-1"))
    runpy.run_path(str(TEMPLATES / "samples" / "wordcount" / "main.py"), run_name="__main__")
    assert (run_root / "out" / "counts.csv").read_text().splitlines() == [
        "word,count", "the,3", "and,1", "cat,1", "don't,1", "end,1", "hat,1", "stop,1"]
    assert json.loads((run_root / "out" / "result.json").read_text()) == {
        "words": 9, "distinct": 7}


def test_wordcount_without_its_text_file_exits_2_saying_so(
        helper: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(TEMPLATES / "samples" / "wordcount" / "main.py"), run_name="__main__")
    assert exited.value.code == 2
    assert "no file 'text'" in capsys.readouterr().err


# The images' shell is busybox sh; without busybox on the host, the system's POSIX sh.
BUSYBOX = shutil.which("busybox")
SH = [BUSYBOX, "sh"] if BUSYBOX else ["sh"]


def shell(run_root: Path, script: str) -> subprocess.CompletedProcess[str]:
    prelude = (f". {TEMPLATES / 'shell' / 'runner.sh'}\n"
               f"RUNNER_IN={run_root / 'in'}; RUNNER_OUT={run_root / 'out'}\n")
    return subprocess.run([*SH, "-c", prelude + script], capture_output=True, text=True,
                          check=False)


def test_runner_input_file_prints_the_path_or_fails_clearly(run_root: Path) -> None:
    (run_root / "in" / "text").write_text("x")
    found = shell(run_root, "runner_input_file text")
    assert found.returncode == 0 and found.stdout == f"{run_root / 'in' / 'text'}\n"
    missing = shell(run_root, "runner_input_file other")
    assert missing.returncode == 1 and missing.stdout == ""
    assert "no file 'other' was submitted" in missing.stderr
    assert shell(run_root, "runner_input_file ../in/text").returncode == 2


def test_runner_artifact_makes_the_parent_and_prints_the_path(run_root: Path) -> None:
    done = shell(run_root, 'out=$(runner_artifact a/b/c.txt) || exit 9; echo hi >"$out"; '
                           'echo "$out"')
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{run_root / 'out' / 'a' / 'b' / 'c.txt'}\n"
    assert (run_root / "out" / "a" / "b" / "c.txt").read_text() == "hi\n"


@pytest.mark.parametrize("name", ["/abs", "../x", "a/../b", "", "a//b", "./a", "a/",
                                  "result.json"])
def test_runner_artifact_refuses_names_outside_run_out_and_the_result(
        name: str, run_root: Path) -> None:
    refused = shell(run_root, f"runner_artifact '{name}'")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("runner_artifact: ")
    assert sorted(p.name for p in run_root.rglob("*")) == ["in", "out"]
