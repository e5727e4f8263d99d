"""What every experiment shares: its settings, the machine it ran on, other load, one measured run, the serial loop.

The serial baseline (`edgetrain_serial`) is here because every experiment runs it: `bench parallel`, `bench
affinity` and `bench parallel --until` (coordinator/bench_ttt.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from edgetrain.cores import allowed_cores, format_cores
from edgetrain.errors import ConfigError, CoresError
from edgetrain.pinned import ChildSetup
from edgetrain.recipes import LR_DECAY
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.split import cpu_model_name

from .baselines import TrainJob, TrainOutcome


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
    momentum: float = 0.0  # SGD's
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
                       lr=self.lr, optimizer=self.optimizer, momentum=self.momentum, lr_decay=self.lr_decay,
                       max_len=self.max_len,
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


def measure(settings: BenchSettings, runner: Callable[[], TrainOutcome]) -> Measured:
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


def max_pct(shares: Sequence[float | None]) -> float | None:
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


def check_agents(agents: int, cores: list[int]) -> None:
    if agents < 1:
        raise ConfigError(f"--agents must be at least 1, got {agents}")
    if agents > len(cores):
        raise CoresError(
            f"--agents {agents} needs {agents} disjoint cores, but this process may use only {len(cores)} "
            f"(cores {format_cores(cores)})"
        )


@contextmanager
def progress_steps(progress: bool, total: int, what: str) -> Iterator[Callable[[str], None]]:
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


def result_line(m: Measured, seconds: float) -> str:
    other = "?" if m.other_load is None else f"{m.other_load * 100:.0f} %"
    return f"  -> {seconds:.2f} s, other load {other}, reruns {m.reruns}"


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
