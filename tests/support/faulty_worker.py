"""`python -m tests.support.faulty_worker [--queue NAME ...] [--burst]`: `runner worker`
with fault points armed, for the fault-injection tests only.

The points come from RUNNER_TEST_FAULT_POINTS (comma separated: `before_claim`,
`after_claim`, `after_container_exit`); the worker SIGKILLs itself at the first one it
reaches, after logging `fault_injected`. Everything else is the production worker:
the same settings (RUNNER_*), the same logging, the same `run_worker`. Run it from the
repository root, so `tests` is importable.
"""

from __future__ import annotations

import argparse
import os
import sys

from runner.errors import RunnerError
from runner.execution.worker import run_worker
from runner.observability.logsetup import configure_logging
from runner.settings import load_settings
from tests.support.faults import FAULTS_ENV, Faults, parse_points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.faulty_worker",
        description=f"`runner worker` with the fault points in {FAULTS_ENV} armed (tests only).")
    parser.add_argument("--queue", action="append", metavar="NAME",
                        help="Queues in priority order (repeat the option).")
    parser.add_argument("--burst", action="store_true", help="Exit when the queues are empty.")
    args = parser.parse_args(argv)
    try:
        fault = Faults(parse_points(os.environ.get(FAULTS_ENV, "")))
    except ValueError as exc:
        parser.exit(2, f"error: {FAULTS_ENV}: {exc}\n")
    try:
        # As `runner worker` does (runner/cli/common.py `settings("worker")`).
        settings = load_settings()
        configure_logging(service="worker", fmt=settings.log_format, level=settings.log_level)
        run_worker(settings, queues=args.queue or None, burst=args.burst, fault=fault)
    except RunnerError as exc:  # one line on stderr and exit 1, as the CLI does
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
