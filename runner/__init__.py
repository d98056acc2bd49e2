"""Container-per-job runner: allowlisted, digest-pinned processors in locked-down containers."""

__version__ = "0.1.0"
