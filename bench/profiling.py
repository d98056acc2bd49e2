"""Where a runner process spends its time, from py-spy samples (`--format raw`).

`Spy` attaches py-spy to a running `runner worker` or `runner api` process (no
restart, no in-process profiler; `--nonblocking`, so the process is never paused).
`summarise` charges each sample to the innermost runner function on its stack and to
what that function was doing there: its own code, or the first library it called
into (Docker API, database, Redis, RQ, logging, ...).

- worker (`idle=True`, wall clock): only the main thread's samples under RQ's per-job
  entry point count, since RQ's SimpleWorker runs each job there: that is the job's
  critical path, blocking reads included. The rest is the idle dequeue loop.
- API (`idle=False`, CPU): every thread's on-CPU samples, per request.

    python bench/profiling.py RAW.txt --rate 100 --per 40 [--worker]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

PYSPY = Path(__file__).resolve().parent.parent / "var" / "venv" / "bin" / "py-spy"
CATEGORIES = [
    (("docker/", "requests/", "urllib3/"), "docker API"),
    (("sqlalchemy/", "psycopg/", "psycopg_pool/"), "database"),
    (("redis/",), "redis"),
    (("rq/",), "rq"),
    (("structlog/", "logging/"), "logging"),
    (("prometheus_client/",), "metrics"),
    (("opentelemetry/",), "tracing"),
    (("pydantic/", "pydantic_core/"), "pydantic"),
    (("jsonschema/", "referencing/", "rpds/"), "jsonschema"),
    (("fastapi/", "starlette/"), "fastapi/starlette"),
    (("uvicorn/", "h11/", "httptools/"), "uvicorn"),
    (("anyio/", "asyncio/", "concurrent/"), "asyncio/threadpool"),
    (("json/",), "json"),
    (("threading.py", "queue.py"), "threads (join/wait)"),
    (("tarfile.py",), "tarfile"),
    (("socket.py", "selectors.py", "ssl.py"), "sockets"),
]
JOB_ENTRY = ("execute_job", "perform_job")
DECORATORS = (" wrapped", " inner", " wrapper")
IDLE_ENTRY = ("dequeue_job_and_maintain_ttl",)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")


class Spy:
    """py-spy recording a process until `stop()`."""

    def __init__(self, pid: int, out: Path, *, rate: int = 100, idle: bool) -> None:
        self.out, self.rate = out, rate
        command = [str(PYSPY), "record", "--pid", str(pid), "--format", "raw", "--threads",
                   "--nonblocking", "--rate", str(rate), "-o", str(out)]
        if idle:
            command.append("--idle")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        time.sleep(1.0)  # attached before the work starts
        if self.process.poll() is not None:
            stderr = self.process.stderr.read().decode() if self.process.stderr else ""
            raise RuntimeError(f"py-spy failed: {stderr[-500:]}")

    def stop(self) -> Path:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        return self.out


def available() -> bool:
    return PYSPY.exists()


def classify(path: str) -> str | None:
    if path.startswith(("runner/", "api/")) or ("/work/" in path and (
            "/runner/" in path or "/api/" in path) and "site-packages" not in path):
        return "runner"
    for prefixes, name in CATEGORIES:
        if path.startswith(prefixes) or any(f"/{p}" in path for p in prefixes):
            return name
    return None


def _short(path: str) -> str:
    for root in ("runner/", "api/"):
        index = path.rfind(root)
        if index >= 0:
            return path[index:]
    return path


def parse(raw: Path) -> list[tuple[str, list[tuple[str, str]], int]]:
    """(thread name, [(function, path)] outermost first, sample count) per line."""
    stacks = []
    for line in raw.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        parts = body.split(";")
        thread = parts[0].split(": ", 1)[-1] if parts[0].startswith("thread") else ""
        frames = []
        for part in parts[1:] if parts[0].startswith("thread") else parts:
            match = _FRAME.match(part)
            if match:
                frames.append((match.group("function"), match.group("path")))
        stacks.append((thread, frames, int(count)))
    return stacks


def _charge(frames: list[tuple[str, str]]) -> tuple[str, str, str]:
    """(innermost runner function, category, detail): the detail names the Docker API
    call (docker-py's method) where the category is the Docker API."""
    function_name, current, detail = "(outside runner code)", None, ""
    for function, path in frames:
        kind = classify(path)
        if kind == "runner":
            function_name, current, detail = f"{_short(path)}:{function}", "runner code", ""
        elif kind is not None and current in (None, "runner code"):
            current = kind
            detail = f"{kind} {function.rsplit('.', 1)[-1]}" if kind == "docker API" else ""
        elif kind == "docker API" and current == kind and detail.endswith(DECORATORS):
            detail = f"{kind} {function.rsplit('.', 1)[-1]}"  # past docker-py's decorator
    current = current or "other"
    return function_name, current, detail or current


def summarise(raw: Path, *, rate: int, per: int, worker: bool) -> dict[str, Any]:
    """ms per job (worker, wall) or per request (API, CPU), by category and function."""
    charges: dict[tuple[str, str, str], int] = {}
    total = idle = 0
    for thread, frames, count in parse(raw):
        names = [f for f, _ in frames]
        if worker:
            if thread != "MainThread":
                continue
            if any(n.endswith(IDLE_ENTRY) for n in names) and not any(
                    n.endswith(JOB_ENTRY) for n in names):
                idle += count
                continue
            if not any(n.endswith(JOB_ENTRY) for n in names):
                continue
        key = _charge(frames)
        charges[key] = charges.get(key, 0) + count
        total += count
    scale = 1000 / rate / max(per, 1)
    categories: dict[str, float] = {}
    functions: dict[str, dict[str, float]] = {}
    for (function, category, detail), count in charges.items():
        categories[category] = categories.get(category, 0.0) + count
        functions.setdefault(function, {})
        functions[function][detail] = functions[function].get(detail, 0.0) + count
    rows = []
    for function, parts in functions.items():
        rows.append({"function": function,
                     "ms": round(sum(parts.values()) * scale, 1),
                     "breakdown": ", ".join(f"{k} {v * scale:.1f}" for k, v in
                                            sorted(parts.items(), key=lambda kv: -kv[1])
                                            if v * scale >= 0.1)})
    rows.sort(key=lambda r: -r["ms"])
    out: dict[str, Any] = {
        "kind": "worker wall time per job (main thread)" if worker
        else "API CPU time per request (all threads)",
        "per": per, "samples": total, "rate_hz": rate, "ms_total": round(total * scale, 1),
        "categories": {k: round(v * scale, 1) for k, v in
                       sorted(categories.items(), key=lambda kv: -kv[1])},
        "functions": [r for r in rows if r["ms"] >= 0.1][:25],
    }
    if worker:
        out["idle_ms_per_job"] = round(idle * scale, 1)
    return out


def render(summary: dict[str, Any], title: str, top: int = 15) -> list[str]:
    unit = "job" if "job" in summary["kind"] else "request"
    lines = [f"{title}: {summary['kind']}, {summary['per']} {unit}s, "
             f"{summary['ms_total']} ms per {unit} sampled"]
    lines.append("  by category: " + ", ".join(f"{k} {v}" for k, v in
                                                summary["categories"].items() if v >= 0.1))
    lines.append(f"  top runner functions (own code + first library called), ms per {unit}:")
    for row in summary["functions"][:top]:
        lines.append(f"    {row['ms']:>7.1f}  {row['function']}  [{row['breakdown']}]")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("raw", type=Path)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--per", type=int, required=True, help="jobs or requests sampled")
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    summary = summarise(args.raw, rate=args.rate, per=args.per, worker=args.worker)
    print("\n".join(render(summary, str(args.raw))))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
