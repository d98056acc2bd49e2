"""One echo run end to end through the runner, next to a bare `docker run --rm`.

Both use the same image, the same limits and lockdown flags, on the same machine in
the same process run; figures are printed as medians and as a ratio to bare Docker.
Needs the dev stack (`runner dev up`, then `. var/dev/env`).

    python bench/echo_vs_docker.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from runner.client import RunnerClient
from runner.manifest import load_manifest

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bare_docker(image: str, memory: int, cpus: float, pids: int) -> float:
    """`docker run --rm` of the echo image with the runner's limits and lockdown."""
    script = ("printf '{\"message\": \"bench\"}' > /run/input.json && mkdir -p /run/out "
              "&& exec python3 /app/main.py")
    started = time.perf_counter()
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", "--init",
         "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
         "--user", "65532:65532", "--cpus", str(cpus), "--memory", str(memory),
         "--memory-swap", str(memory), "--pids-limit", str(pids),
         "--tmpfs", "/tmp:rw,noexec,nosuid,nodev,size=64m",  # noqa: S108 - in the container
         "--tmpfs", "/run:rw,nosuid,nodev,uid=65532,gid=65532,size=4m",
         "--entrypoint", "/bin/sh", image, "-c", script],
        check=True, capture_output=True)
    return time.perf_counter() - started


def runner_e2e(client: RunnerClient) -> float:
    """Submission until the terminal status is observed through the API."""
    started = time.perf_counter()
    run = client.submit("echo", {"message": "bench"})
    final = client.wait(run["id"], poll=0.01)
    elapsed = time.perf_counter() - started
    if final["status"] != "succeeded":
        raise SystemExit(f"echo run {run['id']} ended {final['status']}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    echo = load_manifest(Path(os.environ["RUNNER_MANIFEST"])).find("echo")
    assert echo is not None
    client = RunnerClient(os.environ["RUNNER_API_URL"], os.environ["RUNNER_API_KEY"])
    runner_e2e(client)  # warm up both paths once
    bare_docker(echo.image, echo.limits.memory_bytes, echo.limits.cpus, echo.limits.pids)
    bare, ours = [], []
    for _ in range(args.runs):  # interleaved, so drift hits both alike
        bare.append(bare_docker(echo.image, echo.limits.memory_bytes, echo.limits.cpus,
                                echo.limits.pids))
        ours.append(runner_e2e(client))
    lines = [
        f"# echo end to end vs bare docker run --rm, {args.runs} runs each, interleaved",
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cpus, "
        f"{platform.platform()}",
        f"{'path':<28}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}",
    ]
    for name, values in (("docker run --rm (B1)", bare), ("runner API end to end", ours)):
        lines.append(f"{name:<28}{percentile(values, .5) * 1000:>10.0f}"
                     f"{percentile(values, .9) * 1000:>10.0f}"
                     f"{statistics.mean(values) * 1000:>10.0f}")
    lines.append(f"ratio runner/B1 at p50: "
                 f"{percentile(ours, .5) / percentile(bare, .5):.2f}")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "echo_vs_docker.txt").write_text(text + "\n")
    (RESULTS / "echo_vs_docker.json").write_text(json.dumps({"bare": bare, "runner": ours}))


if __name__ == "__main__":
    main()
