"""Input delivery and result collection give the same verdicts on both paths: through
the /run volume's host directory (direct) and through the engine's archive API."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import docker
import pytest

from runner.execution.executor import classify
from runner.sandbox import RUN_LABEL, WORKER_LABEL, ContainerSpec, Sandbox
from runner.settings import Settings
from tests.integration.conftest import SESSION, bare_sandbox_config

CASES = [("ok", None), ("symlink", "invalid_output"), ("dir", "invalid_output"),
         ("fifo", "invalid_output"), ("notjson", "invalid_output"),
         ("big", "output_too_large")]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "archive"])
def test_both_paths_refuse_the_same_bad_results(settings: Settings, direct: bool,
                                                published: dict[str, dict[str, Any]]) -> None:
    sandbox = Sandbox(docker.from_env(), replace(bare_sandbox_config(settings),
                                                 direct_volume_io=direct))
    assert sandbox.transfers.direct_io() is direct  # this machine's engine allows the direct path
    seen = {}
    for index, (mode, _) in enumerate(CASES):
        spec = ContainerSpec(
            name=f"runner-paths-{SESSION}-{direct}-{index}",
            image=published["badresult"]["image"], cpus=0.5, memory_bytes=64 << 20,
            pids_limit=16, timeout_seconds=30, log_cap_bytes=1 << 20,
            input_json=f'{{"mode": "{mode}", "target": "/etc/passwd"}}'.encode(),
            labels={RUN_LABEL: f"paths-{SESSION}", WORKER_LABEL: f"paths-{SESSION}"})
        chunks: list[bytes] = []
        outcome = sandbox.run(spec, on_log=chunks.append)
        assert f"mode={mode}".encode() in b"".join(chunks)  # the input arrived intact
        finish = classify(outcome)
        seen[mode] = finish.error_code
        if mode == "ok":
            assert finish.result == {"ok": True}
    assert seen == dict(CASES)
