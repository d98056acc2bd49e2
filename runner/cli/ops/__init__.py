"""`runner ops ...`: operator commands the runbooks use to diagnose and recover.

Reads go straight to the database, Redis, Docker and the registry, so they work while
the API is down. Every status change goes through `runner.control.lifecycle` (cancel) or
`runner.control.runs` (replay); nothing here writes a run's status itself.

Exit status: 0 fine, 1 the command found a problem (or, for a recovery command, did
not finish it), 2 the command itself could not run (one `error:` line on stderr).

The commands live in `health` (status, check, stuck), `runs` (dead-letters, replay,
cancel-queued, wait-idle) and `storage` (images, disk, prune-logs, prune-images,
manifest-install); `common` holds the sub-app and what they share.
"""

# Imported for their commands, which register on `ops_app` in this order (the order
# `runner ops --help` lists them in).
from runner.cli.ops import health, report, runs, storage  # noqa: F401
from runner.cli.ops.common import ops_app

__all__ = ["ops_app"]
