"""Observability end to end: a real worker tree scraped over HTTP, and a real Prometheus server.

The Prometheus test loads the repo's own prometheus.yml (targets rewritten to this machine) and
alerts.yml, and checks every PromQL expression of the dashboard and the alert rules against it.
Prometheus comes from Debian's package (make test installs it); without it that test skips.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from activation.spool.layout import Spool
from tests.conftest import wait_for
from tests.harness import BIN, ROOT, RedisServer, WorkerTree, free_port

PROMETHEUS_DIR = ROOT / "containers" / "prometheus"
DASHBOARD = ROOT / "containers" / "grafana" / "dashboards" / "activation.json"
SEED_PANELS = ("Average queue size per worker", "P95 activation latency", "Tasks completed per minute", "Worker health")
# What Grafana puts in place of its variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "1h", "$worker": ".*"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_WORDS |= {"offset", "inf", "nan", "atan2"}
NO_YAML = "PyYAML is not installed (a dev dependency: pip install -e .[dev])"


def load_yaml(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason=NO_YAML)
    return yaml.safe_load(path.read_text())


def dump_yaml(data: Any) -> str:
    yaml = pytest.importorskip("yaml", reason=NO_YAML)
    return str(yaml.safe_dump(data))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- scraping the worker ---------------------------------------------------------------------


def scrape(port: int) -> Samples | None:
    """The heartbeat's /metrics as {(sample, labels): value}; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} is served twice"
            samples[key] = sample.value
    return samples


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def matching(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def metrics_port(tree: WorkerTree) -> int:
    return int(tree.env["ACTIVATION_METRICS_PORT"])


def scrape_until(tree: WorkerTree, ready: Callable[[Samples], bool], what: str, timeout: float = 60) -> Samples:
    port = metrics_port(tree)
    last: list[Samples | None] = [None]

    def check() -> Samples | None:
        samples = last[0] = scrape(port)
        return samples if samples is not None and ready(samples) else None

    return dict(wait_for(check, timeout, 0.2, lambda: f"{what}; last scrape: {last[0]}\n{tree.log_tail()}"))


def write_bad_task(tree: WorkerTree, name: str) -> None:
    """A task file that is not JSON, written atomically: the listener dead-letters it."""
    inbox = tree.spool.inbox(tree.worker)
    temp = inbox / f".tmp_{name}"
    temp.write_text("{not json")
    os.rename(temp, inbox / name)


def test_a_real_tree_serves_the_right_counters_and_histograms(make_tree):
    tree: WorkerTree = make_tree(ACTIVATION_LOG_FORMAT="json")
    # Files written before the start rescan has listed the inbox are taken by it; those written
    # after it can only be woken by inotify, which the listener_events_total check below needs.
    wait_for(lambda: "rescanned the inbox (start)" in tree.log.read_text(), 30, 0.05, "the start rescan")
    for i in range(3):
        tree.write_task(f"ok-{i}", "hello")
    tree.write_task("fail-1", "exit=3")
    tree.write_task("slow-1", "ignore-term sleep=60", timeout=1)
    write_bad_task(tree, "bad-1.json")
    for task_id in ("ok-0", "ok-1", "ok-2", "fail-1", "slow-1"):
        tree.wait_result(task_id, 60)
    wait_for(lambda: tree.dead_letter("bad-1"), 30, 0.1, "dead letter of bad-1")

    def settled(s: Samples) -> bool:
        done = sum(matching(s, "tasks_completed_total").values())
        return (
            done == 5 and get(s, "task_queue_size", worker="w1") == 0 and bool(matching(s, "tasks_dead_lettered_total"))
        )

    samples = scrape_until(tree, settled, "5 results, an empty queue and a dead letter in /metrics")
    assert get(samples, "tasks_completed_total", worker="w1", status="completed") == 3
    assert get(samples, "tasks_completed_total", worker="w1", status="failed") == 1
    assert get(samples, "tasks_completed_total", worker="w1", status="timeout") == 1
    assert get(samples, "agent_timeouts_total") == 1
    assert get(samples, "tasks_dead_lettered_total", worker="w1", reason="invalid_json") == 1
    assert get(samples, "worker_up") == 1
    assert get(samples, "inotify_overflows_total") == 0
    assert get(samples, "redis_connected") is None  # this worker has no Redis: no series, no false alert
    assert (get(samples, "listener_events_total", source="inotify") or 0) >= 1

    # The duration histogram: counts by status, a sum in seconds, cumulative buckets.
    for status, count in (("completed", 3), ("failed", 1), ("timeout", 1)):
        labels = {"worker": "w1", "status": status}
        assert get(samples, "task_processing_seconds_count", **labels) == count
        assert get(samples, "task_processing_seconds_bucket", le="+Inf", **labels) == count
    timeout_sum = get(samples, "task_processing_seconds_sum", worker="w1", status="timeout")
    assert timeout_sum is not None and 1 <= timeout_sum < 30  # killed at its 1 s timeout, in seconds
    assert get(samples, "task_processing_seconds_bucket", worker="w1", status="timeout", le="0.5") == 0
    completed_sum = get(samples, "task_processing_seconds_sum", worker="w1", status="completed")
    assert completed_sum is not None and 0 < completed_sum < 30

    # Activation latency: one observation per task that ran, labelled by the source that woke it.
    latency = matching(samples, "activation_latency_seconds_count")
    assert sum(latency.values()) == 5
    assert {dict(labels)["source"] for labels in latency} <= {"inotify", "rescan"}
    for labels in latency:
        source = dict(labels)["source"]
        buckets = [
            (float(dict(key)["le"]), value)
            for key, value in matching(samples, "activation_latency_seconds_bucket").items()
            if dict(key)["source"] == source
        ]
        counts = [value for _, value in sorted(buckets)]
        assert counts == sorted(counts), "buckets are cumulative"
        assert counts[-1] == latency[labels]

    # Results and metrics agree.
    results = [tree.result(t) for t in ("ok-0", "ok-1", "ok-2", "fail-1", "slow-1")]
    assert sorted(r["status"] for r in results if r) == ["completed", "completed", "completed", "failed", "timeout"]

    # ACTIVATION_LOG_FORMAT=json: every line from the programs is one JSON object with its fields.
    entries = [json.loads(line) for line in tree.log.read_text().splitlines() if line.startswith("{")]
    assert entries and all(entry["worker"] == "w1" for entry in entries)
    finished = [e for e in entries if e.get("event") == "task_finished"]
    assert {e["task_id"] for e in finished} == {"ok-0", "ok-1", "ok-2", "fail-1", "slow-1"}
    assert any(e.get("event") == "dead_letter" and e.get("task_id") == "bad-1" for e in entries)


def recorded_pids(tree: WorkerTree) -> dict[str, int]:
    """{program: the pid its metrics file names}: the process whose gauges that file may serve."""
    return {path.stem: json.loads(path.read_text())["pid"] for path in (tree.run_dir / "metrics").glob("*.json")}


def live_gauge_pids(tree: WorkerTree) -> set[int]:
    return set(recorded_pids(tree).values())


def test_sigkilled_programs_leave_no_stale_or_doubled_gauges(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("blocker", "sleep=20")  # long enough to outlast the restarts below
    wait_for(lambda: tree.spool.claim_path("w1", "blocker").exists(), 30, what="the blocker's claim")
    for i in range(3):
        tree.write_task(f"waiting-{i}", "x")
    scrape_until(tree, lambda s: get(s, "task_queue_size", worker="w1") == 3, "queue size 3")

    # The heartbeat owns the gauges: SIGKILL it, and its restart must not add to them.
    old_heartbeat = tree.kill("heartbeat")
    tree.wait_restarted("heartbeat", old_heartbeat)
    samples = scrape_until(tree, lambda s: get(s, "worker_up") == 1, "the restarted heartbeat serving")
    assert list(matching(samples, "task_queue_size").values()) == [3]
    assert list(matching(samples, "worker_up").values()) == [1]
    # Its file names the new process once it has written (a moment after its first change).
    wait_for(lambda: old_heartbeat not in live_gauge_pids(tree), 10, 0.05, "the new heartbeat's metrics file")

    old_listener = tree.kill("listener")
    tree.wait_restarted("listener", old_listener)
    # Once the blocker is done the queue drains: a dead heartbeat's "3" must not linger.
    for task_id in ("blocker", "waiting-0", "waiting-1", "waiting-2"):
        tree.wait_result(task_id, 90)
    # The executor writes its samples a moment after its last change (observability/samples.py):
    # wait for its count too, not only for the heartbeat's queue size.
    samples = scrape_until(
        tree,
        lambda s: (
            get(s, "task_queue_size", worker="w1") == 0
            and get(s, "tasks_completed_total", worker="w1", status="completed") == 4
        ),
        "queue size back to 0 and 4 completed",
    )
    assert get(samples, "worker_up") == 1
    assert not {old_heartbeat, old_listener} & live_gauge_pids(tree)
    assert all(psutil.pid_exists(pid) for pid in live_gauge_pids(tree))

    # Counters survive their program: the dead executor's counts stay in the sum, counted once.
    old_executor = tree.kill("executor")
    tree.wait_restarted("executor", old_executor)
    tree.write_task("after", "x")
    tree.wait_result("after", 60)
    # The executor counts the task, then observes its latency: two writes, so wait for both.
    samples = scrape_until(
        tree,
        lambda s: (
            get(s, "tasks_completed_total", worker="w1", status="completed") == 5
            and sum(matching(s, "activation_latency_seconds_count").values()) >= 5
        ),
        "5 completed after the executor's restart",
    )
    assert sum(matching(samples, "activation_latency_seconds_count").values()) == 5
    assert old_executor not in live_gauge_pids(tree)


# -- a real Prometheus -----------------------------------------------------------------------


class PrometheusServer:
    """Debian's prometheus on a free loopback port, with tmp storage and a 1 s scrape interval."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        self.port = free_port()
        self.config_path = folder / "prometheus.yml"
        self.config_path.write_text(dump_yaml(config))
        self.log = folder / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        binary = shutil.which("prometheus")
        assert binary is not None
        argv = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, 0.2, lambda: f"prometheus ready; log:\n{self.log.read_text()}")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"prometheus exited {self.process.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def api(self, path: str, **params: str) -> tuple[int, dict[str, Any]]:
        """GET /api/v1/<path>: the HTTP status and the decoded body (also for errors)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = self.api("query", query=expr)
        assert status == 200 and body.get("status") == "success", f"{expr!r}: {status} {body}"
        return list(body["data"]["result"])

    def names(self) -> set[str]:
        status, body = self.api("label/__name__/values")
        assert status == 200, body
        return set(body["data"])


def prometheus_config(worker_targets: dict[str, int], orchestrator_port: int) -> dict[str, Any]:
    """The repo's prometheus.yml, scraping this machine every second instead of the compose services."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / path) for path in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"activation-workers", "activation-orchestrator"}
    jobs["activation-workers"]["static_configs"] = [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"worker": worker}} for worker, port in worker_targets.items()
    ]
    jobs["activation-orchestrator"]["static_configs"] = [{"targets": [f"127.0.0.1:{orchestrator_port}"]}]
    return config


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], PrometheusServer]]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (make test installs Debian's prometheus package)")
    servers: list[PrometheusServer] = []

    def start(config: dict[str, Any]) -> PrometheusServer:
        folder = tmp_path / f"prometheus-{len(servers)}"
        folder.mkdir()
        server = PrometheusServer(folder, config)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


class OrchestratorProcess:
    """``activation orchestrator`` on the tree's spool, its admin API (and /metrics) on a free port."""

    def __init__(self, spool: Spool, folder: Path, **env: str) -> None:
        self.port = free_port()
        self.run_dir = Path(tempfile.mkdtemp(prefix="acto-"))
        self.log = folder / "orchestrator.log"
        strip = ("ACTIVATION_", "ORCHESTRATOR_", "REDIS_", "WORKER_NAME", "PROMETHEUS_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(strip)}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            ACTIVATION_SPOOL=str(spool.root),
            ACTIVATION_RUN_DIR=str(self.run_dir),
            ACTIVATION_ADMIN_BIND=f"127.0.0.1:{self.port}",
            PYTHONUNBUFFERED="1",
            **env,
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OrchestratorProcess:
        with open(self.log, "wb") as out:
            argv = [str(BIN / "activation"), "orchestrator"]
            self.process = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._answers, 60, 0.1, lambda: f"the orchestrator's API; log:\n{self.log.read_text()}")
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/config", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def dispatch(self, description: str, **fields: Any) -> str:
        body = json.dumps({"worker": "w1", "description": description, **fields}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/tasks", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
            return str(json.loads(response.read())["task_id"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[Callable[..., OrchestratorProcess]]:
    started: list[OrchestratorProcess] = []

    def start(spool: Spool, **env: str) -> OrchestratorProcess:
        process = OrchestratorProcess(spool, tmp_path, **env)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def dashboard_queries() -> dict[str, list[str]]:
    """{panel title: its PromQL expressions}, Grafana's variables left in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"] if p["type"] != "row"}
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), *\w+\)", variable["definition"])
        assert match, variable["definition"]
        queries[f"variable {variable['name']}"] = [match.group(1)]
    return queries


def alert_queries() -> dict[str, str]:
    rules = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def grafana_substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and durations left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", expr):
        word = match.group()
        if word.lower() in PROMQL_WORDS or expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def test_metric_names_reads_promql():
    expr = (
        'histogram_quantile(0.95, sum by (worker, le) (rate(a_bucket{worker=~".*", le!="1e3"}[5m]))) > 2 '
        "unless on (worker) max by (worker) (max_over_time(b[10m] offset 1h)) > 0 or c:rule * 60"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c:rule"}
    assert metric_names('up{job="x"} == 0') == {"up"}


def redis_wake_source() -> bool:
    from activation.worker.wake import SOURCE_FACTORIES

    return "redis" in SOURCE_FACTORIES and shutil.which("redis-server") is not None


def test_prometheus_parses_every_expression_and_finds_every_series(make_tree, prometheus, orchestrator, tmp_path):
    redis: RedisServer | None = RedisServer(tmp_path / "redis").start() if redis_wake_source() else None
    try:
        check_every_expression(make_tree, prometheus, orchestrator, redis)
    finally:
        if redis is not None:
            redis.stop()


def check_every_expression(make_tree, prometheus, orchestrator, redis: RedisServer | None) -> None:
    env = {"ACTIVATION_MODE": "inotify,redis", "REDIS_URL": redis.url} if redis else {}
    tree: WorkerTree = make_tree(**env)
    orch = orchestrator(tree.spool, ORCHESTRATOR_MODE="auto", **({"REDIS_URL": redis.url} if redis else {}))
    server = prometheus(prometheus_config({"w1": metrics_port(tree)}, orch.port))

    def both_targets_up() -> bool:
        up = {r["metric"]["job"]: r["value"][1] for r in server.query("up")}
        return up == {"activation-workers": "1", "activation-orchestrator": "1"}

    wait_for(both_targets_up, 60, 0.5, lambda: f"both targets up: {server.api('targets')}")

    # Tasks after the first scrapes, so that rate() sees them happen; and in two waves, so that
    # the latency histogram, whose series appear with the first task, grows after its first scrape.
    ids = [orch.dispatch("hello")]
    tree.wait_result(ids[0], 60)
    wait_for(lambda: server.query("activation_latency_seconds_count"), 60, 0.5, "the first task scraped")
    ids += [orch.dispatch("hello") for _ in range(2)] + [orch.dispatch("exit=3")]
    write_bad_task(tree, "bad-1.json")
    ids.append(orch.dispatch("ignore-term sleep=60", timeout=1))
    for task_id in ids:
        tree.wait_result(task_id, 60)

    def caught_up() -> bool:
        done = server.query('sum(tasks_completed_total{job="activation-workers"})')
        ages = server.query("worker_heartbeat_age_seconds")
        dead = server.query("tasks_dead_lettered_total")
        return bool(done) and float(done[0]["value"][1]) == 5 and bool(ages) and bool(dead)

    wait_for(caught_up, 60, 0.5, "Prometheus to see the 5 results, a heartbeat age and the dead letter")

    exported = server.names()
    # Redis-only series exist only on a worker that uses Redis (refusals only after a bad message).
    redis_only = {"listener_refused_total"} if redis else {"redis_connected", "listener_refused_total"}
    if redis:
        assert [r["value"][1] for r in server.query("redis_connected")] == ["1"]
    expressions = {f"alert {name}": [expr] for name, expr in alert_queries().items()}
    expressions.update({f"panel {title}": exprs for title, exprs in dashboard_queries().items()})
    unknown: dict[str, set[str]] = {}
    for where, exprs in expressions.items():
        for expr in exprs:
            promql = grafana_substitute(expr)
            status, body = server.api("query", query=promql)
            assert status == 200 and body["status"] == "success", f"{where}: {promql!r} does not parse: {body}"
            missing = metric_names(promql) - exported - redis_only
            if missing:
                unknown[where] = missing
    assert not unknown, f"expressions name series nobody exports: {unknown}"
    named = set().union(*(metric_names(grafana_substitute(e)) for exprs in expressions.values() for e in exprs))
    assert {"task_queue_size", "dispatch_total", "orchestrator_mode", "worker_heartbeat_age_seconds"} <= named

    # The seed's four panels show data, and numbers.
    panels = dashboard_queries()
    for title in SEED_PANELS:
        for expr in panels[title]:
            result = server.query(grafana_substitute(expr))
            assert result, f"panel {title!r}: {expr!r} returns nothing"
            assert any(math.isfinite(float(r["value"][1])) for r in result), f"panel {title!r}: {result}"
    latency = server.query(grafana_substitute(panels["P95 activation latency"][0]))
    assert 0 <= float(latency[0]["value"][1]) < 30
    health = server.query(grafana_substitute(panels["Worker health"][0]))
    assert [(r["metric"]["worker"], r["value"][1]) for r in health] == [("w1", "1")]

    # Every alert rule evaluates without error; the new dead letter fires its alert, the rest are quiet.
    def evaluated() -> list[dict[str, Any]] | None:
        _, body = server.api("rules")
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules) else None

    rules = wait_for(evaluated, 30, 0.5, "every rule evaluated")
    assert {rule["name"] for rule in rules} == set(alert_queries())
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]

    def firing() -> set[str]:
        _, body = server.api("alerts")
        return {a["labels"]["alertname"] for a in body["data"]["alerts"] if a["state"] == "firing"}

    wait_for(lambda: "DeadLettersRising" in firing(), 30, 0.5, "DeadLettersRising to fire")
    assert not firing() & {"WorkerDown", "WorkerHeartbeatStale", "OrchestratorDown", "RedisDisconnected"}


def test_prometheus_sees_a_worker_go_down(make_tree, prometheus, orchestrator):
    """up == 0 once the heartbeat, which serves the metrics, is gone: the WorkerDown condition."""
    tree: WorkerTree = make_tree()
    orch = orchestrator(tree.spool)
    server = prometheus(prometheus_config({"w1": metrics_port(tree)}, orch.port))
    wait_for(lambda: server.query('up{job="activation-workers"} == 1'), 60, 0.5, "the worker scraped")
    tree.ctl("stop", "heartbeat")
    wait_for(lambda: server.query(alert_queries()["WorkerDown"]), 60, 0.5, "the WorkerDown condition")
    result = server.query(alert_queries()["WorkerDown"])
    assert [r["metric"]["worker"] for r in result] == ["w1"]
    # ...and the orchestrator sees the heartbeat file age.
    wait_for(lambda: server.query('worker_heartbeat_age_seconds{worker="w1"} > 1'), 60, 0.5, "a growing heartbeat age")
