"""Helper for Python processors: read the input and files, write the result and
artifacts, ask for a retry.

The processor contract (see docs/processor-authors.md): input at /run/input.json,
submitted files at /run/in/<name> (read-only), result at /run/out/result.json, every
other regular file under /run/out an artifact; logs on stdout/stderr, exit 0 =
success, exit 75 = transient failure (retry me), anything else = failure.
"""

import json
import os
import sys
from pathlib import Path

INPUT_PATH = "/run/input.json"
RESULT_PATH = "/run/out/result.json"
INPUT_DIR = "/run/in"
OUTPUT_DIR = "/run/out"
EXIT_RETRY = 75

__all__ = ["EXIT_RETRY", "INPUT_DIR", "INPUT_PATH", "OUTPUT_DIR", "RESULT_PATH",
           "artifact_path", "attempt", "input_file", "input_files", "read_input",
           "retry_me", "run_id", "write_artifact", "write_result"]


def read_input():
    """The run's input as a Python value."""
    with open(INPUT_PATH, encoding="utf-8") as handle:
        return json.load(handle)


def write_result(value):
    """Store a JSON value as the run's result (size-capped by the runner, 1 MiB by default).

    The result must be strict JSON: a float NaN or infinity raises ValueError here,
    in the processor, rather than failing the run later as `invalid_output`. (The
    runner also refuses integers outside the 64-bit range and nesting over 128 levels.)
    Written to a temporary file and renamed, so a half-written result is never seen.
    """
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"write_result: the result is not strict JSON ({exc}); "
                         "NaN and Infinity have no JSON form: write null or a string "
                         "instead") from exc
    tmp = RESULT_PATH + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, RESULT_PATH)


def input_files():
    """The files submitted with the run, {name: path under /run/in}, sorted by name
    (empty when the run has none)."""
    try:
        entries = sorted(os.scandir(INPUT_DIR), key=lambda entry: entry.name)
    except FileNotFoundError:
        return {}
    return {entry.name: Path(entry.path) for entry in entries if entry.is_file()}


def input_file(name):
    """The path of the file submitted as `name` (at /run/in/<name>, read-only).

    Raises FileNotFoundError, naming the files there are, when none was submitted
    under that name.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"input_file: {name!r} is not a file name (1-128 of "
                         "A-Z a-z 0-9 . _ -, not starting with a dot)")
    path = Path(INPUT_DIR) / name
    if not path.is_file():
        present = ", ".join(input_files()) or "none"
        raise FileNotFoundError(f"input_file: no file {name!r} was submitted with this run "
                                f"(files: {present})")
    return path


def artifact_path(name):
    """Where to write artifact `name` (under /run/out; "/" makes subdirectories,
    created here). Every regular file left under /run/out becomes an artifact.

    Raises ValueError for an empty or absolute name, an empty, "." or ".." part,
    or "result.json" (that is the run's result: use write_result).
    """
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or name.startswith("/") or "\x00" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise ValueError(f"artifact_path: {name!r} must be a relative path inside "
                         f"{OUTPUT_DIR} (no leading '/', no empty, '.' or '..' parts)")
    if name == "result.json":
        raise ValueError("artifact_path: result.json is the run's result, not an artifact: "
                         "use write_result")
    path = Path(OUTPUT_DIR).joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_artifact(name, data):
    """Write `data` (bytes, or str as UTF-8) as artifact `name`; its path.

    Written to a temporary file beside it and renamed, and the temporary file removed
    if the write fails (a full /run/out: OSError ENOSPC), so a half-written file is
    never left to become an artifact.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"write_artifact: data must be bytes or str, not "
                        f"{type(data).__name__}")
    path = artifact_path(name)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def run_id():
    """The run's id: the same for every attempt of a run."""
    return os.environ.get("RUNNER_RUN_ID", "")


def attempt():
    """This attempt's number: 1, then one more for each retry."""
    return int(os.environ.get("RUNNER_ATTEMPT", "1"))


def retry_me(message="transient failure"):
    """End this attempt as transient: the runner retries it if the policy allows."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(EXIT_RETRY)
