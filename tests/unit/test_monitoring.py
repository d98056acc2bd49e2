"""The alert rules and the Grafana dashboard in monitoring/ are valid and only use
metrics the runner really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from api.metrics import ApiMetrics
from runner.manifest import ManifestSource
from runner.observability.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
METRIC = re.compile(r"\b(runner_[a-z_]+)")


class _Down:
    """Every call fails, like a database or Redis that is down at scrape time."""

    def __getattr__(self, name: str) -> Any:
        raise ConnectionError(name)


def exported_names(tmp_path: Path) -> set[str]:
    """Sample names the worker and the API expose, as Prometheus sees them."""
    path = tmp_path / "manifest.yaml"
    path.write_text("version: 1\nprocessors: []\n")
    manifests = ManifestSource(path)
    def depths(names: list[str]) -> dict[str, int]:
        raise ConnectionError("redis")

    services = SimpleNamespace(manifests=manifests, store=_Down(),
                               queue=SimpleNamespace(redis=_Down(), depths=depths),
                               settings=SimpleNamespace(queue="runner"))
    registries = [WorkerMetrics(manifests, depths=depths, queues=["runner"]).registry,
                  ApiMetrics(services).registry]  # type: ignore[arg-type]
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{s}" for s in ("_bucket", "_count", "_sum"))
            else:
                names.add(family.name)
    return names


def dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_names_include_every_metric_the_issue_asks_for(tmp_path: Path) -> None:
    names = exported_names(tmp_path)
    for name in ("runner_runs_submitted_total", "runner_runs_finished_total",
                 "runner_run_duration_seconds_bucket", "runner_queue_wait_seconds_bucket",
                 "runner_container_create_seconds_bucket",
                 "runner_container_start_seconds_bucket", "runner_retries_total",
                 "runner_dead_letters_total", "runner_queue_depth", "runner_runs_running",
                 "runner_reconciler_actions_total", "runner_manifest_reloads_total",
                 "runner_log_bytes_dropped_total", "runner_dequeue_to_create_seconds_bucket"):
        assert name in names


def test_dashboard_and_alerts_use_only_exported_metrics(tmp_path: Path) -> None:
    names = exported_names(tmp_path)
    used = {m for expr in [*dashboard_exprs(), *(r["expr"] for r in alert_rules())]
            for m in METRIC.findall(expr)}
    assert used, "no runner metric found in the dashboard or the rules"
    assert used <= names, sorted(used - names)


def test_dashboard_panels_are_well_formed() -> None:
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_every_alert_has_severity_summary_and_an_existing_runbook() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "RunnerQueueBacklog", "RunnerDeadLetterSpike", "RunnerFailureRate",
        "RunnerRunsStuckRunning", "RunnerManifestReloadRefused"}
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"].get("runbook")
        if runbook is not None:
            assert (ROOT / runbook).is_file(), f"{rule['alert']}: no {runbook}"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (make test installs it)")
def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
