"""A worker's own HTTP port: `/metrics`, `/healthz` and `/readyz`.

Served from a daemon thread with the standard library's threading HTTP server: a
scrape or probe must never wait behind a running job, and the worker needs no web
framework for three read-only endpoints.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runner.errors import RunnerError
from runner.observability.metrics import WorkerMetrics

log = structlog.get_logger(__name__)

Check = Callable[[], object]


@dataclass
class WorkerHealth:
    """What the endpoints report: the metrics registry, this worker's stats, and the
    readiness checks (each raises `RunnerError` when its dependency is unusable)."""

    worker_id: str
    metrics: WorkerMetrics
    checks: dict[str, Check]

    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "worker_id": self.worker_id, **self.metrics.stats.snapshot()}

    def readyz(self) -> tuple[bool, dict[str, Any]]:
        results: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                check()
                results[name] = "ok"
            except RunnerError as exc:
                results[name] = exc.message
            except Exception as exc:  # noqa: BLE001 - a probe reports, it never crashes
                results[name] = f"{type(exc).__name__}: {exc}"
        ready = all(v == "ok" for v in results.values())
        return ready, {"status": "ok" if ready else "unavailable", "worker_id": self.worker_id,
                       "checks": results}


def serve(health: WorkerHealth, *, host: str, port: int) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; the server (call `shutdown()` to stop).

    Raises:
        OSError: the port is taken (the worker refuses to start without its port).
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(health.metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._json(200, health.healthz())
            elif path == "/readyz":
                ready, body = health.readyz()
                self._json(200 if ready else 503, body)
            else:
                self._json(404, {"error": {"code": "not_found", "message": f"no {path}"}})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body, default=str).encode(), "application/json")

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return  # probes every few seconds would drown the worker's own lines

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    log.info("health_server_started", host=host, port=server.server_address[1])
    return server
