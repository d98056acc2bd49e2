"""Traces (OpenTelemetry) and the timing of container stages.

A trace starts at the API request that submits a run. Its W3C `traceparent` is
stored with the run (the queue carries ids only), so every attempt, on whichever
worker and after whichever retry, continues the same trace: a `run.attempt` span
with children `claim`, `pull`, `create`, `start`, `wait`, `collect` and `remove`.

Tracing is off by default (`RUNNER_TRACE_EXPORTER=none`): the tracer is then a
no-op and costs next to nothing. No global tracer provider is installed; each
entry point builds one and passes the tracer down.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from runner.settings import Settings

log = structlog.get_logger(__name__)

TRACER_NAME = "container-runner"
_PROPAGATOR = TraceContextTextMapPropagator()

# What each container stage is called in log events (`container.<past tense>`).
STAGE_EVENTS = {"pull": "container.pulled", "create": "container.created",
                "start": "container.started", "wait": "container.exited",
                "collect": "container.collected", "remove": "container.removed"}


class JsonLinesExporter(SpanExporter):
    """Appends each finished span as one JSON line to a file: for debugging a trace
    without a collector, and for tests that check a trace across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(s), default=str) + "\n" for s in spans]
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.writelines(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain data (ids in hex, times in ns)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x") if ctx else None,
        "span_id": format(ctx.span_id, "016x") if ctx else None,
        "parent_id": format(parent.span_id, "016x") if parent else None,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time, "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def build_tracer_provider(settings: Settings, service: str) -> TracerProvider | None:
    """The provider this process exports spans through, or None when tracing is off."""
    if settings.trace_exporter == "none":
        return None
    ratio = TraceIdRatioBased(settings.trace_sample_ratio)
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"runner-{service}",
                                  "service.instance.id": settings.worker_id}),
        # The ratio decides from the trace id alone, in every process alike: a sampled
        # flag sent by a client does not force recording, and an API and a worker
        # always agree on a run's trace.
        sampler=ParentBased(ratio, remote_parent_sampled=ratio,
                            remote_parent_not_sampled=ratio))
    exporter: SpanExporter
    if settings.trace_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=settings.trace_endpoint)))
        return provider
    if settings.trace_exporter == "jsonl":
        exporter = JsonLinesExporter(settings.trace_file)
    else:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter(out=sys.stderr)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def tracer_of(provider: TracerProvider | None) -> trace.Tracer:
    return provider.get_tracer(TRACER_NAME) if provider is not None else trace.NoOpTracer()


def traceparent(span: trace.Span) -> str | None:
    """The W3C traceparent of `span`, or None when it is not recorded (tracing off)."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def context_from(headers: Mapping[str, str] | None) -> Context:
    """The parent context carried by `traceparent` (an empty context when absent)."""
    return _PROPAGATOR.extract(dict(headers or {}))


def trace_id(span: trace.Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class StageObserver(Protocol):
    """Told about each stage of a container's life by the sandbox."""

    def stage(self, name: str, **attributes: Any) -> AbstractContextManager[dict[str, Any]]:
        """Time stage `name`; the yielded dict collects attributes found on the way."""
        ...


class NullStages:
    """Observes nothing (a sandbox used outside a worker, e.g. `processor run`)."""

    @contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[dict[str, Any]]:
        yield dict(attributes)


@dataclass
class AttemptStages:
    """One attempt's stages: a span each, a log line each with its duration, and the
    create/start latencies in the worker's metrics."""

    tracer: trace.Tracer
    metrics: Any  # runner.observability.metrics.WorkerMetrics | None (kept loose: no import cycle)
    dequeued_at: float
    timings_ms: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[dict[str, Any]]:
        found: dict[str, Any] = dict(attributes)
        began = time.monotonic()
        extra: dict[str, Any] = {}
        if name == "create":
            extra["dequeue_to_create_ms"] = round((began - self.dequeued_at) * 1000, 2)
            if self.metrics is not None:
                self.metrics.dequeue_to_create.observe(began - self.dequeued_at)
        with self.tracer.start_as_current_span(name) as span:
            try:
                yield found
            except BaseException as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                found.setdefault("error", type(exc).__name__)
                raise
            finally:
                elapsed = time.monotonic() - began
                self.timings_ms[name] = round(elapsed * 1000, 2)
                for key, value in found.items():
                    if isinstance(value, str | int | float | bool):
                        span.set_attribute(f"runner.{key}", value)
                if self.metrics is not None:
                    self.metrics.observe_stage(name, elapsed)
                log.info(STAGE_EVENTS.get(name, f"container.{name}"),
                         duration_ms=self.timings_ms[name], **extra, **found)
