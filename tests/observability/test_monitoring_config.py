"""The monitoring files in containers/: promtool on the Prometheus config and alert rules, and the
Grafana provisioning and dashboard checked for what the issue asks and for self-consistency.

promtool comes from Debian's prometheus package (make test installs it); without it those tests
skip. The integration tests (tests/integration/test_observability.py) run the same files in a
real Prometheus against a real worker tree and orchestrator.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "containers" / "prometheus"
GRAFANA = ROOT / "containers" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "activation.json"
SEED_PANELS = ("Average queue size per worker", "P95 activation latency", "Tasks completed per minute", "Worker health")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus package)")
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    done = promtool(*args)
    assert done.returncode == 0, done.stdout + done.stderr


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (a dev dependency: pip install -e .[dev])")
    return yaml.safe_load(path.read_text())


def alerts() -> dict[str, dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_prometheus_scrapes_every_worker_and_the_orchestrator() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    workers = jobs["activation-workers"]
    assert workers["honor_labels"] is True
    targets = {t: c["labels"]["worker"] for c in workers["static_configs"] for t in c["targets"]}
    assert targets == {"marie:9100": "marie", "anga:9100": "anga", "fabien:9100": "fabien"}
    orchestrator = jobs["activation-orchestrator"]
    assert orchestrator["metrics_path"] == "/metrics"
    assert [t for c in orchestrator["static_configs"] for t in c["targets"]] == ["orchestrator:8000"]
    assert config["rule_files"] == ["alerts.yml"]


def test_the_issues_alerts_are_there_each_labelled_explained_and_tested() -> None:
    rules = alerts()
    for name in ("WorkerDown", "WorkerHeartbeatStale", "TaskQueueBackingUp", "ActivationLatencyHigh"):
        assert name in rules
    for name in ("DeadLettersRising", "AgentTimeoutsRising", "RedisDisconnected"):
        assert name in rules
    assert "task_queue_size > 5" in rules["TaskQueueBackingUp"]["expr"]
    assert rules["TaskQueueBackingUp"]["for"] == "5m"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    # Every alert is shown firing at least once by promtool's unit tests.
    tests = load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == set(rules)


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_the_dashboard_has_the_seeds_panels_and_the_issues_additions() -> None:
    by_title = {p["title"]: p for p in panels()}
    for title in SEED_PANELS:
        assert title in by_title
    assert by_title["P95 activation latency"]["fieldConfig"]["defaults"]["unit"] == "s"
    assert "histogram_quantile(0.95" in by_title["P95 activation latency"]["targets"][0]["expr"]
    heatmaps = [p for p in panels() if p["type"] == "heatmap"]
    assert any("task_processing_seconds_bucket" in t["expr"] for p in heatmaps for t in p["targets"])
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels()}
    assert "by (reason)" in exprs["Dead letters by reason"]
    assert "redis_connected" in exprs["Redis connectivity"]
    assert "by (transport)" in exprs["Dispatch per minute: files / events"]
    mode = by_title["Orchestrator mode"]
    assert "orchestrator_mode" in exprs["Orchestrator mode"]
    texts = {v["text"] for m in mode["fieldConfig"]["defaults"]["mappings"] for v in m["options"].values()}
    assert texts == {"files", "events", "auto"}


def test_the_dashboard_is_consistent_with_its_provisioning() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    uid = datasources[0]["uid"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": uid}, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["worker"]["datasource"]["uid"] == uid
    for panel in panels():
        for target in panel["targets"]:
            if "worker" in target["expr"] and panel["title"] != "Orchestrator mode":
                assert 'worker=~"$worker"' in target["expr"], panel["title"]
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "activation.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_mounts_the_monitoring_files_where_they_are_read() -> None:
    compose_file = ROOT / "docker-compose.yml"
    if not compose_file.exists():
        pytest.skip("no docker-compose.yml")
    services = load_yaml(compose_file)["services"]
    mounts = {
        name: {m.split(":")[1]: m.split(":")[0] for m in services[name].get("volumes", []) if m.startswith("./")}
        for name in ("prometheus", "grafana")
    }
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == "./containers/prometheus/prometheus.yml"
    assert mounts["prometheus"]["/etc/prometheus/alerts.yml"] == "./containers/prometheus/alerts.yml"
    assert mounts["grafana"]["/etc/grafana/provisioning"] == "./containers/grafana/provisioning"
    assert mounts["grafana"]["/var/lib/grafana/dashboards"] == "./containers/grafana/dashboards"
    for name in ("marie", "anga", "fabien", "orchestrator"):
        assert name in services
