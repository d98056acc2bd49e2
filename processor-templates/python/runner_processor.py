"""Helper for Python processors: read the input, write the result, ask for a retry.

The processor contract (see docs/processor-authors.md): input at /run/input.json,
result at /run/out/result.json, logs on stdout/stderr, exit 0 = success,
exit 75 = transient failure (retry me), anything else = failure.
"""

import json
import os
import sys

INPUT_PATH = "/run/input.json"
RESULT_PATH = "/run/out/result.json"
EXIT_RETRY = 75

__all__ = ["EXIT_RETRY", "INPUT_PATH", "RESULT_PATH", "attempt", "read_input", "retry_me",
           "run_id", "write_result"]


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
