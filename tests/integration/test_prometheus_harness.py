"""A real Prometheus on loopback (tests/integration/prom.py): the harness, the deploy config, the dashboard.

Stand-ins replace the coordinator and an agent: a tiny HTTP server with the coordinator's
/metrics and /sd, and a prometheus_client server with an agent's metrics, all named from
edgetrain/metric_names.py. Two Prometheus servers scrape them: one with a config written by the
harness, one with deploy/prometheus/prometheus.yml itself. Both start before any test waits, so
their first scrapes (Prometheus batches discovery updates for 5 s) overlap.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgetrain import metric_names as m
from tests.integration.prom import (
    AGENTS_JOB,
    COORDINATOR_JOB,
    Prometheus,
    PromQLError,
    dashboard_queries,
    prometheus_factory,  # noqa: F401 (a fixture: importing it is how a module gets it)
    promtool,
)

NODE = "agent-x"
STATIC_JOB = "static"
SAMPLES_SET = 42  # what the test puts in the agent's samples counter


def agent_registry() -> tuple[CollectorRegistry, Counter]:
    """An agent's metrics; no node label except on the info metric (Prometheus adds it from /sd)."""
    reg = CollectorRegistry()
    Info(m.AGENT_INFO, "The agent", registry=reg).info({m.NODE: NODE, "cores": "0-1", "device": "cpu", "workers": "1"})
    Histogram(m.STEP_SECONDS, "One optimizer step", registry=reg).observe(0.05)
    samples = Counter(m.AGENT_SAMPLES, "Samples trained", registry=reg)
    samples.inc(SAMPLES_SET)
    cpu = Gauge(m.CORE_CPU, "Busy fraction per pinned core", [m.CORE], registry=reg)
    cpu.labels("0").set(0.9)
    cpu.labels("1").set(0.8)
    Gauge(m.AGENT_MEMORY, "RSS of the agent and its workers", registry=reg).set(123e6)
    Counter(m.AGENT_ROUNDS, "Rounds trained", registry=reg).inc(3)
    return reg, samples


def coordinator_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    for name, value in [
        (m.ROUND, 3),
        (m.GLOBAL_ACCURACY, 0.8),
        (m.GLOBAL_LOSS, 0.5),
        (m.GLOBAL_MACRO_F1, 0.7),
        (m.AGENTS_CONNECTED, 1),
        (m.TRAINING_SECONDS, 12),
    ]:
        Gauge(name, name, registry=reg).set(value)
    Histogram(m.ROUND_DURATION, "Round duration", registry=reg).observe(2.0)
    Counter(m.ROUNDS_SHORT, "Rounds closed short", registry=reg)
    for name, value in [
        (m.NODE_COMPUTE, 1.5),
        (m.NODE_COMMUNICATION, 0.3),
        (m.NODE_THROUGHPUT, 900),
        (m.NODE_LOSS, 0.6),
        (m.NODE_ACCURACY, 0.75),
    ]:
        Gauge(name, name, [m.NODE], registry=reg).labels(NODE).set(value)
    Histogram(m.NODE_COMPUTE_HIST, "Compute per round", [m.NODE], registry=reg).labels(NODE).observe(1.5)
    for name, value in [
        (m.NODE_SAMPLES, 1000),
        (m.UPDATES_ACCEPTED, 3),
        (m.NODE_RECEIVED_BYTES, 4e6),
        (m.NODE_SENT_BYTES, 4e6),
    ]:
        Counter(name, name, [m.NODE], registry=reg).labels(NODE).inc(value)
    refused = Counter(m.UPDATES_REFUSED, "Refused updates", [m.NODE, m.REASON], registry=reg)
    for reason in m.REFUSAL_REASONS:  # initialised at 0, as a coordinator should
        refused.labels(NODE, reason)
    return reg


def coordinator_handler(registry: CollectorRegistry, sd: list[dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/metrics":
                body, ctype = generate_latest(registry), CONTENT_TYPE_LATEST
            elif self.path == "/sd":
                body, ctype = json.dumps(sd).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base class' name)
            pass

    return Handler


@dataclass
class Stack:
    agent: str  # host:port of the agent's /metrics
    coordinator: str  # host:port of the coordinator's /metrics and /sd
    samples: Counter
    agent_registry: CollectorRegistry
    coordinator_registry: CollectorRegistry
    plain: Prometheus  # render_config(): static agent target (job "static") + http_sd
    deploy: Prometheus  # deploy/prometheus/prometheus.yml aimed at the coordinator


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    areg, samples = agent_registry()
    agent_server, agent_thread = start_http_server(0, addr="127.0.0.1", registry=areg)
    agent = f"127.0.0.1:{agent_server.server_port}"
    creg = coordinator_registry()
    sd = [{"targets": [agent], "labels": {m.NODE: NODE}}]
    coord_server = ThreadingHTTPServer(("127.0.0.1", 0), coordinator_handler(creg, sd))
    coord_server.daemon_threads = True
    coord_thread = threading.Thread(target=coord_server.serve_forever, name="fake-coordinator", daemon=True)
    coord_thread.start()
    coordinator = f"127.0.0.1:{coord_server.server_address[1]}"
    plain = Prometheus.for_targets([agent], http_sd_url=f"http://{coordinator}/sd", static_job=STATIC_JOB)
    deploy = Prometheus.for_deploy(coordinator)
    try:
        plain.start()
        deploy.start()
        yield Stack(agent, coordinator, samples, areg, creg, plain, deploy)
    finally:
        plain.stop()
        deploy.stop()
        for server, thread in ((agent_server, agent_thread), (coord_server, coord_thread)):
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


def value_is(expected: float) -> Any:
    return lambda results: float(results[0]["value"][1]) == expected


# ---- the harness


def test_counter_value_reaches_prometheus(stack: Stack) -> None:
    query = f'{m.AGENT_SAMPLES}{{job="{STATIC_JOB}"}}'
    results = stack.plain.wait_for(query, timeout=30)
    assert len(results) == 1
    assert float(results[0]["value"][1]) == SAMPLES_SET
    assert results[0]["metric"]["instance"] == stack.agent
    stack.samples.inc(8)  # and a later value, scraped again
    stack.plain.wait_for(query, timeout=15, predicate=value_is(SAMPLES_SET + 8))


def test_http_sd_targets_get_the_sd_labels(stack: Stack) -> None:
    results = stack.plain.wait_for(f'{m.AGENT_MEMORY}{{job="{AGENTS_JOB}"}}', timeout=30)
    assert [r["metric"][m.NODE] for r in results] == [NODE]
    assert float(results[0]["value"][1]) == 123e6


def test_query_errors_and_scalars(stack: Stack) -> None:
    with pytest.raises(PromQLError, match="parse error"):
        stack.plain.query("rate(x[")
    assert stack.plain.value("1 + 1") == 2.0
    assert stack.plain.query(f'{m.AGENT_SAMPLES}{{job="no-such-job"}}') == []


def test_promtool_check_metrics_accepts_the_expositions(stack: Stack) -> None:
    for registry in (stack.agent_registry, stack.coordinator_registry):
        text = generate_latest(registry).decode()
        proc = promtool("check", "metrics", stdin=text)
        assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    # ...and the check does bite: a counter without _total is reported.
    bad = promtool("check", "metrics", stdin="# HELP bad_count x\n# TYPE bad_count counter\nbad_count 1\n")
    assert bad.returncode != 0 and "_total" in bad.stdout + bad.stderr


def test_start_failure_reports_the_log_and_leaves_no_process() -> None:
    prom = Prometheus("global: {scrape_interval: notaduration}\n")
    with pytest.raises(RuntimeError, match="did not become ready") as excinfo:
        prom.start()
    assert "notaduration" in str(excinfo.value)  # the log says what was wrong
    assert prom.process is None


def test_stop_terminates_the_process() -> None:
    with Prometheus.for_targets() as prom:
        proc = prom.process
        assert proc is not None and proc.poll() is None
        assert prom.value("vector(3)") == 3.0
    assert proc.poll() is not None
    assert prom.process is None


def test_factory_fixture_starts_servers(prometheus_factory: Any) -> None:  # noqa: F811
    plain = prometheus_factory(static_targets=["127.0.0.1:9"])
    deploy = prometheus_factory(coordinator="127.0.0.1:9")
    assert plain.port != deploy.port
    assert plain.value("vector(1)") == deploy.value("vector(1)") == 1.0


# ---- the deploy config and the dashboard


def test_deploy_config_scrapes_coordinator_and_discovers_agents(stack: Stack) -> None:
    up = stack.deploy.wait_for_targets(2, timeout=30)
    assert {t["labels"]["job"] for t in up} == {COORDINATOR_JOB, AGENTS_JOB}
    accuracy = stack.deploy.wait_for(f'{m.GLOBAL_ACCURACY}{{job="{COORDINATOR_JOB}"}}', timeout=15)
    assert float(accuracy[0]["value"][1]) == 0.8
    (info,) = stack.deploy.wait_for(f'{m.AGENT_INFO}_info{{job="{AGENTS_JOB}"}}', timeout=15)
    # honor_labels: the agent's own node label stays `node`, not `exported_node`.
    assert info["metric"][m.NODE] == NODE
    assert "exported_node" not in info["metric"]
    (memory,) = stack.deploy.wait_for(f'{m.AGENT_MEMORY}{{job="{AGENTS_JOB}"}}', timeout=15)
    assert memory["metric"][m.NODE] == NODE  # from /sd


def test_dashboard_queries_are_all_substituted() -> None:
    queries = list(dashboard_queries())
    assert queries[0].title == "variable $node"
    assert all("$" not in q.expr for q in queries)
    assert len({q.title for q in queries}) > 20


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    """Each panel's PromQL, as Grafana would send it with node=All, finds the stand-ins' series."""
    stack.deploy.wait_for_targets(2, timeout=30)
    # 10 s of rate window = several 1 s scrapes; wait for the counters to have two samples in it.
    stack.deploy.wait_for(f"rate({m.NODE_SAMPLES}[10s])", timeout=15)
    empty = [
        q
        for q in dashboard_queries(rate_interval="10s")
        if not stack.deploy.wait_for(q.expr, timeout=5, fail=False)  # PromQLError propagates
    ]
    assert not empty, "queries with no data:\n" + "\n".join(f"{q.title}: {q.expr}" for q in empty)
    # The template variable sees the node through both the coordinator's and the agent's series.
    nodes = stack.deploy.query(next(dashboard_queries()).expr)
    assert [r["metric"][m.NODE] for r in nodes] == [NODE]
