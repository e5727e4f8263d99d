"""The agent's own metrics, registered into an injected registry."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgetrain import metric_names as m
from edgetrain.cores import format_cores

# Step times span a tiny MLP on a fast core (~1 ms) to a CNN on a slow ARM board (seconds).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def read_core_times(stat: Path = Path("/proc/stat")) -> dict[int, tuple[float, float]]:
    """(busy, total) ticks of each online CPU, keyed by its id (the number sched_setaffinity takes).

    /proc/stat's cpuN lines name their CPU: with a CPU offline, the Nth line is not CPU N, so psutil's
    per-CPU list (by position) would report another core. Elsewhere than Linux: psutil's list, by position.
    """
    try:
        lines = stat.read_text().splitlines()
    except OSError:  # no /proc: psutil's fields by name (their order differs between systems)
        out = {}
        for i, t in enumerate(psutil.cpu_times(percpu=True)):
            idle = t.idle + getattr(t, "iowait", 0.0)
            total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
            out[i] = (total - idle, total)
        return out
    out = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            out[int(name[3:])] = _busy_total([float(f) for f in fields])
    return out


def _busy_total(fields: list[float]) -> tuple[float, float]:
    """Busy and total ticks of a cpuN line: user nice system idle iowait irq softirq steal (guest is in user)."""
    total = sum(fields[:8])
    idle = sum(fields[3:5])
    return total - idle, total


def busy_fractions(before: dict[int, tuple[float, float]],
                   after: dict[int, tuple[float, float]]) -> dict[int, float]:
    """Each core's busy share of the ticks between two readings (0 where no tick passed)."""
    out = {}
    for core, (busy, total) in after.items():
        busy0, total0 = before.get(core, (busy, total))
        elapsed = total - total0
        out[core] = min(1.0, max(0.0, (busy - busy0) / elapsed)) if elapsed > 0 else 0.0
    return out


class _HostCollector(Collector):
    """CPU use of each pinned core and memory of the agent and its workers, read at scrape time."""

    def __init__(self, cores: list[int], pids: Callable[[], list[int]]) -> None:
        self._cores = cores
        self._pids = pids
        self._lock = threading.Lock()  # scrapes may come on two server threads at once
        self._last = read_core_times()  # this collector's own reading: no one else's call shortens its interval

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            now = read_core_times()
            busy, self._last = busy_fractions(self._last, now), now
        cpu = GaugeMetricFamily(m.CORE_CPU, "Busy fraction of each pinned core since the last scrape.",
                                labels=[m.CORE])
        for core in self._cores:
            if core in busy:
                cpu.add_metric([str(core)], busy[core])
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
