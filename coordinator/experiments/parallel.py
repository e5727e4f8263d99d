"""`coordinator bench parallel`: serial vs data-parallel (edgetrain), plain PyTorch and DDP peers, and a GPU.

The paper's Figure 1: the same training (model, data, per-worker batch, total samples) run serially in one
process on all allowed cores, data-parallel over N pinned local agents through the real coordinator, as plain
PyTorch in one process, as torch DistributedDataParallel over N pinned processes, and on a GPU when there is one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgetrain.cores import allowed_cores, format_cores, split_cores
from edgetrain.errors import ConfigError
from edgetrain.pinned import run_pinned

from .baselines import TrainJob, TrainOutcome, combine, torch_ddp, torch_single
from .common import (
    BenchSettings,
    DataFacts,
    Machine,
    check_agents,
    data_facts,
    edgetrain_serial,
    load_average,
    machine_info,
    max_pct,
    measure,
    progress_steps,
    result_line,
)
from .tables import csv_cell, markdown_head, markdown_table, num_cell, ratio_cell, write_csv, write_report

if TYPE_CHECKING:
    from ..runlog import RoundRecord


@dataclass(frozen=True)
class ParallelPlan:
    """The amount of work every method of `run_parallel` does, derived from the settings."""

    agents: int
    local_steps: int
    rounds: int  # coordinator rounds: each agent runs local_steps steps per round
    samples: int  # rounds * agents * local_steps * batch: what every method trains on
    serial_steps: int  # steps of one process with the per-worker batch
    eval_every_round: bool  # evaluate once per round-equivalent (only when a target accuracy is asked)


@dataclass
class ParallelRow:
    """One method of `bench parallel`: times of every repeat, medians, and ratios to the baselines."""

    method: str
    description: str
    processes: int
    threads: int  # per process
    cores: str
    times_s: list[float] = field(default_factory=list)
    targets_s: list[float | None] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    samples: int = 0
    note: str = ""
    speedup_vs_serial: float | None = None
    speedup_vs_ddp: float | None = None
    other_load: list[float | None] = field(default_factory=list)  # others' share of the CPUs, per repeat
    reruns: int = 0  # disturbed runs thrown away and run again

    @property
    def other_load_max_pct(self) -> float | None:
        return max_pct(self.other_load)

    @property
    def skipped(self) -> bool:
        return not self.times_s

    @property
    def time_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def time_to_target_s(self) -> float | None:
        reached = [t for t in self.targets_s if t is not None]
        return statistics.median(reached) if reached else None

    @property
    def accuracy(self) -> float | None:
        return statistics.median(self.accuracies) if self.accuracies else None

    @property
    def samples_per_s(self) -> float | None:
        t = self.time_s
        return self.samples / t if t else None


@dataclass
class ParallelReport:
    settings: BenchSettings
    plan: ParallelPlan
    facts: DataFacts
    machine: Machine
    target_accuracy: float | None
    rows: list[ParallelRow]

    def row(self, method: str) -> ParallelRow | None:
        return next((r for r in self.rows if r.method == method), None)


def plan_parallel(settings: BenchSettings, n_train: int, agents: int, local_steps: int,
                  target: bool) -> ParallelPlan:
    if local_steps < 1:
        raise ConfigError(f"--local-steps must be at least 1, got {local_steps}")
    per_round = agents * local_steps * settings.batch_size
    rounds = max(1, math.ceil(settings.epochs * n_train / per_round))
    return ParallelPlan(agents, local_steps, rounds, rounds * per_round, rounds * agents * local_steps, target)


def startup_seconds(history: Sequence[RoundRecord]) -> float:
    """How much longer round 0 took than a typical round: the agents' worker start-up.

    An agent joins (and so lets the coordinator's clock start) before its pinned workers have loaded
    the data and built the model; round 0 waits for that. The other methods are timed from the moment
    their processes are ready, so this much is taken off edgetrain's time to compare like with like.
    """
    if not history:
        return 0.0
    first = history[0].duration_seconds
    if len(history) > 1:
        typical = statistics.median(h.duration_seconds for h in history[1:])
    else:  # one round: its own compute and communication are the typical part
        nodes = history[0].nodes.values()
        typical = max((n.compute_seconds + n.communication_seconds for n in nodes), default=first)
    return max(0.0, first - typical)


def _edgetrain_run(settings: BenchSettings, plan: ParallelPlan, target: float | None) -> tuple[TrainOutcome, float]:
    """One data-parallel run through the real coordinator and real agent processes; (outcome, raw wall).

    Its time to target is training seconds, the coordinator's evaluations taken off as for the other methods.
    """
    from ..bench_ttt import EvalTimedCoordinator, coordinator_outcome
    from ..config import CoordinatorConfig

    cfg = CoordinatorConfig(
        spec=settings.spec(), where=settings.where(), port=0, local_agents=plan.agents, min_agents=plan.agents,
        local_steps=plan.local_steps, rounds=plan.rounds, join_timeout=300.0,
        eval_every=1 if plan.eval_every_round else plan.rounds + 1, progress=False,
    )
    coordinator = EvalTimedCoordinator(cfg, None)
    result = coordinator.run()
    if result.completed_rounds < plan.rounds or result.final is None:
        raise ConfigError(f"edgetrain run stopped after {result.completed_rounds} of {plan.rounds} rounds "
                          f"({result.stopped_by})")
    timed = coordinator_outcome(result.history, coordinator.evaluations, result.wall_seconds, target)
    outcome = TrainOutcome(
        seconds=timed.seconds, train_seconds=timed.seconds, samples=result.samples, accuracy=result.final.accuracy,
        time_to_target=timed.time_to_target, cores=timed.cores, threads=1, evals=timed.evals,
    )
    return outcome, result.wall_seconds


def run_parallel(settings: BenchSettings, *, agents: int | None = None, local_steps: int = 8,
                 target_accuracy: float | None = None, progress: bool = False,
                 gpu: bool | None = None) -> ParallelReport:
    """Serial vs data-parallel (edgetrain), plain PyTorch and DDP peers, and a GPU: the paper's Figure 1.

    Every method trains the same model from the same weights on the same data, with the same per-worker
    batch, on the same `plan.samples` examples. Repeats run round-robin over the methods, so that drift
    in the machine's load spreads over all of them. `gpu=None` uses CUDA when torch sees a device.
    """
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ConfigError(f"--target-accuracy is a fraction in (0, 1], got {target_accuracy}")
    cores = allowed_cores()
    n = agents if agents is not None else len(cores)
    check_agents(n, cores)
    machine = machine_info()
    facts = data_facts(settings)
    plan = plan_parallel(settings, facts.train, n, local_steps, target_accuracy is not None)
    spec, where = settings.spec(), settings.where()
    groups = split_cores(cores, n)
    threads = len(groups[0])  # the first groups get the extra cores when n does not divide them
    use_gpu = torch.cuda.is_available() if gpu is None else gpu

    def job(steps: int, eval_every: int, device: str = "cpu") -> TrainJob:
        return TrainJob(spec, where, steps=steps, eval_every=eval_every if plan.eval_every_round else 0,
                        target_accuracy=target_accuracy, device=device)

    k = plan.local_steps
    rows = [
        ParallelRow("serial", "one process, all cores as torch threads (edgetrain.training loop)", 1, len(cores),
                    format_cores(cores)),
        ParallelRow("edgetrain", f"coordinator + {n} pinned local agents over gRPC, K={k} local steps/round",
                    n, threads, "; ".join(format_cores(g) for g in groups)),
        ParallelRow("torch-single", "plain PyTorch, one process, all cores (DataLoader loop)", 1, len(cores),
                    format_cores(cores)),
        ParallelRow("torch-ddp", f"torch DistributedDataParallel, {n} pinned processes, gloo on loopback",
                    n, threads, "; ".join(format_cores(g) for g in groups)),
        ParallelRow("gpu", "one process on CUDA (edgetrain.training loop)", 1, len(cores), "cuda:0"),
    ]
    runners: dict[str, Callable[[], TrainOutcome]] = {
        "serial": lambda: combine(run_pinned(edgetrain_serial, [cores], job(plan.serial_steps, n * k))),
        "edgetrain": lambda: _edgetrain_run(settings, plan, target_accuracy)[0],
        "torch-single": lambda: combine(run_pinned(torch_single, [cores], job(plan.serial_steps, n * k))),
        "torch-ddp": lambda: combine(run_pinned(torch_ddp, groups, job(plan.rounds * k, k))),
        "gpu": lambda: combine(run_pinned(edgetrain_serial, [cores], job(plan.serial_steps, n * k, "cuda"))),
    }
    active = [r for r in rows if r.method != "gpu" or use_gpu]
    if not use_gpu:
        rows[-1].note = "skipped: no CUDA device"
    with progress_steps(progress, len(active) * settings.repeats, "bench parallel") as step:
        for rep in range(settings.repeats):
            for row in active:
                step(f"{row.method} (repeat {rep + 1}/{settings.repeats})")
                m = measure(settings, runners[row.method])
                out = m.outcome
                row.other_load.append(m.other_load)
                row.reruns += m.reruns
                step(result_line(m, out.seconds))
                row.times_s.append(out.seconds)
                row.targets_s.append(out.time_to_target)
                row.accuracies.append(out.accuracy)
                row.samples = out.samples
    _fill_ratios(rows, target_accuracy, settings.repeats)
    machine = Machine(**{**machine.__dict__, "load_after": load_average()})
    return ParallelReport(settings, plan, facts, machine, target_accuracy, rows)


def _fill_ratios(rows: list[ParallelRow], target: float | None, repeats: int) -> None:
    serial = next((r.time_s for r in rows if r.method == "serial"), None)
    ddp = next((r.time_s for r in rows if r.method == "torch-ddp"), None)
    for r in rows:
        t = r.time_s
        r.speedup_vs_serial = serial / t if serial and t else None
        r.speedup_vs_ddp = ddp / t if ddp and t else None
        if target is not None and not r.skipped:
            reached = sum(x is not None for x in r.targets_s)
            if reached < repeats:
                r.note = f"target reached in {reached}/{repeats} repeats"


def parallel_headers(repeats: int) -> list[str]:
    return ["method", "processes x threads", "cores", *(f"time s r{i + 1}" for i in range(repeats)),
            "time s (median)", "time to target s", "test accuracy %", "samples/s", "speed-up vs serial",
            "speed-up vs DDP", "other load % (max)", "reruns", "note"]


def parallel_cells(report: ParallelReport) -> list[list[str]]:
    reps = report.settings.repeats
    out = []
    for r in report.rows:
        times = [f"{t:.2f}" for t in r.times_s] + ["-"] * (reps - len(r.times_s))
        acc = None if r.accuracy is None else r.accuracy * 100
        out.append([r.method, f"{r.processes}x{r.threads}", r.cores, *times, num_cell(r.time_s, ".2f"),
                    num_cell(r.time_to_target_s, ".2f"), num_cell(acc, ".2f"), num_cell(r.samples_per_s, ".0f"),
                    ratio_cell(r.speedup_vs_serial), ratio_cell(r.speedup_vs_ddp),
                    num_cell(r.other_load_max_pct, ".0f"), str(r.reruns), r.note])
    return out


def parallel_ratios(report: ParallelReport) -> list[str]:
    """The ratios worth reading, one sentence each."""
    lines = []
    serial, edge, ddp, single = (report.row(m) for m in ("serial", "edgetrain", "torch-ddp", "torch-single"))
    if serial and edge and serial.time_s and edge.time_s:
        lines.append(f"edgetrain ({edge.processes} agents) vs serial: {serial.time_s / edge.time_s:.2f}x speed-up "
                     f"({serial.time_s:.2f} s -> {edge.time_s:.2f} s)")
    if edge and ddp and edge.time_s and ddp.time_s:
        verdict = "faster" if edge.time_s < ddp.time_s else "slower"
        lines.append(f"edgetrain vs torch DDP: DDP time / edgetrain time = {ddp.time_s / edge.time_s:.2f} "
                     f"(edgetrain {verdict})")
    if serial and ddp and serial.time_s and ddp.time_s:
        lines.append(f"torch DDP vs serial: {serial.time_s / ddp.time_s:.2f}x speed-up")
    if serial and single and serial.time_s and single.time_s:
        lines.append(f"plain PyTorch single process vs edgetrain serial loop: {serial.time_s / single.time_s:.2f}x")
    return lines


def parallel_markdown(report: ParallelReport, command: str = "") -> str:
    s, p = report.settings, report.plan
    parts = [
        *markdown_head("parallel", s, report.facts.model, report.machine.describe()),
        f"- Work: {p.samples} training samples per method ({report.facts.train} in the training split); "
        f"edgetrain: {p.rounds} rounds x {p.agents} agents x {p.local_steps} local steps; serial: {p.serial_steps} "
        f"steps; DDP: {p.rounds * p.local_steps} steps per process. Test split: {report.facts.test} examples.",
        f"- Target accuracy: {report.target_accuracy if report.target_accuracy is not None else 'none'}",
    ]
    if command:
        parts.append(f"- Command: `{command}`")
    parts += ["", markdown_table(parallel_headers(s.repeats), parallel_cells(report)), ""]
    parts += [f"- {line}" for line in parallel_ratios(report)]
    parts += ["", "Times are wall clock from the moment the processes were ready (data loaded, model built) to the "
              "end of training and the final test evaluation; edgetrain's excludes its agents' start-up "
              "(round 0's excess over a typical round). Medians over repeats. Other load: the share of all CPUs that "
              "processes outside the benchmark used while a run went on (max over repeats; /proc/stat minus the "
              "benchmark's own CPU time); more than a few % means that figure was disturbed. Reruns: runs thrown away "
              f"because other load exceeded {report.settings.max_other_load:g} % (--max-other-load).", ""]
    return "\n".join(parts)


def parallel_csv(report: ParallelReport, path: Path) -> Path:
    reps = report.settings.repeats
    header = ["method", "description", "processes", "threads_per_process", "cores",
              *(f"time_s_r{i + 1}" for i in range(reps)), "time_s", "time_to_target_s", "test_accuracy", "samples",
              "samples_per_s", "speedup_vs_serial", "speedup_vs_ddp", "other_load_max_pct", "reruns", "note"]
    return write_csv(path, header, (
        [r.method, r.description, r.processes, r.threads, r.cores,
         *([repr(t) for t in r.times_s] + [""] * (reps - len(r.times_s))), csv_cell(r.time_s),
         csv_cell(r.time_to_target_s), csv_cell(r.accuracy), r.samples, csv_cell(r.samples_per_s),
         csv_cell(r.speedup_vs_serial), csv_cell(r.speedup_vs_ddp), csv_cell(r.other_load_max_pct), r.reruns, r.note]
        for r in report.rows))


def parallel_png(report: ParallelReport, path: Path) -> Path:
    """Figure 1 of the paper: time and accuracy per method (Agg backend, no pyplot state)."""
    from matplotlib.figure import Figure

    rows = report.rows
    names = [r.method for r in rows]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax_t, ax_a = fig.subplots(1, 2)
    xs = range(len(rows))
    times = [r.time_s or 0.0 for r in rows]
    bars = ax_t.bar(xs, times, color=["#888888" if r.skipped else "#3b75af" for r in rows])
    for x, r, b in zip(xs, rows, bars, strict=True):
        if r.skipped:
            ax_t.text(x, 0, "skipped", ha="center", va="bottom", rotation=90, fontsize=8)
        else:
            for t in r.times_s:
                ax_t.plot([x], [t], marker="o", color="black", markersize=3)
            label = f"{r.speedup_vs_serial:.2f}x" if r.speedup_vs_serial else ""
            ax_t.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                          fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax_t.set_xticks(list(xs), names, rotation=20)
    ax_t.set_ylabel("wall time (s), median; dots: repeats")
    ax_t.set_title("time (label: speed-up vs serial)")
    accs = [(r.accuracy or 0.0) * 100 for r in rows]
    ax_a.bar(xs, accs, color=["#888888" if r.skipped else "#e1812c" for r in rows])
    for x, a, r in zip(xs, accs, rows, strict=True):
        if not r.skipped:
            ax_a.annotate(f"{a:.2f}", (x, a), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                          textcoords="offset points")
    ax_a.set_xticks(list(xs), names, rotation=20)
    ax_a.set_ylabel("final test accuracy (%)")
    ax_a.set_ylim(0, 100)
    ax_a.set_title("accuracy")
    fig.suptitle(f"{report.settings.dataset} / {report.facts.model}: {report.plan.samples} samples, "
                 f"{len(report.machine.cores)} cores")
    fig.savefig(path, dpi=110)
    return path


def write_parallel(report: ParallelReport, out: Path, command: str = "") -> list[Path]:
    return write_report(out, "parallel", parallel_markdown(report, command), partial(parallel_csv, report),
                        partial(parallel_png, report))
