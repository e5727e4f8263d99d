"""Paper reproduction and peer comparisons behind `coordinator bench parallel` and `coordinator bench affinity`.

Reproduces the two experiments of "Accelerating the training of ANNs using data parallelization"
(ANNSIM'23) on the user's own machine:

* `run_parallel`: the same training (model, data, per-worker batch, total samples) run serially in one
  process on all allowed cores, data-parallel over N pinned local agents through the real coordinator,
  as plain PyTorch in one process, as torch DistributedDataParallel over N pinned processes, and on a
  GPU when there is one (the paper's Figure 1).
* `run_affinity`: a fixed amount of training pinned to growing sets of cores, each repeated, with the
  paper's "% gain vs slowest" (its Table 1); and a processes x threads layout sweep.

The functions return rows (dataclasses); `write_parallel` / `write_affinity` turn them into a Markdown
table, a CSV and a PNG. Every configuration runs in fresh processes pinned before torch starts its
threads, and is timed from the moment its data and model are ready (start-up is not training).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgetrain.cores import allowed_cores, format_cores, parse_cores, split_cores, validate_cores
from edgetrain.errors import ConfigError, CoresError
from edgetrain.models import default_lr
from edgetrain.peers import (
    ChildSetup,
    TrainJob,
    TrainOutcome,
    combine,
    core_groups,
    run_pinned,
    steps_for,
    torch_ddp,
    torch_single,
)
from edgetrain.recipes import LR_DECAY
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.split import TIE, Trial, cpu_model_name, pick

if TYPE_CHECKING:
    from .runlog import RoundRecord

# ---------------------------------------------------------------------------- settings and machine


@dataclass(frozen=True)
class BenchSettings:
    """What every configuration of a benchmark shares: data, model, hyper-parameters, amount, repeats."""

    dataset: str = "tweets"
    model: str = ""  # "" = the data set's default
    data_dir: Path | None = None
    limit: int = 0  # 0 = the whole data set
    epochs: float = 1.0  # passes over the training split, the same for every configuration
    batch_size: int = 64  # per worker (per process), as in `coordinator run`
    lr: float | None = None  # None: the model's own (RunSpec fills it in)
    optimizer: str = "adam"
    lr_decay: float = LR_DECAY  # x per epoch of each worker's data, as `coordinator run` does (RunSpec's default)
    seed: int = 0
    max_len: int = 64
    repeats: int = 1
    quiet_wait: float = 0.0  # before each run, wait up to this many seconds for other processes to go quiet
    max_other_load: float = 100.0  # % of all CPUs; a run disturbed by more other load is run again...
    retries: int = 3  # ...at most this many times (then the last try is kept, and counted as disturbed)

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {self.repeats}")
        if not 0 < self.max_other_load <= 100:
            raise ConfigError(f"--max-other-load is a percentage in (0, 100], got {self.max_other_load}")
        if self.retries < 0:
            raise ConfigError(f"--retries cannot be negative, got {self.retries}")
        self.spec()  # validates batch size, optimizer, lr, limit

    def spec(self) -> RunSpec:
        return RunSpec(dataset=self.dataset, model=self.model, seed=self.seed, batch_size=self.batch_size,
                       lr=self.lr, optimizer=self.optimizer, lr_decay=self.lr_decay, max_len=self.max_len,
                       limit=self.limit)

    def where(self) -> DataLocation:
        return DataLocation(data_dir=self.data_dir)


@dataclass(frozen=True)
class Machine:
    """Where the figures were measured (printed above every table)."""

    cpu: str
    cores: list[int]
    logical_cpus: int
    torch: str
    gpu: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def describe(self) -> str:
        return (f"{self.cpu}; {len(self.cores)} allowed cores ({format_cores(self.cores)}) of "
                f"{self.logical_cpus} logical CPUs; torch {self.torch}; GPU: {self.gpu}; load average "
                f"(1/5/15 min) before {_load(self.load_before)}, after {_load(self.load_after)}")


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in avg)


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - platforms without it
        return (0.0, 0.0, 0.0)


def machine_info() -> Machine:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no CUDA device)"
    return Machine(cpu_model_name(), allowed_cores(), os.cpu_count() or 0, torch.__version__, gpu, load_average())


def console() -> Console:
    """Standard output for the tables: the terminal's width, or wide enough for them when piped."""
    out = Console()
    return out if out.is_terminal else Console(width=200)


# ---------------------------------------------------------------------------- other load on the machine

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
QUIET_BUSY = 0.15  # at most this share of all CPUs busy counts as a quiet machine


def machine_busy_seconds() -> float | None:
    """CPU-seconds all CPUs have spent busy since boot, from /proc/stat (None where there is none).

    Steal time counts as busy: on a virtual machine it is the neighbours' load.
    """
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            parts = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def own_cpu_seconds() -> float:
    """CPU-seconds of this process and of every descendant already waited for (benchmark children are)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class LoadProbe:
    """The share of the machine's CPU time that processes other than the benchmark's used during a run."""

    def __init__(self) -> None:
        self.busy0 = machine_busy_seconds()
        self.own0 = own_cpu_seconds()
        self.t0 = time.perf_counter()

    def other_share(self) -> float | None:
        busy1 = machine_busy_seconds()
        if busy1 is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        foreign = (busy1 - self.busy0) - (own_cpu_seconds() - self.own0)
        return max(0.0, min(1.0, foreign / max(1e-9, wall * (os.cpu_count() or 1))))


def wait_until_quiet(max_wait: float, window: float = 2.0) -> float | None:
    """Wait (up to `max_wait` s) until at most QUIET_BUSY of all CPUs is busy; return the last busy share."""
    if max_wait <= 0:
        return None
    end = time.monotonic() + max_wait
    while True:
        b0 = machine_busy_seconds()
        time.sleep(window)
        b1 = machine_busy_seconds()
        if b0 is None or b1 is None:
            return None
        share = min(1.0, max(0.0, (b1 - b0) / (window * (os.cpu_count() or 1))))  # jiffies vs wall rounding
        if share <= QUIET_BUSY or time.monotonic() > end:
            return share


@dataclass(frozen=True)
class Measured:
    outcome: TrainOutcome
    other_load: float | None  # share of all CPUs other processes used during the kept run
    reruns: int  # runs thrown away because other load exceeded --max-other-load


def _measured(settings: BenchSettings, runner: Callable[[], TrainOutcome]) -> Measured:
    """Run one configuration after waiting for quiet; run it again while others disturbed it too much."""
    reruns = 0
    while True:
        wait_until_quiet(settings.quiet_wait if reruns == 0 else max(settings.quiet_wait, 60.0))
        probe = LoadProbe()
        out = runner()
        other = probe.other_share()
        if other is None or other * 100 <= settings.max_other_load or reruns >= settings.retries:
            return Measured(out, other, reruns)
        reruns += 1


def _max_pct(shares: Sequence[float | None]) -> float | None:
    known = [s for s in shares if s is not None]
    return max(known) * 100.0 if known else None


@dataclass(frozen=True)
class DataFacts:
    """What planning needs to know about the data: sizes and the model that will be trained."""

    train: int
    test: int
    model: str


def data_facts(settings: BenchSettings) -> DataFacts:
    from edgetrain.workload import load_workload

    w = load_workload(settings.spec(), settings.where())
    return DataFacts(len(w.data.train), len(w.data.test), w.model_name)


# ---------------------------------------------------------------------------- edgetrain's own serial loop


def edgetrain_serial(setup: ChildSetup, job: TrainJob) -> TrainOutcome:
    """The serial baseline: edgetrain.training's batch plan, local steps and evaluation in one process.

    As an agent's worker does, it multiplies the learning rate by `spec.lr_decay` for every completed
    pass over its data (here the whole training split) and weighs the loss as the spec says. Evaluations
    score `job.metric`; their times (and the time to target) are training seconds, evaluations excluded.
    """
    from edgetrain.training import batch_plan, evaluate, make_optimizer, set_lr, train_steps
    from edgetrain.workload import load_workload

    workload = load_workload(job.spec, job.where)
    spec = workload.spec  # the model, lr and decay named: the data set's defaults filled in
    device = torch.device(job.device)
    model = workload.new_model().to(device)
    optimizer = make_optimizer(model, spec.train_config())
    train, test = workload.data.train, workload.data.test
    weights = workload.class_weights()
    n, batch = len(train), spec.batch_size
    shard = torch.arange(n)
    evals: list[tuple[float, float]] = []
    eval_seconds = 0.0
    time_to_target: float | None = None
    accuracy = 0.0
    done = 0
    t0 = time.perf_counter()
    while done < job.steps:
        epoch = done * batch // n
        next_epoch = -(-((epoch + 1) * n) // batch)  # the first step that starts in the next epoch
        k = min(job.steps - done, max(1, next_epoch - done))
        if job.eval_every:
            k = min(k, job.eval_every - done % job.eval_every)
        set_lr(optimizer, spec.lr_at(epoch))
        plan = batch_plan(shard, seed=spec.seed, rank=0, start_sample=done * batch, steps=k, batch_size=batch)
        train_steps(model, optimizer, train.x, train.y, plan, seed=spec.seed * 1_000_003 + done, device=device,
                    class_weights=weights)
        done += k
        if done < job.steps and not (job.eval_every and done % job.eval_every == 0):
            continue
        e0 = time.perf_counter()
        trained = e0 - t0 - eval_seconds
        accuracy = evaluate(model, test.x, test.y, workload.data.num_classes, device=device).value(job.metric)
        eval_seconds += time.perf_counter() - e0
        evals.append((trained, accuracy))
        if job.target_accuracy is not None and time_to_target is None and accuracy >= job.target_accuracy:
            time_to_target = trained
            if job.stop_at_target:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return TrainOutcome(seconds=seconds, train_seconds=seconds - eval_seconds, samples=done * spec.batch_size,
                        accuracy=accuracy, time_to_target=time_to_target, cores=tuple(allowed_cores()),
                        threads=torch.get_num_threads(), evals=tuple(evals))


# ---------------------------------------------------------------------------- bench parallel


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
        return _max_pct(self.other_load)

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


def _check_agents(agents: int, cores: list[int]) -> None:
    if agents < 1:
        raise ConfigError(f"--agents must be at least 1, got {agents}")
    if agents > len(cores):
        raise CoresError(
            f"--agents {agents} needs {agents} disjoint cores, but this process may use only {len(cores)} "
            f"(cores {format_cores(cores)})"
        )


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
    from .bench_ttt import EvalTimedCoordinator, coordinator_outcome
    from .config import CoordinatorConfig

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


@contextmanager
def _progress(progress: bool, total: int, what: str) -> Iterator[Callable[[str], None]]:
    """A rich progress bar over the configurations; yields `step(text)` to call before each and after it.

    Where stderr is no terminal (a log file) the bar cannot redraw: each step is printed as a line.
    """
    err = Console(stderr=True)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=err, disable=not progress, transient=False)
    with bar:
        task: TaskID = bar.add_task(what, total=total)
        started = [False]

        def step(description: str) -> None:
            if description.startswith("  "):  # a result line
                if progress and not err.is_terminal:
                    err.print(f"{what}:{description}", highlight=False)
                return
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=f"{what}: {description}")
            if progress and not err.is_terminal:
                err.print(f"{what}: {description} [{time.strftime('%H:%M:%S')}]", highlight=False)

        yield step
        bar.update(task, completed=total, description=f"{what}: done")


def _result_line(m: Measured, seconds: float) -> str:
    other = "?" if m.other_load is None else f"{m.other_load * 100:.0f} %"
    return f"  -> {seconds:.2f} s, other load {other}, reruns {m.reruns}"


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
    _check_agents(n, cores)
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
    with _progress(progress, len(active) * settings.repeats, "bench parallel") as step:
        for rep in range(settings.repeats):
            for row in active:
                step(f"{row.method} (repeat {rep + 1}/{settings.repeats})")
                m = _measured(settings, runners[row.method])
                out = m.outcome
                row.other_load.append(m.other_load)
                row.reruns += m.reruns
                step(_result_line(m, out.seconds))
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


# ---------------------------------------------------------------------------- bench affinity


@dataclass
class AffinityRow:
    """One affinity set (or PxT layout): processing time of every repeat, and the paper's gain column."""

    sweep: str  # "affinity" (one process, edgetrain.training loop) or "layout" (DDP, P processes x T threads)
    label: str  # as the paper writes it: the number of processors, or "PxT"
    processes: int
    threads: int  # per process
    cores: str
    times_ms: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    samples: int = 0
    gain_vs_slowest_pct: float = 0.0
    other_load: list[float | None] = field(default_factory=list)  # others' share of the CPUs, per repeat
    reruns: int = 0  # disturbed runs thrown away and run again

    @property
    def other_load_max_pct(self) -> float | None:
        return _max_pct(self.other_load)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def samples_per_s(self) -> float:
        return self.samples / (self.median_ms / 1000.0) if self.median_ms > 0 else 0.0


@dataclass
class AffinityReport:
    settings: BenchSettings
    facts: DataFacts
    machine: Machine
    steps: int  # optimizer steps of one process per configuration (layouts: split over P processes)
    rows: list[AffinityRow]


def default_affinity_counts(n_cores: int) -> list[int]:
    """Powers of two up to the core count, and the core count itself (1, 2, 4, 8 as in the paper)."""
    counts = [1 << i for i in range(n_cores.bit_length()) if 1 << i <= n_cores]
    if counts[-1] != n_cores:
        counts.append(n_cores)
    return counts


def parse_affinity(text: str, cores: list[int] | None = None) -> list[list[int]]:
    """`1,2,4,8` (core counts: the first N allowed cores) or explicit sets separated by ';' (`0;0,1;0-3`).

    A list without ';' whose items are all plain numbers is read as counts; anything else as sets
    (a single explicit set: end it with ';', as in `0,1;`). Sets beyond this machine are refused
    with CoresError naming how many cores exist.
    """
    cores = allowed_cores() if cores is None else cores
    text = text.strip()
    if not text:
        raise CoresError("empty --affinity; give counts like 1,2,4,8 or sets like 0;0,1;0-3")
    items = [t.strip() for t in text.split(",")]
    if ";" not in text and all(t.isdigit() for t in items):
        sets = []
        for t in items:
            count = int(t)
            if count < 1:
                raise CoresError(f"affinity {count}: a set needs at least one core")
            if count > len(cores):
                raise CoresError(f"affinity {count} needs {count} cores, but this machine lets this process use "
                                 f"only {len(cores)} (cores {format_cores(cores)})")
            sets.append(cores[:count])
        return sets
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        chosen = parse_cores(part)
        try:
            validate_cores(chosen, cores)
        except CoresError as exc:
            raise CoresError(f"affinity set {part}: {exc}") from None
        out.append(chosen)
    if not out:
        raise CoresError(f"no core set in --affinity {text!r}")
    return out


def parse_layouts(text: str, cores: list[int] | None = None) -> list[tuple[int, int]]:
    """`1x2,2x1`: P processes x T threads each; refused when P*T exceeds the allowed cores."""
    cores = allowed_cores() if cores is None else cores
    out = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            continue
        p, sep, t = item.partition("x")
        if not sep or not p.isdigit() or not t.isdigit():
            raise ConfigError(f"cannot read layout {item!r}; write PxT, e.g. 1x2,2x1")
        core_groups(int(p), int(t), cores)  # validates against this machine
        out.append((int(p), int(t)))
    if not out:
        raise ConfigError(f"no layout in --layout {text!r}")
    return out


def _affinity_label(chosen: list[int], counts: bool, cores: list[int]) -> str:
    return str(len(chosen)) if counts and chosen == cores[: len(chosen)] else format_cores(chosen)


def run_affinity(settings: BenchSettings, *, sets: list[list[int]] | None = None,
                 layouts: list[tuple[int, int]] | None = None, counts: bool = True,
                 progress: bool = False) -> AffinityReport:
    """The CPU-affinity sweep (the paper's Table 1) and the processes x threads layout sweep.

    Each affinity set trains `epochs` passes in one fresh process pinned to exactly those cores with
    as many torch threads; each layout splits the same steps over P DDP processes of T threads. Every
    configuration runs `repeats` times in fresh processes, round-robin, and is timed from the moment
    its data and model are ready to the end of training (evaluation afterwards, untimed).
    """
    cores = allowed_cores()
    if sets is None and layouts is None:
        sets = [cores[:c] for c in default_affinity_counts(len(cores))]
    machine = machine_info()
    facts = data_facts(settings)
    spec, where = settings.spec(), settings.where()
    steps = steps_for(settings.epochs * facts.train, settings.batch_size)
    rows: list[AffinityRow] = []
    plans: list[tuple[AffinityRow, Callable[[], TrainOutcome]]] = []
    for chosen in sets or []:
        validate_cores(chosen, cores)
        row = AffinityRow("affinity", _affinity_label(chosen, counts, cores), 1, len(chosen), format_cores(chosen))
        plans.append((row, partial(_pinned, edgetrain_serial, [chosen], TrainJob(spec, where, steps=steps))))
    for p, t in layouts or []:
        groups = core_groups(p, t, cores)
        row = AffinityRow("layout", f"{p}x{t}", p, t, "; ".join(format_cores(g) for g in groups))
        job = TrainJob(spec, where, steps=steps_for(steps * settings.batch_size, settings.batch_size, p))
        plans.append((row, partial(_pinned, torch_ddp, groups, job)))
    with _progress(progress, len(plans) * settings.repeats, "bench affinity") as step:
        for rep in range(settings.repeats):
            for row, runner in plans:
                step(f"{row.sweep} {row.label} (repeat {rep + 1}/{settings.repeats})")
                m = _measured(settings, runner)
                out = m.outcome
                row.other_load.append(m.other_load)
                row.reruns += m.reruns
                step(_result_line(m, out.train_seconds))
                row.times_ms.append(out.train_seconds * 1000.0)
                row.accuracies.append(out.accuracy)
                row.samples = out.samples
    rows = [row for row, _ in plans]
    fill_gains(rows)
    machine = Machine(**{**machine.__dict__, "load_after": load_average()})
    return AffinityReport(settings, facts, machine, steps, rows)


def _pinned(target: Callable[..., TrainOutcome], groups: list[list[int]], job: TrainJob) -> TrainOutcome:
    return combine(run_pinned(target, groups, job))


def chosen_layout(report: AffinityReport) -> AffinityRow | None:
    """The layout row `--workers auto`'s rule (edgetrain.split.pick) would choose from this sweep, if it has any."""
    layouts = [r for r in report.rows if r.sweep == "layout" and r.times_ms]
    if not layouts:
        return None
    best = pick([Trial(r.processes, r.threads, r.samples_per_s) for r in layouts])
    return next(r for r in layouts if (r.processes, r.threads) == (best.processes, best.threads))


def chosen_sentence(report: AffinityReport) -> str | None:
    row = chosen_layout(report)
    if row is None:
        return None
    return (f"`--workers auto` would choose {row.label} ({row.samples_per_s:.0f} samples/s): the fastest layout, "
            f"or the one with the fewest processes within {TIE:.0%} of it")


def fill_gains(rows: list[AffinityRow]) -> None:
    """The paper's "% gain vs slowest": (slowest mean - mean) / slowest mean * 100, within each sweep."""
    for sweep in {r.sweep for r in rows}:
        group = [r for r in rows if r.sweep == sweep]
        slowest = max(r.mean_ms for r in group)
        for r in group:
            r.gain_vs_slowest_pct = (slowest - r.mean_ms) / slowest * 100.0 if slowest > 0 else 0.0


# ---------------------------------------------------------------------------- tables


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


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
        out.append([r.method, f"{r.processes}x{r.threads}", r.cores, *times, _num(r.time_s, ".2f"),
                    _num(r.time_to_target_s, ".2f"), _num(acc, ".2f"), _num(r.samples_per_s, ".0f"),
                    _ratio(r.speedup_vs_serial), _ratio(r.speedup_vs_ddp), _num(r.other_load_max_pct, ".0f"),
                    str(r.reruns), r.note])
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


def affinity_headers(repeats: int) -> list[str]:
    return ["sweep", "affinity", "processes x threads", "cores", *(f"time ms r{i + 1}" for i in range(repeats)),
            "mean ms", "median ms", "% gain vs slowest", "test accuracy %", "samples/s", "other load % (max)", "reruns"]


def affinity_cells(report: AffinityReport) -> list[list[str]]:
    return [[r.sweep, r.label, f"{r.processes}x{r.threads}", r.cores, *(f"{t:.0f}" for t in r.times_ms),
             f"{r.mean_ms:.0f}", f"{r.median_ms:.0f}", f"{r.gain_vs_slowest_pct:.2f}", f"{r.accuracy * 100:.2f}",
             f"{r.samples_per_s:.0f}", _num(r.other_load_max_pct, ".0f"), str(r.reruns)] for r in report.rows]


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(s.replace("|", "\\|") for s in items) + " |"

    align = ["---" if i < 1 or h in ("cores", "note", "method", "sweep") else "---:" for i, h in enumerate(headers)]
    return "\n".join([line(headers), "| " + " | ".join(align) + " |", *(line(c) for c in cells)])


_SHORT = {  # the terminal table's headers (the Markdown and CSV keep the long ones)
    "processes x threads": "PxT", "time s (median)": "median s", "time to target s": "to target s",
    "test accuracy %": "acc %", "speed-up vs serial": "vs serial", "speed-up vs DDP": "vs DDP",
    "% gain vs slowest": "gain %", "mean ms": "mean", "median ms": "median", "other load % (max)": "other %",
}


def rich_table(title: str, headers: Sequence[str], cells: Sequence[Sequence[str]], caption: str = "") -> Table:
    table = Table(title=title, caption=caption or None)
    for h in headers:
        short = _SHORT.get(h, h.removeprefix("time s ").removeprefix("time ms "))
        table.add_column(short, justify="left" if h in ("method", "sweep", "cores", "note") else "right")
    for c in cells:
        table.add_row(*c)
    return table


def _settings_line(s: BenchSettings, model: str) -> str:
    return (f"data set `{s.dataset}` (limit {s.limit or 'none'}), model `{model}`, {s.epochs:g} epoch(s), "
            f"batch {s.batch_size} per worker, {s.optimizer} lr {s.spec().lr or default_lr(model):g} "
            f"(x{s.lr_decay:g} per epoch), "
            f"seed {s.seed}, {s.repeats} repeat(s)")


def parallel_markdown(report: ParallelReport, command: str = "") -> str:
    s, p = report.settings, report.plan
    parts = [
        f"# bench parallel: {s.dataset}, {report.facts.model}",
        "",
        f"- Machine: {report.machine.describe()}",
        f"- Settings: {_settings_line(s, report.facts.model)}",
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


def affinity_markdown(report: AffinityReport, command: str = "") -> str:
    s = report.settings
    parts = [
        f"# bench affinity: {s.dataset}, {report.facts.model}",
        "",
        f"- Machine: {report.machine.describe()}",
        f"- Settings: {_settings_line(s, report.facts.model)}",
        f"- Work: {report.steps} steps of batch {s.batch_size} ({report.steps * s.batch_size} samples) per "
        "configuration; layouts split those steps over their P processes.",
    ]
    if command:
        parts.append(f"- Command: `{command}`")
    parts += ["", markdown_table(affinity_headers(s.repeats), affinity_cells(report)), ""]
    chosen = chosen_sentence(report)
    if chosen:
        parts += [f"- {chosen}", ""]
    parts += ["Processing time: training only, from data and model ready to the last step (the test evaluation "
              "afterwards is not timed). % gain vs slowest = (slowest mean - mean) / slowest mean x 100 within "
              "each sweep, as in the paper's Table 1. samples/s uses the median. Other load: the share of all CPUs "
              "that processes outside the benchmark used during a run (max over repeats); reruns: runs thrown away "
              f"because it exceeded {report.settings.max_other_load:g} % (--max-other-load).", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- CSV


def parallel_csv(report: ParallelReport, path: Path) -> Path:
    reps = report.settings.repeats
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "description", "processes", "threads_per_process", "cores",
                    *(f"time_s_r{i + 1}" for i in range(reps)), "time_s", "time_to_target_s", "test_accuracy",
                    "samples", "samples_per_s", "speedup_vs_serial", "speedup_vs_ddp", "other_load_max_pct", "reruns",
                    "note"])
        for r in report.rows:
            times = [repr(t) for t in r.times_s] + [""] * (reps - len(r.times_s))
            w.writerow([r.method, r.description, r.processes, r.threads, r.cores, *times, _raw(r.time_s),
                        _raw(r.time_to_target_s), _raw(r.accuracy), r.samples, _raw(r.samples_per_s),
                        _raw(r.speedup_vs_serial), _raw(r.speedup_vs_ddp), _raw(r.other_load_max_pct), r.reruns,
                        r.note])
    return path


def affinity_csv(report: AffinityReport, path: Path) -> Path:
    reps = report.settings.repeats
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sweep", "affinity", "processes", "threads_per_process", "cores",
                    *(f"time_ms_r{i + 1}" for i in range(reps)), "mean_ms", "median_ms", "gain_vs_slowest_pct",
                    "test_accuracy", "samples", "samples_per_s", "other_load_max_pct", "reruns"])
        for r in report.rows:
            w.writerow([r.sweep, r.label, r.processes, r.threads, r.cores, *(repr(t) for t in r.times_ms),
                        repr(r.mean_ms), repr(r.median_ms), repr(r.gain_vs_slowest_pct), repr(r.accuracy),
                        r.samples, repr(r.samples_per_s), _raw(r.other_load_max_pct), r.reruns])
    return path


def _raw(value: float | None) -> str:
    return "" if value is None else repr(value)


# ---------------------------------------------------------------------------- PNG


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


def affinity_png(report: AffinityReport, path: Path) -> Path:
    """Table 1 as a chart: processing time per affinity set (bars: mean, dots: repeats), gain labelled."""
    from matplotlib.figure import Figure

    rows = report.rows
    fig = Figure(figsize=(max(5.0, 1.3 * len(rows) + 3), 4.2), layout="constrained")
    ax, ax_s = fig.subplots(1, 2)
    xs = list(range(len(rows)))
    labels = [r.label if r.sweep == "affinity" else f"{r.label} (DDP)" for r in rows]
    bars = ax.bar(xs, [r.mean_ms for r in rows], color=["#3b75af" if r.sweep == "affinity" else "#55a868"
                                                         for r in rows])
    for x, r, b in zip(xs, rows, bars, strict=True):
        for t in r.times_ms:
            ax.plot([x], [t], marker="o", color="black", markersize=3)
        ax.annotate(f"{r.gain_vs_slowest_pct:.1f}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("affinity (processors) or layout PxT")
    ax.set_ylabel("processing time (ms), mean; dots: repeats")
    ax.set_title("time (label: % gain vs slowest)")
    ax_s.bar(xs, [r.samples_per_s for r in rows], color="#e1812c")
    ax_s.set_xticks(xs, labels)
    ax_s.set_ylabel("samples/s (median)")
    ax_s.set_title("throughput")
    fig.suptitle(f"{report.settings.dataset} / {report.facts.model}: {report.steps} steps of "
                 f"{report.settings.batch_size}, {report.settings.repeats} repeats")
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------- all outputs


def write_parallel(report: ParallelReport, out: Path, command: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "parallel.md"
    md.write_text(parallel_markdown(report, command), encoding="utf-8")
    return [md, parallel_csv(report, out / "parallel.csv"), parallel_png(report, out / "parallel.png")]


def write_affinity(report: AffinityReport, out: Path, command: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "affinity.md"
    md.write_text(affinity_markdown(report, command), encoding="utf-8")
    return [md, affinity_csv(report, out / "affinity.csv"), affinity_png(report, out / "affinity.png")]
