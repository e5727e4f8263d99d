"""The agent's own metrics, registered into an injected registry."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgetrain import metric_names as m
from edgetrain.cores import format_cores

# Step times span a tiny MLP on a fast core (~1 ms) to a CNN on a slow ARM board (seconds).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _HostCollector(Collector):
    """CPU use of each pinned core and memory of the agent and its workers, read at scrape time."""

    def __init__(self, cores: list[int], pids: Callable[[], list[int]]) -> None:
        self._cores = cores
        self._pids = pids
        psutil.cpu_percent(percpu=True)  # the first call primes psutil's per-core counters

    def collect(self) -> Iterable[GaugeMetricFamily]:
        per_cpu = psutil.cpu_percent(percpu=True)
        cpu = GaugeMetricFamily(m.CORE_CPU, "Busy fraction of each pinned core since the last scrape.",
                                labels=[m.CORE])
        for core in self._cores:
            if core < len(per_cpu):
                cpu.add_metric([str(core)], per_cpu[core] / 100.0)
        yield cpu
        rss = 0
        for pid in [os.getpid(), *self._pids()]:
            try:
                rss += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        mem = GaugeMetricFamily(m.AGENT_MEMORY, "Resident memory of the agent and its workers.")
        mem.add_metric([], float(rss))
        yield mem


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry, *, name: str, cores: list[int], device: str, workers: int,
                 pids: Callable[[], list[int]] = list) -> None:
        self.registry = registry
        info = Info(m.AGENT_INFO, "This agent: its name, pinned cores, device and worker count.", registry=registry)
        self._info, self._about = info, {"node": name, "cores": format_cores(cores), "device": device}
        self.set_workers(workers)
        self.step_seconds = Histogram(m.STEP_SECONDS, "Time of one optimizer step.", buckets=STEP_BUCKETS,
                                      registry=registry)
        self.samples = Counter(m.AGENT_SAMPLES.removesuffix("_total"), "Training samples processed.",
                               registry=registry)
        self.rounds = Counter(m.AGENT_ROUNDS.removesuffix("_total"), "Rounds trained.", registry=registry)
        registry.register(_HostCollector(cores, pids))

    def set_workers(self, workers: int) -> None:
        """The worker count (--workers auto decides it after joining)."""
        self._info.info({**self._about, "workers": str(workers)})

    def round_done(self, samples: int, step_times: list[float]) -> None:
        for s in step_times:
            self.step_seconds.observe(s)
        self.samples.inc(samples)
        self.rounds.inc()
