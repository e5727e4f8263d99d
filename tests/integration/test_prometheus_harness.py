"""A real Prometheus on loopback (tests/integration/prom.py): the harness, the deploy config, the dashboard.

The metrics are the product's own: a Coordinator's (constructed, not started: its registry, membership and
/sd) and an AgentMetrics, filled through their methods (accepted_update, refused_update,
round_done, a membership removal that calls node_left) and the gauges the coordinator's driver sets, each
served by an edgetrain.httpmetrics.MetricsServer as coordinator/run.py and agent/runner.py serve them. Two
Prometheus servers scrape them: one with a config written by the harness, one with
deploy/prometheus/prometheus.yml itself. Both start before any test waits, so their first scrapes
(Prometheus batches discovery updates for 5 s) overlap. The values asserted are what the method calls add up
to, so a metrics method that records the wrong thing fails here.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from edgetrain.agent.metrics import AgentMetrics
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.metrics import CoordinatorMetrics
from edgetrain.coordinator.run import Coordinator
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edgetrain import metric_names as m
from edgetrain.cores import format_cores
from edgetrain.httpmetrics import MetricsServer
from edgetrain.records import NodeStats
from tests.integration.prom import (
    AGENTS_JOB,
    COORDINATOR_JOB,
    Prometheus,
    PromQLError,
    dashboard_queries,
    prometheus_factory,  # noqa: F401 (a fixture: importing it is how a module gets it)
    promtool,
)

NODE = "agent-x"  # serves its /metrics, listed in /sd
GONE = "agent-gone"  # serves no /metrics, sent one update; test_node_left_* makes it leave
STATIC_JOB = "static"
CORES = [0]
# What the agent's rounds recorded (round_done): samples and step times of each.
AGENT_ROUNDS = [(64, [0.05, 0.07]), (64, [0.06])]
UPDATE_SAMPLES, UPDATE_BYTES = 64, 1000  # each of NODE's two accepted updates
REPORT = NodeStats(samples=UPDATE_SAMPLES, compute_seconds=1.5, communication_seconds=0.25, loss=0.625,
                   accuracy=0.75, samples_per_second=900.0, bytes=UPDATE_BYTES)
GONE_SAMPLES, GONE_BYTES = 32, 500
GONE_REPORT = NodeStats(samples=GONE_SAMPLES, compute_seconds=0.5, communication_seconds=0.125, loss=1.25,
                        accuracy=0.5, samples_per_second=300.0, bytes=GONE_BYTES)
SENT_BYTES = 4000  # weights handed to NODE (the servicer counts them on bytes_out)
ROUND, ROUND_SECONDS, ACCURACY, LOSS, MACRO_F1, ELAPSED = 3, 2.0, 0.8, 0.5, 0.7, 12.0
# Gauges the coordinator keeps per node until node_left, and its per-node counters (and histogram) that stay.
NODE_GAUGES = (m.NODE_COMPUTE, m.NODE_COMMUNICATION, m.NODE_THROUGHPUT, m.NODE_LOSS, m.NODE_ACCURACY)
NODE_COUNTERS = (m.NODE_SAMPLES, m.UPDATES_ACCEPTED, m.NODE_RECEIVED_BYTES, m.UPDATES_REFUSED,
                 f"{m.NODE_COMPUTE_HIST}_count")


def fill_agent(metrics: AgentMetrics) -> None:
    for samples, steps in AGENT_ROUNDS:
        metrics.round_done(samples, steps)


def fill_coordinator(metrics: CoordinatorMetrics) -> None:
    """What a run records: two nodes admitted, updates accepted and refused, a round closed (coordinator/run.py)."""
    for _ in range(2):
        metrics.accepted_update(NODE, REPORT)
    metrics.accepted_update(GONE, GONE_REPORT)
    metrics.bytes_out.labels(NODE).inc(SENT_BYTES)  # as the servicer counts a download
    metrics.refused_update(NODE, "stale_round")
    metrics.refused_update(NODE, "no-such-reason")  # counted as malformed: the label set stays bounded
    metrics.refused_update(m.UNKNOWN_NODE, "unauthenticated")  # as the token interceptor counts
    metrics.rounds_short.inc()
    metrics.round.set(ROUND)
    metrics.round_duration.observe(ROUND_SECONDS)
    metrics.accuracy.set(ACCURACY)
    metrics.loss.set(LOSS)
    metrics.macro_f1.set(MACRO_F1)
    metrics.metric.labels("macro-f1").set(MACRO_F1)  # the run's --metric, under its name
    metrics.elapsed.set(ELAPSED)


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET http://address/metrics as Prometheus does: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def of_node(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], node: str) -> dict[str, float]:
    """{sample name (with the reason, if any): value} of one node's series."""
    out = {}
    for (name, labels), value in samples.items():
        d = dict(labels)
        if d.get(m.NODE) == node:
            out[f"{name}{{{d[m.REASON]}}}" if m.REASON in d else name] = value
    return out


@dataclass
class Stack:
    agent: str  # host:port of the agent's /metrics
    coordinator: str  # host:port of the coordinator's /metrics and /sd
    agent_metrics: AgentMetrics
    run: Coordinator  # constructed only: its metrics, membership and /sd
    gone_id: str  # GONE's agent id in run.membership
    plain: Prometheus  # render_config(): static agent target (job "static") + http_sd
    deploy: Prometheus  # deploy/prometheus/prometheus.yml aimed at the coordinator


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    agent_metrics = AgentMetrics(CollectorRegistry(), name=NODE, cores=CORES, device="cpu", workers=1)
    fill_agent(agent_metrics)
    agent_server = MetricsServer(agent_metrics.registry, "127.0.0.1", 0)
    run = Coordinator(CoordinatorConfig(rounds=1))
    run.membership.admit(NODE, metrics_address=agent_server.address)  # as the servicer's Join admits them
    gone, _ = run.membership.admit(GONE)
    fill_coordinator(run.metrics)
    # As Coordinator._start serves them: the registry at /metrics, the agents that serve metrics at /sd.
    coord_server = MetricsServer(run.registry, "127.0.0.1", 0, json_routes={"/sd": run.service_discovery})
    plain = Prometheus.for_targets([agent_server.address], http_sd_url=f"http://{coord_server.address}/sd",
                                   static_job=STATIC_JOB)
    deploy = Prometheus.for_deploy(coord_server.address)
    try:
        plain.start()
        deploy.start()
        yield Stack(agent_server.address, coord_server.address, agent_metrics, run, gone.agent_id, plain, deploy)
    finally:
        plain.stop()
        deploy.stop()
        agent_server.close()
        coord_server.close()


def value_is(expected: float) -> Any:
    return lambda results: float(results[0]["value"][1]) == expected


def only(prom: Prometheus, promql: str, timeout: float = 15) -> float:
    (result,) = prom.wait_for(promql, timeout=timeout)
    return float(result["value"][1])


# ---- the harness


def test_counter_value_reaches_prometheus(stack: Stack) -> None:
    query = f'{m.AGENT_SAMPLES}{{job="{STATIC_JOB}"}}'
    results = stack.plain.wait_for(query, timeout=30)
    assert len(results) == 1
    recorded = sum(samples for samples, _ in AGENT_ROUNDS)  # 128
    assert float(results[0]["value"][1]) == recorded
    assert results[0]["metric"]["instance"] == stack.agent
    stack.agent_metrics.round_done(8, [0.01])  # and a later round, scraped again
    stack.plain.wait_for(query, timeout=15, predicate=value_is(recorded + 8))
    rounds = f'{m.AGENT_ROUNDS}{{job="{STATIC_JOB}"}}'
    stack.plain.wait_for(rounds, timeout=15, predicate=value_is(len(AGENT_ROUNDS) + 1))
    steps = sum(len(times) for _, times in AGENT_ROUNDS) + 1
    stack.plain.wait_for(f'{m.STEP_SECONDS}_count{{job="{STATIC_JOB}"}}', timeout=15, predicate=value_is(steps))


def test_http_sd_targets_get_the_sd_labels(stack: Stack) -> None:
    results = stack.plain.wait_for(f'{m.AGENT_MEMORY}{{job="{AGENTS_JOB}"}}', timeout=30)
    assert [r["metric"][m.NODE] for r in results] == [NODE]  # GONE serves no /metrics: not in /sd
    assert results[0]["metric"]["instance"] == stack.agent
    assert float(results[0]["value"][1]) > 1e6  # this process's RSS, read at scrape time
    cpu = stack.plain.wait_for(f'{m.CORE_CPU}{{job="{AGENTS_JOB}"}}', timeout=15)
    assert [(r["metric"][m.CORE], r["metric"][m.NODE]) for r in cpu] == [(str(c), NODE) for c in CORES]
    assert all(0 <= float(r["value"][1]) <= 1 for r in cpu)


def test_query_errors_and_scalars(stack: Stack) -> None:
    with pytest.raises(PromQLError, match="parse error"):
        stack.plain.query("rate(x[")
    assert stack.plain.value("1 + 1") == 2.0
    assert stack.plain.query(f'{m.AGENT_SAMPLES}{{job="no-such-job"}}') == []


def test_promtool_check_metrics_accepts_the_expositions(stack: Stack) -> None:
    for address in (stack.agent, stack.coordinator):
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
            text = r.read().decode()
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
    assert only(stack.deploy, f'{m.GLOBAL_ACCURACY}{{job="{COORDINATOR_JOB}"}}') == ACCURACY
    (info,) = stack.deploy.wait_for(f'{m.AGENT_INFO}_info{{job="{AGENTS_JOB}"}}', timeout=15)
    # honor_labels: the agent's own node label stays `node`, not `exported_node`.
    assert info["metric"][m.NODE] == NODE
    assert "exported_node" not in info["metric"]
    assert (info["metric"]["cores"], info["metric"]["device"], info["metric"]["workers"]) == (
        format_cores(CORES), "cpu", "1")
    (memory,) = stack.deploy.wait_for(f'{m.AGENT_MEMORY}{{job="{AGENTS_JOB}"}}', timeout=15)
    assert memory["metric"][m.NODE] == NODE  # from /sd


def test_coordinator_series_are_what_its_methods_recorded(stack: Stack) -> None:
    def series(name: str, **labels: str) -> float:
        selector = ",".join([f'job="{COORDINATOR_JOB}"', *(f'{k}="{v}"' for k, v in labels.items())])
        return only(stack.deploy, f"{name}{{{selector}}}", timeout=30)

    # Two accepted updates of NODE: counters add up, gauges hold its last report.
    assert series(m.NODE_SAMPLES, node=NODE) == 2 * UPDATE_SAMPLES
    assert series(m.UPDATES_ACCEPTED, node=NODE) == 2
    assert series(m.NODE_RECEIVED_BYTES, node=NODE) == 2 * UPDATE_BYTES
    assert series(m.NODE_SENT_BYTES, node=NODE) == SENT_BYTES
    assert series(f"{m.NODE_COMPUTE_HIST}_count", node=NODE) == 2
    assert series(f"{m.NODE_COMPUTE_HIST}_sum", node=NODE) == 2 * REPORT.compute_seconds
    assert series(m.NODE_COMPUTE, node=NODE) == REPORT.compute_seconds
    assert series(m.NODE_COMMUNICATION, node=NODE) == REPORT.communication_seconds
    assert series(m.NODE_THROUGHPUT, node=NODE) == REPORT.samples_per_second
    assert series(m.NODE_LOSS, node=NODE) == REPORT.loss
    assert series(m.NODE_ACCURACY, node=NODE) == REPORT.accuracy
    assert series(m.NODE_SAMPLES, node=GONE) == GONE_SAMPLES
    # Refusals: every reason exists from admission (at 0), an unknown reason is counted as malformed.
    refused = stack.deploy.query(f'{m.UPDATES_REFUSED}{{job="{COORDINATOR_JOB}",node="{NODE}"}}')
    by_reason = {r["metric"][m.REASON]: float(r["value"][1]) for r in refused}
    assert by_reason == {reason: 0.0 for reason in m.REFUSAL_REASONS} | {"stale_round": 1.0, "malformed": 1.0}
    assert series(m.UPDATES_REFUSED, node=m.UNKNOWN_NODE, reason="unauthenticated") == 1
    assert series(m.ROUND) == ROUND
    assert series(f"{m.ROUND_DURATION}_sum") == ROUND_SECONDS
    assert series(m.ROUNDS_SHORT) == 1


def test_node_left_drops_every_series_of_it(stack: Stack) -> None:
    """An agent that leaves or is evicted takes every series labelled with it: agents that came and went under new
    names kept 26 series each, forever (docs/security.md, "Limits")."""
    before = of_node(scrape(stack.coordinator), GONE)
    assert {name for name in before if name in NODE_GAUGES} == set(NODE_GAUGES)
    assert {name.split("{")[0] for name in before} >= set(NODE_COUNTERS)
    assert before[m.NODE_THROUGHPUT] == GONE_REPORT.samples_per_second
    gauge = f'{m.NODE_THROUGHPUT}{{node="{GONE}"}}'
    counter = f'{m.NODE_SAMPLES}{{node="{GONE}"}}'
    stack.deploy.wait_for(counter, timeout=30)  # Prometheus has scraped its series

    assert stack.run.membership.remove(stack.gone_id) is not None  # the coordinator's on_leave calls node_left
    assert of_node(scrape(stack.coordinator), GONE) == {}
    # NODE is untouched
    assert set(NODE_GAUGES) <= set(of_node(scrape(stack.coordinator), NODE))
    # Prometheus sees its gauges and counters go stale; the agent count follows the membership.
    deadline = time.monotonic() + 15
    while stack.deploy.query(gauge) or stack.deploy.query(counter):
        assert time.monotonic() < deadline, f"{gauge} or {counter} still there after node_left"
        time.sleep(0.25)
    stack.deploy.wait_for(m.AGENTS_CONNECTED, timeout=15, predicate=value_is(1))


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
    # The template variable sees the nodes through the coordinator's and the agent's series: NODE's (agent info
    # among them) and GONE's while it is admitted (test_node_left_* removes it, and all its series with it); not
    # the refusals of callers never known.
    (variable, *panels) = dashboard_queries()
    counts = {r["metric"][m.NODE]: float(r["value"][1]) for r in stack.deploy.query(variable.expr)}
    assert set(counts) == {NODE} | ({GONE} if stack.run.membership.get(stack.gone_id) else set())
    assert stack.deploy.query(f'{m.AGENT_INFO}_info{{node="{GONE}"}}') == []
    # Panels show what the methods recorded (the first query of each titled panel).
    first = {q.title: q.expr for q in reversed(panels)}
    for title, expected in [
        ("Round", ROUND),
        ("Global accuracy", ACCURACY),
        ("Global macro-F1", MACRO_F1),
        ("Global loss", LOSS),
        ("Training time", ELAPSED),
        ("Rounds closed short", 1),  # the stat panel, sum(... or vector(0))
        ("Refused updates", 3),  # stale_round + malformed of NODE, unauthenticated of the unknown caller
    ]:
        assert stack.deploy.value(first[title]) == expected, (title, first[title])
