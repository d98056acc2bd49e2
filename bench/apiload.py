"""API load: POST /v1/runs against one `runner api` process, open and closed loop.

The load generator is a tiny keep-alive HTTP/1.1 client on asyncio streams, cheap
enough (a fraction of a millisecond per request) not to compete with the API for the
machine's two cores. Open loop: requests leave at fixed intervals whatever the
answers do, and latency counts from the planned send time, so a stall shows as
latency instead of as fewer requests (no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.stack import quantile

INPUT = {"message": "bench"}


class RawHttp:
    """A tiny keep-alive HTTP/1.1 client on asyncio streams: a load generator cheap
    enough (a fraction of a millisecond per request) not to compete with the API."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(self) -> int:
        """One request; a kept-alive connection the server closed meanwhile (its idle
        timeout) is replaced and the request sent again, as HTTP clients do."""
        while self.idle:
            conn = self.idle.pop()
            try:
                return await self._exchange(conn)
            except (ConnectionError, asyncio.IncompleteReadError):
                continue
        conn = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(conn)

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> int:
        reader, writer = conn
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                if key == b"content-length":
                    length = int(value.strip())
                elif key == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append(conn)
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def post_request(url: str, key: str, processor: str) -> tuple[str, int, bytes]:
    parsed = httpx.URL(url)
    body = json.dumps({"processor": processor, "input": INPUT}).encode()
    head = (f"POST /v1/runs HTTP/1.1\r\nHost: {parsed.host}:{parsed.port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return str(parsed.host), int(parsed.port or 80), head + body


async def open_loop(client: RawHttp, rate: float, duration: float) -> dict[str, Any]:
    """Requests at fixed intervals whatever the answers do; latency from the planned
    send time, so a stall shows as latency rather than as fewer requests."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    tasks = []
    total = int(rate * duration)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(planned: float) -> None:
        try:
            status = await client.send()
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        if status != 202:
            errors[str(status)] = errors.get(str(status), 0) + 1
            return
        latencies.append(loop.time() - planned)

    for i in range(total):
        planned = start + i / rate
        delay = planned - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(planned)))
    sent_by = loop.time()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return {"rate": rate, "duration_s": duration, "sent": total, "ok": len(latencies),
            "errors": errors, "achieved_per_s": round(len(latencies) / (sent_by - start), 1),
            "p50_ms": round(quantile(latencies, 0.5) * 1000, 2),
            "p99_ms": round(quantile(latencies, 0.99) * 1000, 2),
            "max_ms": round(max(latencies) * 1000, 2) if latencies else None}


async def closed_loop(client_factory: Callable[[], RawHttp], concurrency: int,
                      duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + duration

    async def worker() -> None:
        nonlocal errors
        client = client_factory()
        while loop.time() < end:
            started = loop.time()
            try:
                status = await client.send()
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                continue
            if status == 202:
                latencies.append(loop.time() - started)
            else:
                errors += 1
        client.close()

    started = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = loop.time() - started
    return {"concurrency": concurrency, "duration_s": round(elapsed, 1), "ok": len(latencies),
            "errors": errors, "throughput_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(quantile(latencies, 0.5) * 1000, 2),
            "p99_ms": round(quantile(latencies, 0.99) * 1000, 2)}


def api_load(url: str, key: str, processor: str, *, duration: float, step_seconds: float,
             rates: list[float], closed_seconds: float, log: Callable[[str], None]
             ) -> dict[str, Any]:
    host, port, request = post_request(url, key, processor)

    async def go() -> dict[str, Any]:
        client = RawHttp(host, port, request)
        warm = await open_loop(client, 50, 2)  # connections and caches warm
        del warm
        first = await open_loop(client, 100, duration)
        log(f"  100/s for {duration:g}s: p50 {first['p50_ms']} ms, p99 {first['p99_ms']} ms, "
            f"errors {first['errors'] or 0}")
        steps = [first]
        highest = 100.0 if _passes(first) else None
        for rate in rates:
            if not _passes(steps[-1]):
                break
            result = await open_loop(client, rate, step_seconds)
            steps.append(result)
            log(f"  {rate:g}/s for {step_seconds:g}s: p50 {result['p50_ms']} ms, "
                f"p99 {result['p99_ms']} ms, achieved {result['achieved_per_s']}/s, "
                f"errors {result['errors'] or 0}")
            if _passes(result):
                highest = rate
        client.close()
        closed = await closed_loop(lambda: RawHttp(host, port, request), 8, closed_seconds)
        log(f"  closed loop, 8 connections, {closed_seconds:g}s: "
            f"{closed['throughput_per_s']}/s, p50 {closed['p50_ms']} ms, "
            f"p99 {closed['p99_ms']} ms")
        return {"open_loop": steps, "highest_sustained_per_s": highest,
                "closed_loop": closed}

    return asyncio.run(go())


def _passes(step: dict[str, Any]) -> bool:
    return (not step["errors"] and step["p99_ms"] <= 20.0
            and step["achieved_per_s"] >= 0.95 * step["rate"])


def run_open_loop(url: str, key: str, processor: str, rate: float, duration: float
                  ) -> dict[str, Any]:
    host, port, request = post_request(url, key, processor)

    async def go() -> dict[str, Any]:
        client = RawHttp(host, port, request)
        try:
            return await open_loop(client, rate, duration)
        finally:
            client.close()

    return asyncio.run(go())


# Standalone: `python -m bench.apiload` --------------------------------------------

# A digest-pinned entry the API accepts; no worker runs it, so no image is needed.
LOAD_ENTRY = {"name": "echo-load", "version": "1.0.0",
              "image": "127.0.0.1:5000/processors/echo@sha256:" + "0" * 64,
              "limits": {"cpus": 0.5, "memory": "64Mi", "pids": 32, "timeout": "30s"},
              "input_schema": {"type": "object",
                               "properties": {"message": {"type": "string"}}}}
# Limits far above the load, so the bench measures the path, not the limiter's refusals.
LOAD_LIMITS = {"key_requests_per_second": 1_000_000,
               "tenant_submissions_per_minute": 100_000_000,
               "tenant_max_active_runs": 10_000_000}


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of `pid` and every descendant alive now (the
    processes `runner api --workers N` starts)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return total


def measured(pid: int, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`step()`'s figures with the API's CPU milliseconds per accepted request."""
    before = process_tree_cpu(pid)
    result = step()
    spent = process_tree_cpu(pid) - before
    result["api_cpu_ms_per_run"] = round(spent * 1000 / max(result["ok"], 1), 2)
    return result


def standalone(args: argparse.Namespace) -> dict[str, Any]:
    """One `runner api --workers N` per N in `args.workers` on one scratch stack,
    measured in interleaved rounds: closed loop, then open loop at `args.rate`."""
    from bench.stack import stack
    from runner.control.keys import Keys
    from runner.domain import Role
    from tests.support.net import free_port
    from tests.support.processes import RunnerProcess

    with stack([LOAD_ENTRY], keep=args.keep) as made:
        # The closed loop's connections take the tenants in turn: one tenant's
        # submissions queue on its quota row lock (Store.create_run), across processes.
        keys = [made.key] + [Keys(made.store).create(tenant=f"bench-{i}", role=Role.SUBMITTER)[1]
                             for i in range(1, args.tenants)]
        apis = {}
        for n in args.workers:
            port = free_port()
            extra = ["--workers", str(n)] if n != 1 else []  # 1: the plain command
            api = RunnerProcess(f"api-{n}w", ["api", "--port", str(port), *extra],
                                env=made.env(**LOAD_LIMITS), log_path=made.dir / f"api-{n}.log",
                                url=f"http://127.0.0.1:{port}")
            made.services.append(api)
            api.wait_ready(url=api.url)
            apis[n] = api
        results: dict[int, list[dict[str, Any]]] = {n: [] for n in apis}
        for round_number in range(args.rounds):
            for n, api in apis.items():
                url = api.url or ""
                turns = itertools.cycle(keys)

                def connect(url: str = url, turns: Iterator[str] = turns) -> RawHttp:
                    return RawHttp(*post_request(url, next(turns), "echo-load"))

                run_open_loop(url, made.key, "echo-load", 50, 2)  # warm
                closed = measured(api.pid, functools.partial(
                    asyncio.run, closed_loop(connect, args.concurrency, args.seconds)))
                opened = measured(api.pid, functools.partial(
                    run_open_loop, url, made.key, "echo-load", args.rate, args.seconds))
                results[n].append({"closed": closed, "open": opened})
                if args.profile and round_number == 0:
                    profile(api, made.key, args, made.dir / f"api-{n}.pyspy.txt")
                print(f"round {round_number + 1} workers={n}: closed "
                      f"{closed['throughput_per_s']}/s ({closed['api_cpu_ms_per_run']} ms "
                      f"CPU/run); open {args.rate:g}/s p50 {opened['p50_ms']} p99 "
                      f"{opened['p99_ms']} ms ({opened['api_cpu_ms_per_run']} ms CPU/run, "
                      f"errors {opened['errors'] or 0})", flush=True)
    return {str(n): rounds for n, rounds in results.items()}


def profile(api: Any, key: str, args: argparse.Namespace, out: Path) -> None:
    """py-spy on the API (every process of it) during an open loop at half the rate:
    CPU per request by category and function, printed."""
    from bench import profiling

    spies = [profiling.Spy(pid, out.with_suffix(f".{pid}.txt"), idle=False)
             for pid in [api.pid, *child_pids(api.pid)]]
    try:
        step = run_open_loop(api.url or "", key, "echo-load", args.rate / 2, args.seconds)
    finally:
        paths = [spy.stop() for spy in spies]
    out.write_text("".join(p.read_text() for p in paths if p.exists()))
    summary = profiling.summarise(out, rate=spies[0].rate, per=step["ok"], worker=False)
    print("\n".join(profiling.render(summary, str(out), top=25)), flush=True)


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description="POST /v1/runs load on `runner api`")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="one API per figure, started with `--workers N`")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="each step's length")
    parser.add_argument("--rate", type=float, default=100.0, help="the open loop's rate")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="connections of the closed loop")
    parser.add_argument("--tenants", type=int, default=1,
                        help="tenants (one key each) the closed loop's connections share")
    parser.add_argument("--keep", action="store_true", help="keep the stack's logs")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy each API in the first round (CPU per request)")
    args = parser.parse_args()
    results = standalone(args)
    for n, rounds in results.items():
        rates = sorted(r["closed"]["throughput_per_s"] for r in rounds)
        p99s = sorted(r["open"]["p99_ms"] for r in rounds)
        cpu = sorted(r["open"]["api_cpu_ms_per_run"] for r in rounds)
        print(f"workers={n}: closed median {rates[len(rates) // 2]}/s, open p99 median "
              f"{p99s[len(p99s) // 2]} ms, CPU/run median {cpu[len(cpu) // 2]} ms")


if __name__ == "__main__":
    main()
