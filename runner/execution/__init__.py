"""The execution layer: the worker host side, where attempts run.

Owns the executor (one attempt, top to bottom), its guard (lease, cancel, log
batching), the pure classification of a container's end, the RQ worker and its
supervisor, the reconciler, the worker's health endpoints, and `wiring`, which builds
a worker process's services once. It reaches the database only through the
`RunLedger` port and Docker only through the `SandboxPort` port (`ports`).

May import: the shared modules, `runner.manifest`, `runner.observability`,
`runner.sandbox` and `runner.control`. Never FastAPI, `api/` or the CLI, and no
SQLAlchemy: SQL stays in the control layer.
"""
