"""structlog configuration, called once by each entry point (never at import).

One schema for every line of every process (docs/observability.md): `ts`, `level`,
`service`, `event`, and where they apply `worker_id`, `run_id`, `attempt`,
`request_id`, `trace_id`. Lines from libraries that log through the standard
library (rq, uvicorn, alembic) go through the same processors, so they are JSON
too and carry the same context; they add `logger`.
"""

from __future__ import annotations

import logging
import sys
from datetime import date, datetime
from enum import Enum
from typing import Any

import structlog


class ProcessFields:
    """Fields of the whole process (`service`, a worker's `worker_id`) on every line,
    whatever thread logs it: threads do not inherit the context variables of the
    thread that started them, so these cannot be context variables."""

    def __init__(self, **fields: str) -> None:
        self.fields = dict(fields)

    def __call__(self, _logger: object, _method: str,
                 event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
        for key, value in self.fields.items():
            event_dict.setdefault(key, value)
        return event_dict


def json_default(value: Any) -> Any:
    """How a JSON line writes what json cannot: times in ISO 8601 (UTC ones end in
    `Z`, like `ts`), enums by value, anything else as its `str()`."""
    if isinstance(value, datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return str(value)


def bind_process(**fields: str) -> None:
    """Add fields to every line this process logs from now on (e.g. `worker_id`)."""
    for processor in structlog.get_config()["processors"]:
        if isinstance(processor, ProcessFields):
            processor.fields.update(fields)
    structlog.contextvars.bind_contextvars(**fields)


def configure_logging(*, service: str, fmt: str = "console", level: str = "info") -> None:
    """JSON lines (or a console renderer for development) to stderr, bound to `service`."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    process = ProcessFields(service=service)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        process,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(default=json_default)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    # Standard-library records (rq, uvicorn, alembic): same processors, same renderer,
    # at WARNING and above so their chatter does not drown the runner's own lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name,
                           structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    # uvicorn installs its own handlers; send its records to ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
