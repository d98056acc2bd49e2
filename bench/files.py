"""Files in, files out, each figure next to its baseline on this machine, in one run.

Not a test (tests/integration/test_files_*.py are); this is the measured cost of the
file path. It starts its own stack (bench/stack.py: a database, Redis, one API and one
worker, the file store in a temporary directory on the same disk as the bench's data
files) and prints one line per figure with the runner's number, the baseline's and
their ratio:

  1  upload of 1 GiB through POST /v1/files     against `cp` + `sync FILE` (fsync)
  2  API RSS growth during that upload          goal: under 50 MB
  3  download of a 256 MiB artifact             against `cat` of its blob to /dev/null;
                                                and a Range request of its last 1 MiB
  4  a run with 10 files of 1 MiB               against the same run with none
  5  a reuse hit (POST answers succeeded)       against a real run, submit to succeeded

About a minute on a quiet 2-core machine (`make bench-files`). `--json FILE` writes
the rows; `--save` writes bench/results/<UTC timestamp>-files.json and .md. The
temporary directory (about 6 GiB at its peak: the 1 GiB file, its copy, four uploads of
it) is removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import REGISTRY, ROOT, Stack, quantile, stack
from bench.suite import API_LIMITS, TERMINAL, machine
from runner.authoring.publish import publish
from runner.client import RunnerClient
from runner.control.blobs import blob_key
from tests.support.processes import RunnerProcess, proc_status

Row = dict[str, Any]
MB = 1_000_000
GIB, MIB = 1024**3, 1024**2
RSS_GOAL_MB = 50.0
SAMPLE_SECONDS = 0.05
# filework's own limits are for its tests (1 MiB of output); these fit a 256 MiB copy.
FILEWORK_LIMITS = {"output_bytes": "600Mi", "timeout": "120s"}
STAGES = ("pull", "create", "start", "wait", "collect")
BEGAN = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - BEGAN:6.1f}s] {message}", flush=True)


def row(item: str, figure: str, runner: float | None, baseline: float | None, unit: str,
        *, versus: str, note: str = "", **extra: Any) -> Row:
    ratio = runner / baseline if runner is not None and baseline else None
    found = {"item": item, "figure": figure, "runner": runner, "baseline": baseline,
             "unit": unit, "versus": versus, "ratio": ratio, "note": note, **extra}
    print(f"  -> {line(found)}", flush=True)
    return found


def line(r: Row) -> str:
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
    return (f"{r['item']:>2}  {r['figure']:<34} {num(r['runner']):>9} {num(r['baseline']):>9}"
            f" {r['unit']:<5} {ratio:>6}  {r['versus']}{'; ' + r['note'] if r['note'] else ''}")


def header() -> str:
    return f"{'#':>2}  {'figure':<34} {'runner':>9} {'baseline':>9} {'unit':<5} {'ratio':>6}  vs"


# Data and baselines -----------------------------------------------------------------------

def write_random(path: Path, size: int) -> None:
    """`size` random bytes, fsync'd: none of their writeback is left for a timing."""
    with path.open("wb") as handle:
        for _ in range(size // (16 * MIB)):
            handle.write(os.urandom(16 * MIB))
        handle.write(os.urandom(size % (16 * MIB)))
        handle.flush()
        os.fsync(handle.fileno())


def cp_seconds(source: Path, target: Path) -> float:
    """`cp` then `sync FILE` (an fsync of the copy, as the store fsyncs a blob)."""
    started = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    subprocess.run(["sync", str(target)], check=True)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def cat_seconds(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def sha256_seconds(path: Path) -> float:
    """Hashing the file in one Python thread, 1 MiB at a time, as the API does."""
    digest = hashlib.sha256()
    started = time.perf_counter()
    with path.open("rb") as handle:
        while chunk := handle.read(MIB):
            digest.update(chunk)
    return time.perf_counter() - started


class Sampler(threading.Thread):
    """VmRSS of a process every SAMPLE_SECONDS until stopped (KiB)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples = pid, [proc_status(pid, "VmRSS")]
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self.samples.append(proc_status(self.pid, "VmRSS"))

    @contextmanager
    def during(self) -> Iterator[Sampler]:
        self.start()
        try:
            yield self
        finally:
            self._done.set()
            self.join()


# The runner side --------------------------------------------------------------------------

def wait_run(http: httpx.Client, run_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, Any] = http.get(f"/v1/runs/{run_id}", params={"wait": 30}).json()
        if found.get("status") in TERMINAL or time.monotonic() > deadline:
            return found


def timed_run(http: httpx.Client, body: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """(submit -> succeeded ms, POST ms, the run) of one run, which must succeed."""
    started = time.perf_counter()
    answer = http.post("/v1/runs", json=body)
    posted = time.perf_counter()
    if answer.status_code != 202:
        raise RuntimeError(f"POST /v1/runs: HTTP {answer.status_code} {answer.text[:300]}")
    run = wait_run(http, answer.json()["id"])
    ended = time.perf_counter()
    if run.get("status") != "succeeded":
        raise RuntimeError(f"run {run.get('id')} ended {run.get('status')}: "
                           f"{run.get('error_code')} {run.get('error_message')}")
    return (ended - started) * 1000, (posted - started) * 1000, run


class Curl:
    """curl as a second client: the same request without Python on the client side, so
    the gap between the two clients is client cost, not the API's."""

    def __init__(self, url: str, key: str, work: Path) -> None:
        self.url = url
        self.headers = work / "curl-headers"  # the key in a 0600 file, not in argv
        self.headers.write_text(f"Authorization: Bearer {key}\n")
        self.headers.chmod(0o600)

    def __call__(self, path: str, *args: str) -> tuple[float, str]:
        started = time.perf_counter()
        done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                               "-H", f"@{self.headers}", *args, f"{self.url}{path}"],
                              check=True, capture_output=True, text=True)
        return time.perf_counter() - started, done.stdout

    def upload(self, source: Path) -> float:
        # -T streams the file (POST instead of PUT); "Expect:" skips the 100-continue.
        seconds, status = self("/v1/files", "-X", "POST", "-T", str(source), "-H", "Expect:",
                               "-H", "Content-Type: application/octet-stream")
        if status != "201":
            raise RuntimeError(f"curl upload: HTTP {status}")
        return seconds


def upload_figures(client: RunnerClient, curl: Curl, api: RunnerProcess, work: Path
                   ) -> list[Row]:
    big = work / "big.bin"
    log("writing 1 GiB of random bytes")
    write_random(big, GIB)
    hash_s = sha256_seconds(big)
    found: dict[str, list[float]] = {"cp": [], "client": [], "curl": [], "after_last_byte": []}
    rss: list[tuple[int, int, int, int]] = []  # (VmRSS before, max, VmHWM before, after)

    def upload(how: str) -> None:
        with big.open("r+b") as handle:  # other bytes each time: every upload is new (201)
            handle.write(os.urandom(16))
            os.fsync(handle.fileno())
        hwm = proc_status(api.pid, "VmHWM")
        last_byte: list[float] = []

        def progress(done: int, total: int | None) -> None:
            if done == total:
                last_byte.append(time.perf_counter())

        with Sampler(api.pid).during() as sampler:
            started = time.perf_counter()
            if how == "curl":
                found["curl"].append(curl.upload(big))
            else:
                answer = client.upload_file(big, progress=progress)
                ended = time.perf_counter()
                found["client"].append(ended - started)
                found["after_last_byte"].append(ended - last_byte[-1])
                if answer["size"] != GIB:
                    raise RuntimeError(f"uploaded {answer['size']} bytes, not {GIB}")
        rss.append((sampler.samples[0], max(sampler.samples), hwm,
                    proc_status(api.pid, "VmHWM")))

    order = ["cp", "client", "curl"]
    for index in range(2):
        for how in order[index:] + order[:index]:
            if how == "cp":
                found["cp"].append(cp_seconds(big, work / "big.copy"))
            else:
                upload(how)
        log("  round {}: cp+sync {:.0f} MB/s, client {:.0f} MB/s, curl {:.0f} MB/s".format(
            index + 1, *(GIB / MB / found[k][-1] for k in ("cp", "client", "curl"))))
    big.unlink()
    mbs = {k: GIB / MB / statistics.median(v) for k, v in found.items() if k != "after_last_byte"}
    growth = max(peak - before for before, peak, _, _ in rss) * 1024 / MB
    hwm = max(after - before for _, _, before, after in rss) * 1024 / MB
    tail_ms = statistics.median(found["after_last_byte"]) * 1000
    return [
        row("1", "upload 1 GiB, RunnerClient", mbs["client"], mbs["cp"], "MB/s",
            versus="cp + sync FILE (fsync), same disk",
            note=f"median of 2; answer {tail_ms:.0f} ms after the last byte; "
                 f"sha256 alone {GIB / MB / hash_s:.0f} MB/s", seconds=found),
        row("1", "  same upload by curl -T", mbs["curl"], mbs["cp"], "MB/s",
            versus="cp + sync FILE", note="median of 2"),
        row("2", "API RSS growth during uploads", growth, RSS_GOAL_MB, "MB",
            versus=f"goal < {RSS_GOAL_MB:.0f} MB: {'held' if growth < RSS_GOAL_MB else 'NOT HELD'}",
            note=f"VmRSS {rss[0][0] / 1024:.0f} MiB before; VmHWM +{hwm:.1f} MB; "
                 f"sampled every {SAMPLE_SECONDS * 1000:.0f} ms over {len(rss)} uploads",
            held=growth < RSS_GOAL_MB, vmhwm_growth_mb=hwm, rss_kib=rss),
    ]


def download_figures(client: RunnerClient, http: httpx.Client, curl: Curl, bench: Stack,
                     file_dir: Path, work: Path) -> list[Row]:
    mid = work / "mid.bin"
    write_random(mid, 256 * MIB)
    uploaded = client.upload_file(mid)
    mid.unlink()
    log("filework copy of a 256 MiB file")
    run_ms, _, run = timed_run(http, {"processor": "filework", "input": {"mode": "copy"},
                                      "files": {"mid.bin": uploaded["id"]}})
    artifact = next(a for a in run["artifacts"] if a["name"] == "copies/mid.bin")
    blob = file_dir / bench.instance / "blobs" / blob_key("bench", artifact["sha256"])
    path = f"/v1/runs/{run['id']}/artifacts/copies/mid.bin"

    def download() -> float:
        started, got = time.perf_counter(), 0
        with http.stream("GET", path) as answer, open(os.devnull, "wb") as sink:
            for chunk in answer.iter_raw():
                sink.write(chunk)
                got += len(chunk)
        if answer.status_code != 200 or got != artifact["size"]:
            raise RuntimeError(f"download: HTTP {answer.status_code}, {got} bytes")
        return time.perf_counter() - started

    def by_curl() -> float:
        seconds, status = curl(path)
        if status != "200":
            raise RuntimeError(f"curl download: HTTP {status}")
        return seconds

    cat_seconds(blob)  # all three read from the page cache from here on
    downloads, curls, cats = [], [], []
    for _ in range(3):
        downloads.append(download())
        curls.append(by_curl())
        cats.append(cat_seconds(blob))
    size = artifact["size"]
    ranges, lists = [], []
    for _ in range(20):
        started = time.perf_counter()
        part = http.get(path, headers={"Range": f"bytes=-{MIB}"})
        ranges.append((time.perf_counter() - started) * 1000)
        if part.status_code != 206 or len(part.content) != MIB:
            raise RuntimeError(f"range: HTTP {part.status_code}, {len(part.content)} bytes")
        started = time.perf_counter()
        http.get(f"/v1/runs/{run['id']}/artifacts").raise_for_status()
        lists.append((time.perf_counter() - started) * 1000)
    return [
        row("3", "download 256 MiB artifact, httpx", size / MB / statistics.median(downloads),
            size / MB / statistics.median(cats), "MB/s", versus="cat of its blob > /dev/null",
            note=f"median of 3; the copy run took {run_ms / 1000:.1f} s",
            downloads_s=downloads, cats_s=cats, copy_run_ms=run_ms),
        row("3", "  same GET by curl", size / MB / statistics.median(curls),
            size / MB / statistics.median(cats), "MB/s", versus="cat of its blob",
            note="median of 3", curls_s=curls),
        row("3", "Range: last 1 MiB of it", statistics.median(ranges),
            statistics.median(lists), "ms", versus="GET of its artifact list (small JSON)",
            note=f"p50 of 20; p90 {quantile(ranges, 0.9):.1f} ms", range_ms=ranges,
            list_ms=lists),
    ]


def stage_medians(worker: RunnerProcess, run_ids: list[str]) -> dict[str, float]:
    events = {e["run_id"]: e for e in worker.events("container_finished")}
    picked = [events[r] for r in run_ids if r in events]
    found = {name: statistics.median(e["stages_ms"].get(name, 0.0) for e in picked)
             for name in STAGES}
    found["total"] = statistics.median(e["total_ms"] for e in picked)
    return found


def delivery_figures(client: RunnerClient, http: httpx.Client, worker: RunnerProcess
                     ) -> tuple[list[Row], dict[str, str]]:
    files = {f"f{i:02d}.bin": client.upload_file(io.BytesIO(os.urandom(MIB)),
                                                 name=f"f{i:02d}.bin")["id"] for i in range(10)}
    tag = secrets.token_hex(4)

    def body(index: int, with_files: bool) -> dict[str, Any]:
        return {"processor": "filework", "files": files if with_files else {},
                "input": {"mode": "note", "note": f"{tag} {index} {with_files}"}}

    log("10 runs with 10 files of 1 MiB, 10 without, alternating")
    for with_files in (False, True):
        timed_run(http, body(-1, with_files))
    walls: dict[str, list[float]] = {"with": [], "without": []}
    posts: dict[str, list[float]] = {"with": [], "without": []}
    ids: dict[str, list[str]] = {"with": [], "without": []}
    for index in range(10):
        for with_files in ((False, True) if index % 2 == 0 else (True, False)):
            wall, post, run = timed_run(http, body(index, with_files))
            kind = "with" if with_files else "without"
            walls[kind].append(wall)
            posts[kind].append(post)
            ids[kind].append(run["id"])
    time.sleep(0.5)  # the last container_finished line is written as the run ends
    stages = {kind: stage_medians(worker, ids[kind]) for kind in ids}
    p50 = {kind: statistics.median(walls[kind]) for kind in walls}
    posted = {kind: statistics.median(posts[kind]) for kind in posts}
    rows = [row("4", "run with 10 x 1 MiB files (p50)", p50["with"], p50["without"], "ms",
                versus="same run without files, submit -> succeeded",
                note=f"{p50['with'] - p50['without']:+.1f} ms", wall_ms=walls, post_ms=posts,
                stages_ms=stages),
            row("4", "  POST /v1/runs (p50)", posted["with"], posted["without"], "ms",
                versus="without files", note=f"{posted['with'] - posted['without']:+.1f} ms")]
    for name, label in (("create", "create"), ("start", "start+files"),
                        ("collect", "collect"), ("total", "total")):
        rows.append(row("4", f"  worker {label} (p50)", stages["with"][name],
                        stages["without"][name], "ms", versus="without files",
                        note=f"{stages['with'][name] - stages['without'][name]:+.1f} ms"))
    return rows, files


def reuse_figures(http: httpx.Client, files: dict[str, str]) -> list[Row]:
    tag = secrets.token_hex(4)
    first = {"processor": "filework", "files": files, "input": {"mode": "note", "note": tag}}
    _, _, done = timed_run(http, first)
    log("5 real runs and 20 reuse hits, interleaved")
    real, hits = [], []
    for index in range(5):
        wall, _, _ = timed_run(http, {**first, "input": {"mode": "note",
                                                         "note": f"{tag} {index}"}})
        real.append(wall)
        for _ in range(4):
            started = time.perf_counter()
            answer = http.post("/v1/runs", json={**first, "reuse": True})
            hits.append((time.perf_counter() - started) * 1000)
            hit = answer.json()
            if hit.get("status") != "succeeded" or hit.get("reused_from") != done["id"]:
                raise RuntimeError(f"not a reuse hit: HTTP {answer.status_code} {hit}")
    return [row("5", "reuse hit, POST (p50)", statistics.median(hits),
                statistics.median(real), "ms", versus="real run (10 files), submit -> "
                "succeeded, p50 of 5", note=f"p90 {quantile(hits, 0.9):.1f} ms",
                hit_ms=hits, real_ms=real)]


# Main -------------------------------------------------------------------------------------

def measure(client_docker: docker.DockerClient) -> tuple[list[Row], dict[str, Any]]:
    entry = publish(ROOT / "tests" / "processors" / "filework", registry=REGISTRY,
                    client=client_docker, local_base=True)
    entry["limits"] = {**entry.get("limits", {}), **FILEWORK_LIMITS}
    work = Path(tempfile.mkdtemp(prefix="runner-bench-files-"))
    file_dir = work / "store"
    info: dict[str, Any] = {"work_dir": str(work)}
    rows: list[Row] = []
    try:
        file_dir.mkdir()
        with stack([entry]) as bench:
            api = bench.start_api("api", file_dir=file_dir, **API_LIMITS)
            worker = bench.start_worker("w1", file_dir=file_dir)
            assert api.url is not None
            with RunnerClient(api.url, bench.key) as client, httpx.Client(
                    base_url=api.url, timeout=httpx.Timeout(30, read=300),
                    headers={"Authorization": f"Bearer {bench.key}"}) as http:
                curl = Curl(api.url, bench.key, work)
                rows += upload_figures(client, curl, api, work)
                rows += download_figures(client, http, curl, bench, file_dir, work)
                delivered, files = delivery_figures(client, http, worker)
                rows += delivered
                rows += reuse_figures(http, files)
            bench.stop(worker)
            bench.stop(api)
            time.sleep(1)
            left = bench.containers(client_docker)
            info["containers_left"] = len(left)
            for container in left:
                container.remove(force=True, v=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Also write the rows to this file.")
    parser.add_argument("--save", action="store_true",
                        help="Write bench/results/<UTC timestamp>-files.json and .md.")
    args = parser.parse_args()
    client = docker.from_env(timeout=120)
    started_at = datetime.now(UTC)
    host = machine(client)
    began = time.monotonic()
    rows, info = measure(client)
    host["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = "\n".join([f"# files in, files out {started_at.isoformat(timespec='seconds')}",
                      header(), "-" * 100, *(line(r) for r in rows), "",
                      f"containers left: {info.get('containers_left')}; elapsed "
                      f"{time.monotonic() - began:.0f} s"])
    print(f"\n{text}")
    result = {"started_at": started_at.isoformat(timespec="seconds"), "argv": sys.argv,
              "machine": host, "info": info, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.save:
        stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
        out = ROOT / "bench" / "results" / f"{stamp}-files.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        table = "".join(f"| {k} | {host.get(k)} |\n" for k in host)
        out.with_suffix(".md").write_text(
            f"# Files in, files out {result['started_at']}\n\n| machine | |\n|---|---|\n"
            f"{table}\nCommand: `{' '.join(sys.argv)}`\n\n```\n{text}\n```\n")
        print(f"\nresults: {out.relative_to(ROOT)} and {out.with_suffix('.md').name}")
    held = all(r.get("held", True) for r in rows) and info.get("containers_left") == 0
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
