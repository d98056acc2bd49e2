"""API load: POST /v1/runs against one `runner api` process, open and closed loop.

The load generator is a tiny keep-alive HTTP/1.1 client on asyncio streams, cheap
enough (a fraction of a millisecond per request) not to compete with the API for the
machine's two cores. Open loop: requests leave at fixed intervals whatever the
answers do, and latency counts from the planned send time, so a stall shows as
latency instead of as fewer requests (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
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
