"""Monitoring end to end: a real training, real agent processes serving /metrics, a real Prometheus.

One live stack for the module: a coordinator (in a thread, /metrics and /sd on a free port), two
`python -m edgetrain.agent start --metrics-port 0` subprocesses pinned to one core each, and Prometheus running
deploy/prometheus/prometheus.yml itself (aimed at the coordinator, 1 s intervals), which finds the
agents only through the coordinator's /sd. The run has far more rounds than the tests need: it is
live while every check queries Prometheus and is stopped (coord.stop) at teardown, which also ends
the agents, kills Prometheus and fails loudly if the run or an agent did not end cleanly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.run import Coordinator, RunResult

from edgetrain import grpc_options, serde
from edgetrain import metric_names as m
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.spec import RunSpec
from tests.integration.prom import AGENTS_JOB, COORDINATOR_JOB, Prometheus, dashboard_queries, find_binary, promtool
from tests.integration.test_faults import wait_for

CORES = sorted(os.sched_getaffinity(0))
AGENTS = {f"agent-{i}": CORES[i % len(CORES)] for i in range(2)}  # name -> the one core it is pinned to
# Far more than the tests need (about 3 rounds/s here): the run must stay live while Prometheus is queried.
ROUNDS = 2000
RATE_WINDOW = "10s"  # stands for Grafana's $__rate_interval: 10 scrapes at 1 s


@dataclass
class LiveRun:
    coord: Coordinator
    prom: Prometheus
    metrics: str  # the coordinator's metrics host:port (/metrics and /sd)
    sd: dict[str, str]  # agent name -> metrics host:port, as /sd lists it
    agents: dict[str, subprocess.Popen[bytes]]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
        return body


def _service_discovery(metrics: str) -> dict[str, str]:
    groups = json.loads(_get(f"http://{metrics}/sd"))
    return {g["labels"][m.NODE]: t for g in groups for t in g["targets"]}


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    find_binary("prometheus", "PROMETHEUS_BIN")  # skip (or fail under CI=true) before starting anything
    find_binary("promtool", "PROMTOOL_BIN")
    tmp = tmp_path_factory.mktemp("monitoring")
    cfg = CoordinatorConfig(spec=RunSpec(dataset="tweets", limit=3000), port=0, metrics_port=0, local_steps=4,
                            rounds=ROUNDS, min_agents=2, eval_every=1, run_dir=tmp / "run", progress=False,
                            round_timeout=60)
    coord = Coordinator(cfg)
    out: list[RunResult] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(coord.run())
        except BaseException as exc:  # surfaced at teardown
            errors.append(exc)

    runner = threading.Thread(target=target, name="coordinator-run", daemon=True)
    agents: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, IO[bytes]] = {}
    prom: Prometheus | None = None
    try:
        coord.start()
        assert coord.metrics_server is not None
        metrics = coord.metrics_server.address
        for name, core in AGENTS.items():
            logs[name] = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
            agents[name] = subprocess.Popen(
                [sys.executable, "-m", "edgetrain.agent", "start", "--coordinator", f"127.0.0.1:{coord.port}",
                 "--cores", str(core), "--name", name, "--metrics-port", "0", "--give-up-after", "60"],
                stdin=subprocess.DEVNULL, stdout=logs[name], stderr=subprocess.STDOUT,
            )
        prom = Prometheus.for_deploy(coordinator=metrics).start()  # its ~5 s first-scrape delay overlaps the joins
        runner.start()
        deadline = time.monotonic() + 60
        sd: dict[str, str] = {}
        while set(sd) != set(AGENTS):
            dead = {n: p.returncode for n, p in agents.items() if p.poll() is not None}
            if dead or errors or time.monotonic() > deadline:
                logs_text = "\n".join(f"--- {n}\n{_tail(tmp / f'{n}.log')}" for n in AGENTS)
                raise AssertionError(f"agents not all in /sd ({sd}); exited: {dead}; run: {errors}\n{logs_text}")
            time.sleep(0.2)
            sd = _service_discovery(metrics)
        yield LiveRun(coord, prom, metrics, sd, agents)
    finally:
        coord.stop.set()
        if runner.ident is not None:
            runner.join(timeout=90)
        else:  # start() failed before run(): close what it opened
            coord.close()
        codes: dict[str, int | None] = {}
        for name, proc in agents.items():  # the coordinator's FINISHED ends them; stragglers are stopped
            try:
                codes[name] = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                codes[name] = None
        for f in logs.values():
            f.close()
        if prom is not None:
            prom.stop()
    assert not runner.is_alive(), "the coordinator did not stop within 90 s of coord.stop"
    assert not errors, errors
    assert out and out[0].stopped_by == "stop" and out[0].completed_rounds >= 2, out
    bad = {n: c for n, c in codes.items() if c != 0}
    assert not bad, f"agents did not exit cleanly: {bad}\n" + "\n".join(_tail(tmp / f"{n}.log") for n in bad)


def _rounds_at_least(n: int) -> Any:
    return lambda results: float(results[0]["value"][1]) >= n


def _wait_for_training(live: LiveRun) -> None:
    """All three targets scraped, and enough rounds scraped for every rate() window to hold 2+ samples."""
    live.prom.wait_for_targets(1, job=COORDINATOR_JOB, timeout=45)
    live.prom.wait_for_targets(len(AGENTS), job=AGENTS_JOB, timeout=45)
    live.prom.wait_for(f'{m.ROUND}{{job="{COORDINATOR_JOB}"}}', timeout=60, predicate=_rounds_at_least(3))
    for counter in (m.NODE_SAMPLES, m.AGENT_SAMPLES):
        live.prom.wait_for(f"rate({counter}[{RATE_WINDOW}]) > 0", timeout=30,
                           predicate=lambda results: len(results) == len(AGENTS))


def test_prometheus_scrapes_the_coordinator_and_both_agents_found_through_sd(live: LiveRun) -> None:
    _wait_for_training(live)
    # --metrics-port 0: each agent advertised the port it really bound, on loopback
    assert _service_discovery(live.metrics) == live.sd
    assert all(a.startswith("127.0.0.1:") and int(a.rpartition(":")[2]) > 0 for a in live.sd.values()), live.sd
    targets = [t for t in live.prom.targets() if t["health"] == "up"]
    assert len(targets) == 1 + len(AGENTS), targets
    (coordinator,) = [t for t in targets if t["labels"]["job"] == COORDINATOR_JOB]
    assert coordinator["scrapeUrl"] == f"http://{live.metrics}/metrics"
    agents = {t["labels"][m.NODE]: t for t in targets if t["labels"]["job"] == AGENTS_JOB}
    assert set(agents) == set(AGENTS)
    for name, target in agents.items():
        assert target["scrapeUrl"] == f"http://{live.sd[name]}/metrics"
        assert target["discoveredLabels"].get("__meta_url") == f"http://{live.metrics}/sd"  # from /sd, not static
    assert live.prom.value(f"max({m.AGENTS_CONNECTED})") == len(AGENTS)


def test_every_dashboard_query_returns_data_from_the_live_run(live: LiveRun) -> None:
    _wait_for_training(live)
    queries = list(dashboard_queries(rate_interval=RATE_WINDOW))
    empty, not_finite, nodes_missing = [], [], []
    for q in queries:
        results = live.prom.wait_for(q.expr, timeout=10, fail=False)  # PromQLError propagates
        if not results:
            empty.append(q)
            continue
        if any(not math.isfinite(float(r["value"][1])) for r in results):
            not_finite.append((q, results))
        labelled = {r["metric"][m.NODE] for r in results if m.NODE in r["metric"]}
        if labelled and labelled != set(AGENTS):  # per-node panels show both agents, and only them
            nodes_missing.append((q, sorted(labelled)))
    assert not empty, "queries with no data:\n" + "\n".join(f"{q.title}: {q.expr}" for q in empty)
    assert not not_finite, not_finite
    assert not nodes_missing, nodes_missing
    assert len(queries) >= 40  # every panel target and the $node variable were run


def test_refusal_counters_start_at_zero_and_a_stale_update_is_counted(live: LiveRun) -> None:
    _wait_for_training(live)
    coord, name = live.coord, "agent-0"
    refused = f'{m.UPDATES_REFUSED}{{job="{COORDINATOR_JOB}"}}'
    # Every (node, reason) pair exists from the agent's first taken update on, so rate() has data before any
    # refusal.
    series = live.prom.wait_for(refused, timeout=15, predicate=lambda r: len(r) >= len(AGENTS) * len(m.REFUSAL_REASONS))
    pairs = {(r["metric"][m.NODE], r["metric"][m.REASON]) for r in series}
    assert pairs == {(n, reason) for n in AGENTS for reason in m.REFUSAL_REASONS}
    before = {(r["metric"][m.NODE], r["metric"][m.REASON]): float(r["value"][1]) for r in series}
    assert not any(before.values()), before  # at zero: nothing in this healthy run was refused
    assert before[(name, "stale_round")] == coord.registry.get_sample_value(
        m.UPDATES_REFUSED, {m.NODE: name, m.REASON: "stale_round"})

    # A genuine update (the real global state) for a round that has already closed, with agent-0's own session.
    # Sent while agent-0 still owes the open round: once its update is in, the coordinator refuses its next
    # stream before reading the header (a duplicate: nothing it sends could be taken), and counts that instead.
    engine = coord.engine
    assert engine is not None
    agent = next(a for a in coord.membership.live() if a.name == name)
    duplicates = 0
    parts = [pb.UpdateMessage(part=p) for p in serde.encode(engine.global_state)]  # encoded before the wait
    with grpc.insecure_channel(f"127.0.0.1:{coord.port}", options=grpc_options.CLIENT) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for _ in range(20):
            wait_for(lambda: engine.owes(agent.agent_id), 15, "agent-0 to owe the open round", poll=0.005)
            closed_round = engine.completed_rounds - 1
            assert closed_round >= 0
            header = pb.UpdateHeader(agent_id=agent.agent_id, round=closed_round, num_samples=8,
                                     stats=pb.NodeStats(compute_seconds=0.1))
            messages = [pb.UpdateMessage(header=header), *parts]
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitUpdate(iter(messages), metadata=[(grpc_options.SESSION_METADATA, agent.session_token)],
                                  timeout=10)
            if err.value.code() != grpc.StatusCode.ALREADY_EXISTS:  # agent-0's own update came in between
                break
            duplicates += 1
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    # stale either way: its round closed ("round r is not open"), or it came between two rounds ("no round is open")
    assert any(why in (err.value.details() or "") for why in ("is not open", "no round is open")), err.value.details()

    want = before[(name, "stale_round")] + 1
    stale = f'{m.UPDATES_REFUSED}{{job="{COORDINATOR_JOB}",{m.NODE}="{name}",{m.REASON}="stale_round"}}'
    live.prom.wait_for(stale, timeout=15, predicate=lambda r: float(r[0]["value"][1]) == want)
    after = {(r["metric"][m.NODE], r["metric"][m.REASON]): float(r["value"][1]) for r in live.prom.query(refused)}
    changed = {pair: after[pair] - before[pair] for pair in after if after[pair] != before.get(pair)}
    counted = {(name, "stale_round"): 1.0} | ({(name, "duplicate"): float(duplicates)} if duplicates else {})
    assert changed == counted, changed  # each refusal counted once under its reason, no new label values
    # The dashboard's panels see it: the stat and the by-reason rate.
    (stat,) = [q for q in dashboard_queries(rate_interval=RATE_WINDOW) if q.title == "Refused updates"]
    assert live.prom.value(stat.expr) >= 1
    (by_reason,) = [q for q in dashboard_queries(rate_interval=RATE_WINDOW) if q.title == "Refused updates by reason"]
    rates = {r["metric"][m.REASON]: float(r["value"][1]) for r in live.prom.query(by_reason.expr)}
    assert rates["stale_round"] > 0 and set(rates) == set(m.REFUSAL_REASONS)
    # ...and training goes on: the agent's session and its next updates are untouched.
    accepted = f'{m.UPDATES_ACCEPTED}{{job="{COORDINATOR_JOB}",{m.NODE}="{name}"}}'
    now = live.prom.value(accepted)
    live.prom.wait_for(accepted, timeout=30, predicate=lambda r: float(r[0]["value"][1]) >= now + 2)


def test_agent_info_carries_its_cores_and_cpu_is_sampled_per_pinned_core(live: LiveRun) -> None:
    _wait_for_training(live)
    info = live.prom.wait_for(f'{m.AGENT_INFO}_info{{job="{AGENTS_JOB}"}}', timeout=15,
                              predicate=lambda r: len(r) == len(AGENTS))
    by_node = {r["metric"][m.NODE]: r["metric"] for r in info}
    assert set(by_node) == set(AGENTS)
    for name, core in AGENTS.items():
        labels = by_node[name]
        assert (labels["cores"], labels["device"], labels["workers"]) == (str(core), "cpu", "1"), labels
        assert labels["instance"] == live.sd[name] and "exported_node" not in labels
        cpu = live.prom.wait_for(f'{m.CORE_CPU}{{job="{AGENTS_JOB}",{m.NODE}="{name}"}}', timeout=15)
        assert [r["metric"][m.CORE] for r in cpu] == [str(core)]  # the pinned core, and only it
        assert 0.0 <= float(cpu[0]["value"][1]) <= 1.0
        # Over the run the core was busy at some scrape (the agent trains on it).
        end = time.time()
        series = live.prom.query_range(f'{m.CORE_CPU}{{job="{AGENTS_JOB}",{m.NODE}="{name}"}}', end - 60, end)
        assert len(series) == 1 and max(float(v) for _, v in series[0]["values"]) > 0.0, (name, series)
        memory = live.prom.value(f'{m.AGENT_MEMORY}{{{m.NODE}="{name}"}}')
        assert memory > 50e6  # agent + worker, both with torch loaded
        assert live.prom.value(f'{m.AGENT_ROUNDS}{{{m.NODE}="{name}"}}') >= 1


def test_promtool_accepts_the_coordinator_and_agent_expositions(live: LiveRun) -> None:
    _wait_for_training(live)  # every family populated: per-node series, histograms with observations
    for who, address in [("coordinator", live.metrics), *live.sd.items()]:
        text = _get(f"http://{address}/metrics").decode()
        assert m.PREFIX in text
        proc = promtool("check", "metrics", stdin=text)
        assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (who, proc.stdout + proc.stderr)
