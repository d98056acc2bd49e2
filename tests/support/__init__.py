"""What the test suites (and bench/) share, written once.

For tests against real services (integration, ops) and for benchmarks:

- `waiting`: `wait_until`, the one polling loop (a deadline, an interval, a message).
- `net`: `free_port` and `http_status`.
- `services`: throwaway backing services: a `RedisServer`, a scratch PostgreSQL
  database per session or stack, the API served in-process (`ApiServer`).
- `processes`: `runner ...` child processes with their log files (`RunnerProcess`),
  started as a worker or an API and waited on until ready; `WorkerProcess`, a worker
  run with a `Settings`, optionally through the fault-injecting entry point.
- `faults` and `faulty_worker`: fault injection, for tests only. `Faults` is the
  worker's fault hook; `python -m tests.support.faulty_worker` is `runner worker` with
  that hook armed from RUNNER_TEST_FAULT_POINTS (production has no such setting).

For unit tests: `fakes`, fakes of the runner's own Protocols (sandbox, queue), and
`memdb`, a fresh migrated SQLite database per test.

Nothing here imports pytest, so bench/ may use it too (run from the repository root,
with the project installed).
"""
