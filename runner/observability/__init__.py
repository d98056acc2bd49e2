"""The observability layer: structured logs, Prometheus metrics and OpenTelemetry traces.

Owns the one structlog set-up every process uses (`logsetup`), the metrics of the
API and the workers (`metrics`) and tracing with stage timing (`telemetry`).

May import: the shared modules and `runner.manifest` (the manifest gauges). Every
other layer may import it; it imports none of them.
"""
