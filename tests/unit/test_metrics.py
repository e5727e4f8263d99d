"""The coordinator's and the agent's metrics, registered into an injected registry and read back as samples."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest
from edgetrain.agent.metrics import STEP_BUCKETS, AgentMetrics, busy_fractions, read_core_times
from edgetrain.coordinator.metrics import ROUND_BUCKETS, CoordinatorMetrics
from prometheus_client import REGISTRY, CollectorRegistry

from edgetrain import metric_names as m
from edgetrain.records import NodeStats

CORES = sorted(os.sched_getaffinity(0))
STATS = NodeStats(compute_seconds=1.5, communication_seconds=0.25, samples_per_second=400.0, loss=0.7, accuracy=0.6)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def samples_of(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for family in registry.collect() for s in family.samples if s.name == name}


@pytest.fixture
def coord() -> CoordinatorMetrics:
    return CoordinatorMetrics(CollectorRegistry())


# ---- coordinator


def test_coordinator_metrics_go_to_the_injected_registry_only() -> None:
    a, b = CoordinatorMetrics(CollectorRegistry()), CoordinatorMetrics(CollectorRegistry())  # no clash
    a.accepted_update("n", dataclasses.replace(STATS, samples=10, bytes=100))
    assert sample(a.registry, m.UPDATES_ACCEPTED, node="n") == 1
    assert sample(b.registry, m.UPDATES_ACCEPTED, node="n") is None
    assert REGISTRY.get_sample_value(m.UPDATES_ACCEPTED, {"node": "n"}) is None
    names = {f.name for f in a.registry.collect()}
    assert all(n.startswith(m.PREFIX + "_") for n in names)


def test_unlabelled_coordinator_series_exist_from_the_start(coord: CoordinatorMetrics) -> None:
    reg = coord.registry
    for gauge in (m.ROUND, m.GLOBAL_ACCURACY, m.GLOBAL_LOSS, m.GLOBAL_MACRO_F1, m.AGENTS_CONNECTED,
                  m.TRAINING_SECONDS):
        assert sample(reg, gauge) == 0.0, gauge
    assert sample(reg, m.ROUNDS_SHORT) == 0.0  # "Rounds closed short" shows 0, not "no data"
    assert sample(reg, f"{m.ROUND_DURATION}_count") == 0.0
    coord.round_duration.observe(0.3)
    assert sample(reg, f"{m.ROUND_DURATION}_bucket", le="0.25") == 0.0
    assert sample(reg, f"{m.ROUND_DURATION}_bucket", le="0.5") == 1.0
    assert sample(reg, f"{m.ROUND_DURATION}_bucket", le="+Inf") == 1.0
    assert list(ROUND_BUCKETS) == sorted(ROUND_BUCKETS)


def test_accepted_update_sets_the_node_figures(coord: CoordinatorMetrics) -> None:
    reg = coord.registry
    coord.accepted_update("agent-a", dataclasses.replace(STATS, samples=256, bytes=4096))
    coord.accepted_update("agent-a", dataclasses.replace(STATS, samples=128, bytes=4000, compute_seconds=0.5,
                                                         accuracy=0.8))
    coord.accepted_update("agent-b", NodeStats(samples=64, bytes=10))  # an agent that sent no figures: zeros
    assert sample(reg, m.UPDATES_ACCEPTED, node="agent-a") == 2
    assert sample(reg, m.NODE_SAMPLES, node="agent-a") == 384
    assert sample(reg, m.NODE_RECEIVED_BYTES, node="agent-a") == 8096
    # gauges hold the last round's figures
    assert sample(reg, m.NODE_COMPUTE, node="agent-a") == 0.5
    assert sample(reg, m.NODE_COMMUNICATION, node="agent-a") == 0.25
    assert sample(reg, m.NODE_THROUGHPUT, node="agent-a") == 400.0
    assert sample(reg, m.NODE_LOSS, node="agent-a") == 0.7
    assert sample(reg, m.NODE_ACCURACY, node="agent-a") == 0.8
    # the histogram keeps every round
    assert sample(reg, f"{m.NODE_COMPUTE_HIST}_count", node="agent-a") == 2
    assert sample(reg, f"{m.NODE_COMPUTE_HIST}_sum", node="agent-a") == 2.0
    assert sample(reg, f"{m.NODE_COMPUTE_HIST}_bucket", node="agent-a", le="0.5") == 1
    assert sample(reg, f"{m.NODE_COMPUTE_HIST}_bucket", node="agent-a", le="2.5") == 2
    # nodes are kept apart
    assert sample(reg, m.UPDATES_ACCEPTED, node="agent-b") == 1
    assert sample(reg, m.NODE_SAMPLES, node="agent-b") == 64
    assert sample(reg, m.NODE_ACCURACY, node="agent-b") == 0.0
    assert sample(reg, f"{m.NODE_COMPUTE_HIST}_count", node="agent-b") == 1


def test_a_nodes_first_taken_update_creates_every_refusal_counter_at_zero(coord: CoordinatorMetrics) -> None:
    reg = coord.registry
    taken = dataclasses.replace(STATS, samples=8, bytes=1)

    def of(node: str) -> dict[Any, float]:
        return {k: v for k, v in samples_of(reg, m.UPDATES_REFUSED).items() if dict(k)[m.NODE] == node}

    assert samples_of(reg, m.UPDATES_REFUSED) == {}
    coord.refused_update("ghost", "late")  # a node that never trained: only what it was refused
    assert samples_of(reg, m.UPDATES_REFUSED) == {((m.NODE, "ghost"), (m.REASON, "late")): 1.0}
    coord.accepted_update("agent-a", taken)
    assert of("agent-a") == {((m.NODE, "agent-a"), (m.REASON, r)): 0.0 for r in m.REFUSAL_REASONS}
    assert sample(reg, m.UPDATES_ACCEPTED, node="agent-a") == 1
    # later updates and refusals count on from there
    coord.refused_update("agent-a", "late")
    coord.accepted_update("agent-a", taken)
    assert sample(reg, m.UPDATES_REFUSED, node="agent-a", reason="late") == 1
    assert sample(reg, m.UPDATES_ACCEPTED, node="agent-a") == 2
    # gone, every series goes; back and taken again, from zero again
    coord.node_left("agent-a")
    assert of("agent-a") == {} and sample(reg, m.UPDATES_ACCEPTED, node="agent-a") is None
    coord.accepted_update("agent-a", taken)
    assert of("agent-a") == {((m.NODE, "agent-a"), (m.REASON, r)): 0.0 for r in m.REFUSAL_REASONS}
    assert sample(reg, m.UPDATES_ACCEPTED, node="agent-a") == 1


@pytest.mark.parametrize("reason", m.REFUSAL_REASONS)
def test_refused_update_counts_each_known_reason(coord: CoordinatorMetrics, reason: str) -> None:
    coord.refused_update("agent-a", reason)
    coord.refused_update("agent-a", reason)
    assert sample(coord.registry, m.UPDATES_REFUSED, node="agent-a", reason=reason) == 2
    others = {k: v for k, v in samples_of(coord.registry, m.UPDATES_REFUSED).items() if dict(k)[m.REASON] != reason}
    assert not any(others.values())


def test_an_unknown_refusal_reason_counts_as_malformed_and_the_label_set_stays_bounded(
    coord: CoordinatorMetrics,
) -> None:
    for reason in ("boom", "", "STALE_ROUND", "stale round", "x" * 500, "malformed"):
        coord.refused_update("agent-a", reason)
    assert sample(coord.registry, m.UPDATES_REFUSED, node="agent-a", reason="malformed") == 6
    reasons = {dict(k)[m.REASON] for k in samples_of(coord.registry, m.UPDATES_REFUSED)}
    assert reasons == {"malformed"}
    assert reasons <= set(m.REFUSAL_REASONS)


# ---- agent


def make_agent(cores: list[int] | None = None, **kw: object) -> AgentMetrics:
    return AgentMetrics(CollectorRegistry(), name="board-7", cores=cores if cores is not None else CORES,
                        device="cpu", workers=2, **kw)  # type: ignore[arg-type]


def test_agent_info_names_the_node_its_cores_device_and_workers() -> None:
    agent = AgentMetrics(CollectorRegistry(), name="board-7", cores=[0, 1, 2, 3, 8], device="cpu", workers=2)
    info = samples_of(agent.registry, f"{m.AGENT_INFO}_info")
    assert info == {(("cores", "0-3,8"), ("device", "cpu"), (m.NODE, "board-7"), ("workers", "2")): 1.0}


def test_round_done_fills_the_step_histogram_and_counters() -> None:
    agent = make_agent()
    reg = agent.registry
    assert sample(reg, f"{m.STEP_SECONDS}_count") == 0.0
    assert sample(reg, m.AGENT_SAMPLES) == 0.0 and sample(reg, m.AGENT_ROUNDS) == 0.0
    agent.round_done(256, [0.004, 0.02, 0.02, 3.0])
    agent.round_done(100, [0.004])
    assert sample(reg, f"{m.STEP_SECONDS}_count") == 5
    assert sample(reg, f"{m.STEP_SECONDS}_sum") == pytest.approx(3.048)
    assert sample(reg, f"{m.STEP_SECONDS}_bucket", le="0.0025") == 0
    assert sample(reg, f"{m.STEP_SECONDS}_bucket", le="0.005") == 2
    assert sample(reg, f"{m.STEP_SECONDS}_bucket", le="0.025") == 4
    assert sample(reg, f"{m.STEP_SECONDS}_bucket", le="2.5") == 4
    assert sample(reg, f"{m.STEP_SECONDS}_bucket", le="5.0") == 5
    assert sample(reg, m.AGENT_SAMPLES) == 356
    assert sample(reg, m.AGENT_ROUNDS) == 2
    assert list(STEP_BUCKETS) == sorted(STEP_BUCKETS)


def _burn(core: int, seconds: float) -> None:
    """Keep `core` busy from this thread (sched_setaffinity(0) pins the calling thread only)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    finally:
        os.sched_setaffinity(0, before)


def test_host_collector_reports_each_pinned_core_and_memory() -> None:
    core = CORES[-1]
    agent = make_agent(cores=[core])
    _burn(core, 0.4)  # the constructor took its first reading; this interval has the core busy
    cpu = samples_of(agent.registry, m.CORE_CPU)
    assert list(cpu) == [((m.CORE, str(core)),)]  # one series, for the pinned core only
    assert 0.5 <= cpu[((m.CORE, str(core)),)] <= 1.0  # a ratio, not a percentage
    memory = sample(agent.registry, m.AGENT_MEMORY)
    assert memory is not None and memory >= psutil.Process().memory_info().rss * 0.5


def test_host_collector_covers_every_core_given() -> None:
    agent = make_agent(cores=CORES)
    cpu = samples_of(agent.registry, m.CORE_CPU)
    assert sorted(int(dict(k)[m.CORE]) for k in cpu) == CORES
    assert all(0.0 <= v <= 1.0 for v in cpu.values())


def test_core_times_are_keyed_by_cpu_id_not_by_line(tmp_path) -> None:
    # CPU 1 offline: the second cpuN line is CPU 2, and a reading by position would call it CPU 1.
    stat = tmp_path / "stat"
    stat.write_text("cpu  30 0 30 300 0 0 0 0 0 0\n"
                    "cpu0 10 0 10 100 0 0 0 0 0 0\n"
                    "cpu2 20 0 20 200 0 0 0 0 0 0\n"
                    "intr 1 2 3\nctxt 5\n")
    assert read_core_times(stat) == {0: (20.0, 120.0), 2: (40.0, 240.0)}
    stat.write_text("cpu0 10 0 10 200 0 0 0 0 0 0\n"      # idle for 100 ticks
                    "cpu2 95 0 20 200 5 0 0 0 0 0\n")     # busy 75 of 80 ticks (iowait counts as idle)
    after = read_core_times(stat)
    assert busy_fractions({0: (20.0, 120.0), 2: (40.0, 240.0)}, after) == {0: 0.0, 2: 75 / 80}
    assert busy_fractions(after, after) == {0: 0.0, 2: 0.0}  # no tick passed: 0, not a division by zero


def test_two_collectors_do_not_shorten_each_others_interval() -> None:
    core = CORES[-1]
    first, second = make_agent(cores=[core]), make_agent(cores=[core])
    _burn(core, 0.4)
    samples_of(second.registry, m.CORE_CPU)  # a read just before, by another collector (psutil's state was shared)
    assert samples_of(first.registry, m.CORE_CPU)[((m.CORE, str(core)),)] >= 0.5


def test_memory_adds_the_workers_and_skips_those_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 20
        while psutil.Process(child.pid).memory_info().rss < 64 << 20:
            assert time.monotonic() < deadline, "child never allocated its buffer"
            time.sleep(0.05)
        gone = 2**22 + 12345  # above the default pid_max: no such process
        pids = [child.pid, gone]
        alone = sample(make_agent(pids=list).registry, m.AGENT_MEMORY)
        with_child = sample(make_agent(pids=lambda: pids).registry, m.AGENT_MEMORY)
        assert alone is not None and with_child is not None
        assert with_child - alone >= 60 << 20  # the child's 64 MiB, give or take our own RSS drift
    finally:
        child.kill()
        child.wait()
