"""The control layer: the database and Redis side, where the truth about runs lives.

Owns the schema (`models`), every SQL statement (`store`, `logstore`, `reports`,
`keys`, `lifecycle`), strict JSON for client input (`strictjson`), the run state
machine and its run-end listeners (`lifecycle`), the worker side's one door to all
of it (`ledger`), submission, replay and reuse (`runs`), the RQ queue and its routing
by host tags (`queue`), run-end notices over Redis (`notify`), rate limits
(`ratelimit`), retry decisions (`retry`), migrations and the schema guard
(`migrate`); the file store (`blobs`, `blobdb`), its catalog of files and artifacts
(`files`) and media types (`mediatype`); webhooks: the rules and signing
(`webhooks`), the outbox (`outbox`) and the sender (`delivery`); the dashboard's
figures (`overview`) and read-only queries (`uiqueries`).

May import: the shared modules (`runner.domain`, `errors`, `settings`, `units`),
`runner.manifest` and `runner.observability`. Never Docker, the sandbox, the
execution layer or FastAPI. SQLAlchemy is imported here and nowhere else (besides
`migrations/`).
"""
