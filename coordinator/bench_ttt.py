"""Time to target: `coordinator bench parallel --until accuracy=0.99`, the paper's Figure 1 run for real.

Every method trains until its test figure reaches the target (or a budget of epochs is spent), evaluated
at the same points (every `cadence` training samples, the same sample counts for every method) and with the
evaluations taken off its clock the same way: the clock runs while the method trains and stops while it
evaluates. Methods:

* serial: one process on all allowed cores (edgetrain's own training loop, `experiments.edgetrain_serial`);
* torch DDP over N pinned processes (`experiments.baselines.torch_ddp`);
* edgetrain over N pinned local agents through the real coordinator, at K=1 and at the K it finds best: a
  throughput probe of every candidate K, and the smallest K within `K_TIE` of the fastest (more local steps
  than that only cost accuracy);
* a GPU (serial loop on CUDA) when torch sees one;
* the ceiling: N pinned processes that never synchronise, their samples/s over serial's, measured in the same
  run: what any data-parallel method can get from these cores at most.

One rule sets the hyper-parameters of every method (`HyperRule`): the same effective batch (N x the per-worker
batch: serial takes it in one process, DDP and edgetrain as N workers of the per-worker batch), the same learning
rate (the base rate x sqrt(N), for that effective batch), no warm-up, the same per-epoch decay, the same seed and
so the same initial weights.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.console import Console

from edgetrain.cores import allowed_cores, format_cores, split_cores
from edgetrain.errors import ConfigError
from edgetrain.models import default_lr
from edgetrain.pinned import run_pinned
from edgetrain.recipes import METRICS
from edgetrain.spec import RunSpec
from edgetrain.training import EvalResult

from . import experiments as ex
from .config import CoordinatorConfig
from .experiments.baselines import TrainJob, TrainOutcome, combine, torch_ddp
from .run import Coordinator
from .runlog import RoundRecord

K_CANDIDATES = (1, 2, 4, 8, 16)
K_TIE = 0.03  # the best K: the smallest whose samples/s is within this share of the fastest candidate's
PROBE_ROUNDS_AT_KMAX = 4  # the K probe times this many rounds of the largest K (the same samples for every K)
CEILING_EPOCHS = 0.25  # each half of the ceiling's measurement (serial, then N unsynchronised) trains this much...
CEILING_MIN_STEPS = 40  # ...and at least this many steps (the first steps allocate)


# ---------------------------------------------------------------------------- what is asked


@dataclass(frozen=True)
class Target:
    """`metric=value`: the test figure every method trains to."""

    metric: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric} >= {self.value:g}"


def parse_target(text: str) -> Target:
    """`accuracy=0.99` or `macro-f1=0.6` (a fraction); anything else is a ConfigError that says what is wrong."""
    metric, sep, value = text.strip().partition("=")
    metric = metric.strip().lower()
    if not sep:
        raise ConfigError(f"--until {text!r}: write METRIC=VALUE, e.g. accuracy=0.99 or macro-f1=0.6")
    if metric not in METRICS:
        raise ConfigError(f"--until {text!r}: the metric is one of {', '.join(METRICS)}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"--until {text!r}: {value.strip()!r} is not a number") from None
    if not 0 < number <= 1:
        raise ConfigError(f"--until {text!r}: the target is a fraction in (0, 1]")
    return Target(metric, number)


def parse_ks(text: str) -> tuple[int, ...]:
    """`1,2,4,8,16`: the local steps per round the K search tries (sorted, each at least 1)."""
    out = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ConfigError(f"--ks {text!r}: {item!r} is not a whole number of local steps >= 1")
        out.add(int(item))
    if not out:
        raise ConfigError(f"--ks {text!r}: give at least one K, e.g. 1,2,4,8,16")
    return tuple(sorted(out))


@dataclass(frozen=True)
class HyperRule:
    """The one rule for every method's hyper-parameters (see the module's docstring)."""

    agents: int  # N: DDP processes and edgetrain agents
    per_worker_batch: int  # b
    base_lr: float  # the rate for a batch of b
    optimizer: str
    lr_decay: float  # x per epoch of the training split, every method
    seed: int
    momentum: float = 0.0  # SGD's

    @property
    def effective_batch(self) -> int:
        return self.agents * self.per_worker_batch

    @property
    def lr(self) -> float:
        """The base rate x sqrt(N): square-root scaling to the effective batch, the same for every method."""
        return self.base_lr * math.sqrt(self.agents)

    def spec(self, base: RunSpec, workers: int) -> RunSpec:
        """The spec of a method that spreads each step of the effective batch over `workers` processes."""
        if self.effective_batch % workers:
            raise ConfigError(f"an effective batch of {self.effective_batch} does not split over {workers} workers")
        return base.with_(batch_size=self.effective_batch // workers, lr=self.lr, optimizer=self.optimizer,
                          momentum=self.momentum, lr_decay=self.lr_decay, seed=self.seed)

    def describe(self) -> str:
        return (f"effective batch {self.effective_batch} for every method ({self.agents} x {self.per_worker_batch}; "
                f"serial: one batch of {self.effective_batch}); {self.optimizer} at lr {self.lr:.4g} = "
                f"{self.base_lr:g} x sqrt({self.agents}) for every method; no warm-up; "
                f"lr x{self.lr_decay:g} per epoch; "
                f"seed {self.seed} (same initial weights and data order for every method); no per-method tuning")


def hyper_rule(settings: ex.BenchSettings, model: str, agents: int) -> HyperRule:
    return HyperRule(agents, settings.batch_size, settings.lr or default_lr(model), settings.optimizer,
                     settings.lr_decay, settings.seed, settings.momentum)


@dataclass(frozen=True)
class TTTPlan:
    """Where every method evaluates and how long it may train, in training samples (the same for all)."""

    agents: int
    per_worker_batch: int
    ks: tuple[int, ...]
    cadence: int  # evaluate after every this many samples: a whole number of rounds at every candidate K
    budget: int  # the most samples any method trains (a multiple of cadence)
    n_train: int

    @property
    def step_samples(self) -> int:
        return self.agents * self.per_worker_batch  # one step of every worker: one effective batch

    def steps(self, samples: int) -> int:
        """Steps of the effective batch (serial) or of every DDP rank, for `samples` samples."""
        return samples // self.step_samples

    def rounds(self, samples: int, k: int) -> int:
        return samples // (self.step_samples * k)

    def epochs(self, samples: int) -> float:
        return samples / self.n_train


def plan_ttt(n_train: int, agents: int, per_worker_batch: int, ks: Sequence[int], eval_every_epochs: float,
             max_epochs: float) -> TTTPlan:
    if not eval_every_epochs > 0:
        raise ConfigError(f"--eval-every-epochs must be positive, got {eval_every_epochs}")
    if not max_epochs >= eval_every_epochs:
        raise ConfigError(f"--epochs {max_epochs:g} allows no evaluation every {eval_every_epochs:g} epochs")
    unit = agents * per_worker_batch * math.lcm(*ks)
    cadence = max(1, round(eval_every_epochs * n_train / unit)) * unit
    budget = max(1, math.ceil(max_epochs * n_train / cadence)) * cadence
    return TTTPlan(agents, per_worker_batch, tuple(ks), cadence, budget, n_train)


def first_reach(trace: Sequence[tuple[float, float]], target: float) -> float | None:
    """The clock of the first evaluation in `(seconds, figure)` whose figure reaches `target`, else None."""
    return next((t for t, v in trace if v >= target), None)


# ---------------------------------------------------------------------------- edgetrain, timed like the others


class EvalTimedCoordinator(Coordinator):
    """The real coordinator, its evaluations timed (to take them off its clock) and stopped once `target` holds.

    Its evaluations pause the rounds: on the after-work thread they would overlap training, and taking their
    seconds off the clock would then credit edgetrain with time it never lost.
    """

    evaluate_inline = True

    def __init__(self, cfg: CoordinatorConfig, target: Target | None) -> None:
        super().__init__(cfg, console=Console(stderr=True, quiet=True))
        self.target = target
        self.evaluations: list[tuple[int, float, float]] = []  # (rounds completed, seconds, test figure)

    def _evaluate(self, state: dict[str, torch.Tensor]) -> tuple[EvalResult, EvalResult | None]:
        assert self.engine is not None
        t0 = time.perf_counter()
        test, val = super()._evaluate(state)
        figure = test.value(self.target.metric if self.target else "accuracy")
        self.evaluations.append((self.engine.completed_rounds, time.perf_counter() - t0, figure))
        if self.target is not None and figure >= self.target.value:
            self.stop.set()  # the run loop ends after this round's record, as after a Ctrl-C
        return test, val


def coordinator_outcome(history: Sequence[RoundRecord], evaluations: Sequence[tuple[int, float, float]],
                        wall: float, target: float | None) -> TrainOutcome:
    """A coordinator run as the other methods report theirs.

    The clock of each evaluation is its round's `elapsed_seconds` minus the agents' start-up
    (`experiments.startup_seconds`) minus every earlier evaluation: a round's record takes its time before its
    own evaluation runs (inline, `EvalTimedCoordinator`), and the rounds after it waited for that evaluation.
    """
    lost = ex.startup_seconds(history)
    evaluated = {rounds: (seconds, figure) for rounds, seconds, figure in evaluations}
    trace: list[tuple[float, float]] = []
    spent = 0.0
    samples = 0
    for h in history:
        samples += h.samples
        if h.round + 1 in evaluated:
            seconds, figure = evaluated[h.round + 1]
            trace.append((max(0.0, h.elapsed_seconds - lost - spent), figure))
            spent += seconds
    all_evals = sum(seconds for _, seconds, _ in evaluations)
    final = evaluations[-1][2] if evaluations else 0.0
    reached = first_reach(trace, target) if target is not None else None
    return TrainOutcome(seconds=wall - lost, train_seconds=wall - lost - all_evals, samples=samples, accuracy=final,
                        time_to_target=reached, cores=tuple(allowed_cores()), threads=1, evals=tuple(trace))


def edgetrain_ttt(spec: RunSpec, settings: ex.BenchSettings, agents: int, k: int, rounds: int, eval_every: int,
                  target: Target | None) -> tuple[TrainOutcome, list[RoundRecord]]:
    """N pinned local agents through the real coordinator, K local steps a round, evaluated every `eval_every`."""
    cfg = CoordinatorConfig(spec=spec, where=settings.where(), port=0, local_agents=agents, min_agents=agents,
                            local_steps=k, rounds=rounds, join_timeout=300.0, eval_every=eval_every, progress=False,
                            metric=target.metric if target else "")
    coordinator = EvalTimedCoordinator(cfg, target)
    result = coordinator.run()
    reached = target is not None and any(f >= target.value for _, _, f in coordinator.evaluations)
    if not reached and result.completed_rounds < rounds:
        raise ConfigError(f"edgetrain run stopped after {result.completed_rounds} of {rounds} rounds "
                          f"({result.stopped_by})")
    outcome = coordinator_outcome(result.history, coordinator.evaluations, result.wall_seconds,
                                     target.value if target else None)
    return outcome, result.history


def edgetrain_rate(history: Sequence[RoundRecord]) -> float:
    """samples/s from round 1 to the second-last round (round 0 starts the agents, the last one evaluates)."""
    timed = history[1:-1]
    wall = history[-2].elapsed_seconds - history[0].elapsed_seconds
    return sum(h.samples for h in timed) / wall if wall > 0 else 0.0


def median_sync_ms(history: Sequence[RoundRecord]) -> float | None:
    values = [h.sync_overhead_seconds for h in history[1:]]
    return 1e3 * statistics.median(values) if values else None


# ---------------------------------------------------------------------------- the report


@dataclass
class TTTRow(ex.ParallelRow):
    """A method of the time-to-target mode: `times_s` are training seconds until it stopped."""

    k: int | None = None  # edgetrain's local steps per round
    traces: list[tuple[tuple[float, float], ...]] = field(default_factory=list)  # (training s, figure), per repeat
    sync_ms: list[float] = field(default_factory=list)  # edgetrain: median sync overhead per round, per repeat
    rate: float | None = None  # the ceiling row: samples/s of the unsynchronised processes

    @property
    def samples_per_s(self) -> float | None:
        if self.rate is not None:
            return self.rate
        return super().samples_per_s


@dataclass
class KProbe:
    k: int
    samples_per_s: float
    sync_ms: float | None
    other_load: float | None = None  # share of all CPUs other processes used meanwhile


@dataclass
class TTTReport:
    settings: ex.BenchSettings
    plan: TTTPlan
    rule: HyperRule
    target: Target
    facts: ex.DataFacts
    machine: ex.Machine
    rows: list[TTTRow]
    probes: list[KProbe]
    best_k: int
    ceilings: list[tuple[float, float]]  # (serial samples/s, N unsynchronised processes' samples/s), each measurement
    ceiling_loads: list[float | None] = field(default_factory=list)  # others' CPU share in each half of each

    @property
    def ceiling(self) -> float:
        """N unsynchronised processes' samples/s over serial's: the mean of the measurements' ratios."""
        return statistics.fmean(free / one for one, free in self.ceilings)

    def row(self, method: str) -> TTTRow | None:
        return next((r for r in self.rows if r.method == method), None)

    def edgetrain_best(self) -> TTTRow | None:
        return self.row(f"edgetrain K={self.best_k}")


def choose_k(probes: Sequence[KProbe], tie: float = K_TIE) -> int:
    """The smallest K whose samples/s is within `tie` of the fastest probe's."""
    fastest = max(p.samples_per_s for p in probes)
    return min(p.k for p in probes if p.samples_per_s >= (1 - tie) * fastest)


def fill_ttt_ratios(report: TTTReport) -> None:
    """Speed-ups are ratios of times to target (the ceiling's: of samples/s, the limit they are read against)."""
    serial, ddp = report.row("serial"), report.row("torch-ddp")
    t_serial = serial.time_to_target_s if serial else None
    t_ddp = ddp.time_to_target_s if ddp else None
    for r in report.rows:
        if r.method == "ceiling":
            r.speedup_vs_serial = report.ceiling
            continue
        t = r.time_to_target_s
        r.speedup_vs_serial = t_serial / t if t_serial and t else None
        r.speedup_vs_ddp = t_ddp / t if t_ddp and t else None
        if not r.skipped and len([x for x in r.targets_s if x is not None]) < len(r.times_s):
            reached = sum(x is not None for x in r.targets_s)
            r.note = (f"{r.note}; " if r.note else "") + f"target reached in {reached}/{len(r.times_s)} runs"


def verdict(report: TTTReport) -> list[str]:
    """The issue's targets, each met or not, with the figures that decide them and what limits edgetrain."""
    lines: list[str] = []
    best, serial, ddp = report.edgetrain_best(), report.row("serial"), report.row("torch-ddp")
    if best is None or serial is None:
        return lines
    t_best = best.time_to_target_s
    for other in (ddp, serial):
        if other is None:
            continue
        t_other = other.time_to_target_s
        if t_best is None:
            lines.append(f"{best.method} did not reach {report.target}: not ahead of {other.method}")
        elif t_other is None:
            lines.append(f"{best.method} reached {report.target} in {t_best:.1f} s; {other.method} did not: ahead")
        else:
            met = "met" if t_best <= t_other else "NOT met"
            lines.append(f"{best.method} {t_best:.1f} s vs {other.method} {t_other:.1f} s to {report.target}: "
                         f"no later than {other.method} {met}")
    if best.speedup_vs_serial is not None and report.ceiling > 0:
        share = best.speedup_vs_serial / report.ceiling
        met = "met" if share >= 0.9 else "NOT met"
        lines.append(f"speed-up over serial {best.speedup_vs_serial:.2f}x = {share:.2f} x the ceiling's "
                     f"{report.ceiling:.2f}x (target >= 0.90): {met}")
    lines += limits(report)
    return lines


def limits(report: TTTReport) -> list[str]:
    """Speed-up to target = (serial's samples to target / edgetrain's) x (edgetrain's samples/s / serial's)."""
    out = []
    serial = report.row("serial")
    for r in report.rows:
        if not r.method.startswith("edgetrain") or serial is None or not r.times_s or not serial.times_s:
            continue
        rate, s_rate = r.samples_per_s, serial.samples_per_s
        s_need, need = _samples_to_target(serial, report), _samples_to_target(r, report)
        parts = [f"{r.method}: samples/s {rate:.0f} = {rate / s_rate:.2f}x serial's (ceiling {report.ceiling:.2f}x)"
                 if rate and s_rate else f"{r.method}: samples/s unknown"]
        if s_need and need:
            parts.append(f"epochs to target {report.plan.epochs(need):.2f} vs serial's {report.plan.epochs(s_need):.2f}"
                         f" ({s_need / need:.2f}x serial's sample efficiency)")
        if r.sync_ms:
            parts.append(f"sync overhead per round {statistics.median(r.sync_ms):.1f} ms (median)")
        out.append("; ".join(parts))
    return out


def _samples_to_target(row: TTTRow, report: TTTReport) -> int | None:
    """Training samples until the first evaluation at the target (evaluations are every `cadence` samples)."""
    for trace in row.traces:
        for i, (_, figure) in enumerate(trace):
            if figure >= report.target.value:
                return (i + 1) * report.plan.cadence
    return None


def _load_note(share: float | None) -> str:
    return "" if share is None else f", other load {share * 100:.0f} %"


def ttt_headers(target: Target) -> list[str]:
    return ["method", "processes x threads", "cores", "K", f"time to {target} s", f"final test {target.metric} %",
            "epochs", "samples/s", "speed-up vs serial", "speed-up vs DDP", "runs", "other load % (max)", "reruns",
            "note"]


def ttt_cells(report: TTTReport) -> list[list[str]]:
    out = []
    for r in report.rows:
        acc = None if r.accuracy is None else r.accuracy * 100
        epochs = report.plan.epochs(r.samples) if r.samples and r.method != "ceiling" else None
        out.append([r.method, f"{r.processes}x{r.threads}", r.cores, "-" if r.k is None else str(r.k),
                    ex.num_cell(r.time_to_target_s, ".1f"), ex.num_cell(acc, ".2f"), ex.num_cell(epochs, ".2f"),
                    ex.num_cell(r.samples_per_s, ".0f"), ex.ratio_cell(r.speedup_vs_serial),
                    ex.ratio_cell(r.speedup_vs_ddp), str(len(r.times_s)), ex.num_cell(r.other_load_max_pct, ".0f"),
                    str(r.reruns), r.note])
    return out


def ttt_markdown(report: TTTReport, command: str = "") -> str:
    p, s = report.plan, report.settings
    probes = ", ".join(f"K={pr.k} {pr.samples_per_s:.0f}/s" + (f" (sync {pr.sync_ms:.0f} ms" if pr.sync_ms else " (")
                       + _load_note(pr.other_load) + ")" for pr in report.probes)
    parts = [
        f"# bench parallel --until {report.target.metric}={report.target.value:g}: {s.dataset}, {report.facts.model}",
        "",
        f"- Machine: {report.machine.describe()}",
        f"- Data: {report.facts.train} training and {report.facts.test} test examples (limit {s.limit or 'none'})",
        f"- Hyper-parameter rule: {report.rule.describe()}",
        f"- Evaluation: every {p.cadence} training samples ({p.epochs(p.cadence):.3f} epochs) for every method, on "
        f"the whole test split; the clock stops while a method evaluates. Budget: {p.epochs(p.budget):.2f} epochs.",
        f"- K search: {probes}; best K = {report.best_k} (the smallest K within {K_TIE:.0%} of the fastest).",
        f"- Ceiling: {p.agents} unsynchronised pinned processes over serial, training "
        f"{CEILING_EPOCHS:g} epochs each, before and after the methods: "
        + ", ".join(f"{free:.0f}/s over {one:.0f}/s = {free / one:.2f}x" for one, free in report.ceilings)
        + f"; mean {report.ceiling:.2f}x; other load at most "
        + (f"{ex.max_pct(report.ceiling_loads):.0f} %." if ex.max_pct(report.ceiling_loads) is not None else "?."),
    ]
    if command:
        parts.append(f"- Command: `{command}`")
    parts += ["", ex.markdown_table(ttt_headers(report.target), ttt_cells(report)), ""]
    parts += [f"- {line}" for line in verdict(report)]
    parts += ["", "Time to target: training seconds (evaluations excluded) from the moment the method's processes "
              "were ready to the first evaluation at the target; median over runs (`runs` column; one run per "
              "method when each lasts minutes). Speed-ups are ratios of those times; the ceiling's is its samples/s "
              "over serial's. Epochs and samples/s: until the method stopped (at the target or the budget).", ""]
    return "\n".join(parts)


def ttt_csv(report: TTTReport, path: Path) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "description", "processes", "threads_per_process", "cores", "k", "time_to_target_s",
                    "final_figure", "metric", "samples", "epochs", "samples_per_s", "speedup_vs_serial",
                    "speedup_vs_ddp", "runs", "other_load_max_pct", "reruns", "note", "eval_every_samples", "trace"])
        for r in report.rows:
            trace = ";".join(f"{t:.3f}:{v:.5f}" for t, v in (r.traces[0] if r.traces else ()))
            w.writerow([r.method, r.description, r.processes, r.threads, r.cores, "" if r.k is None else r.k,
                        ex.csv_cell(r.time_to_target_s), ex.csv_cell(r.accuracy), report.target.metric, r.samples,
                        ex.csv_cell(report.plan.epochs(r.samples) if r.samples else None), ex.csv_cell(r.samples_per_s),
                        ex.csv_cell(r.speedup_vs_serial), ex.csv_cell(r.speedup_vs_ddp), len(r.times_s),
                        ex.csv_cell(r.other_load_max_pct), r.reruns, r.note, report.plan.cadence, trace])
    return path


def ttt_png(report: TTTReport, path: Path) -> Path:
    """Test figure against training seconds, every method (first run), the target as a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5), layout="constrained")
    ax = fig.subplots()
    for r in report.rows:
        if r.method == "ceiling":
            continue
        if not r.traces:
            ax.plot([], [], label=f"{r.method}: {r.note or 'no run'}")
            continue
        xs, ys = zip(*r.traces[0], strict=True)
        reached = r.targets_s[0] if r.targets_s else None
        label = f"{r.method}: " + (f"{reached:.0f} s" if reached is not None else "not reached")
        ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=label)
    ax.axhline(100 * report.target.value, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("training seconds (evaluations excluded)")
    ax.set_ylabel(f"test {report.target.metric} (%)")
    low = min((v for r in report.rows for t in r.traces[:1] for _, v in t), default=report.target.value)
    ax.set_ylim(max(0.0, 100 * min(low, report.target.value) - 1), 100 * max(1.0, report.target.value) + 0.2)
    lows = sorted(v for r in report.rows for t in r.traces[:1] for _, v in t)
    if lows:  # show the approach to the target, not the first evaluations far below it
        ax.set_ylim(max(100 * lows[len(lows) // 10] - 1, 0.0), 100 * min(1.0, max(lows[-1], report.target.value))
                    + 0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{report.settings.dataset} / {report.facts.model}, {report.plan.agents} workers: time to "
                 f"{report.target} (ceiling {report.ceiling:.2f}x serial)")
    fig.savefig(path, dpi=110)
    return path


def _pinned_outcome(groups: list[list[int]], job: TrainJob) -> TrainOutcome:
    return combine(run_pinned(ex.edgetrain_serial, groups, job))


def write_ttt(report: TTTReport, out: Path, command: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "parallel-ttt.md"
    md.write_text(ttt_markdown(report, command), encoding="utf-8")
    return [md, ttt_csv(report, out / "parallel-ttt.csv"), ttt_png(report, out / "parallel-ttt.png")]


# ---------------------------------------------------------------------------- the run


def run_ttt(settings: ex.BenchSettings, target: Target, *, agents: int | None = None,
            ks: Sequence[int] = K_CANDIDATES, eval_every_epochs: float = 0.25, progress: bool = False,
            gpu: bool | None = None) -> TTTReport:
    """Every method to `target` under one hyper-parameter rule; `settings.epochs` is the budget."""
    cores = allowed_cores()
    n = agents if agents is not None else len(cores)
    ex.check_agents(n, cores)
    machine = ex.machine_info()
    facts = ex.data_facts(settings)
    plan = plan_ttt(facts.train, n, settings.batch_size, ks, eval_every_epochs, settings.epochs)
    rule = hyper_rule(settings, facts.model, n)
    base = settings.spec().with_(model=facts.model)
    serial_spec, worker_spec = rule.spec(base, 1), rule.spec(base, n)
    groups = split_cores(cores, n)
    threads = len(groups[0])
    where = settings.where()
    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    joined = "; ".join(format_cores(g) for g in groups)

    def job(spec: RunSpec, device: str = "cpu") -> TrainJob:
        return TrainJob(spec, where, steps=plan.steps(plan.budget), eval_every=plan.steps(plan.cadence),
                        target_accuracy=target.value, metric=target.metric, stop_at_target=True, device=device)

    probes: list[KProbe] = []
    sync: dict[int, list[float]] = {}

    def edgetrain(k: int) -> TrainOutcome:
        out, history = edgetrain_ttt(worker_spec, settings, n, k, plan.rounds(plan.budget, k),
                                     plan.rounds(plan.cadence, k), target)
        ms = median_sync_ms(history)
        if ms is not None:
            sync.setdefault(k, []).append(ms)
        return out

    def probe(k: int) -> None:
        rounds = plan.rounds(plan.step_samples * max(ks) * PROBE_ROUNDS_AT_KMAX, k) + 2  # + start-up, last round
        histories: list[list[RoundRecord]] = []

        def run() -> TrainOutcome:
            out, history = edgetrain_ttt(worker_spec, settings, n, k, rounds, rounds, None)
            histories.append(history)
            return out

        m = ex.measure(settings, run)  # waits for quiet, runs again when disturbed, as the methods' runs
        probes.append(KProbe(k, edgetrain_rate(histories[-1]), median_sync_ms(histories[-1]), m.other_load))

    ceiling_steps = max(CEILING_MIN_STEPS, plan.steps(int(CEILING_EPOCHS * facts.train)))
    ceilings: list[tuple[float, float]] = []  # (serial samples/s, unsynchronised samples/s): before and after

    ceiling_loads: list[float | None] = []

    def ceiling() -> str:
        one, free = (ex.measure(settings, partial(_pinned_outcome, on, TrainJob(spec, where, steps=ceiling_steps)))
                     for on, spec in (([cores], serial_spec), (groups, worker_spec)))
        ceilings.append((one.outcome.samples / one.outcome.train_seconds,
                         free.outcome.samples / free.outcome.train_seconds))
        ceiling_loads.extend((one.other_load, free.other_load))
        return f"  -> serial {ceilings[-1][0]:.0f}/s, unsynchronised {ceilings[-1][1]:.0f}/s"

    with ex.progress_steps(progress, len(ks) + 1, "bench parallel --until: K search and ceiling") as step:
        for k in ks:
            step(f"edgetrain K={k}")
            probe(k)
            step(f"  -> {probes[-1].samples_per_s:.0f} samples/s")
        step(f"ceiling: serial, then {n} unsynchronised processes")
        step(ceiling())
    best_k = choose_k(probes)
    rows = [
        TTTRow("serial", "one process, all cores as torch threads (edgetrain.training loop)", 1, len(cores),
               format_cores(cores)),
        TTTRow("torch-ddp", f"torch DistributedDataParallel, {n} pinned processes, gloo on loopback", n, threads,
               joined),
        TTTRow("edgetrain K=1", f"coordinator + {n} pinned local agents over gRPC, 1 local step/round", n,
               threads, joined, k=1),
    ]
    runners: dict[str, Callable[[], TrainOutcome]] = {
        "serial": lambda: combine(run_pinned(ex.edgetrain_serial, [cores], job(serial_spec))),
        "torch-ddp": lambda: combine(run_pinned(torch_ddp, groups, job(worker_spec))),
        "edgetrain K=1": lambda: edgetrain(1),
    }
    if best_k != 1:
        rows.append(TTTRow(f"edgetrain K={best_k}", f"coordinator + {n} pinned local agents over gRPC, "
                           f"{best_k} local steps/round (the K search's best)", n, threads, joined, k=best_k))
        runners[rows[-1].method] = lambda: edgetrain(best_k)
    else:
        rows[-1].note = "the K search's best"
    gpu_row = TTTRow("gpu", "one process on CUDA (edgetrain.training loop)", 1, len(cores), "cuda:0")
    rows.append(gpu_row)
    if use_gpu:
        runners["gpu"] = lambda: combine(run_pinned(ex.edgetrain_serial, [cores], job(serial_spec, "cuda")))
    else:
        gpu_row.note = "skipped: torch sees no CUDA device"
    with ex.progress_steps(progress, len(runners) * settings.repeats + 1, f"bench parallel --until {target}") as step:
        for rep in range(settings.repeats):
            for row in (r for r in rows if r.method in runners):
                step(f"{row.method} (run {rep + 1}/{settings.repeats})")
                m = ex.measure(settings, runners[row.method])
                out = m.outcome
                row.other_load.append(m.other_load)
                row.reruns += m.reruns
                row.times_s.append(out.train_seconds)
                row.targets_s.append(out.time_to_target)
                row.accuracies.append(out.accuracy)
                row.traces.append(out.evals)
                row.samples = out.samples
                reached = "not reached" if out.time_to_target is None else f"{out.time_to_target:.1f} s"
                step(f"  -> to target {reached}, final {out.accuracy:.4f}, {plan.epochs(out.samples):.2f} epochs")
        step("ceiling again: serial, then unsynchronised")  # the machine drifts over minutes: before and after
        step(ceiling())
    for row in rows:
        if row.k is not None:
            row.sync_ms = sync.get(row.k, [])
    rows.append(TTTRow("ceiling", f"{n} pinned processes that never synchronise (edgetrain.training loop), "
                       "samples/s over serial's (mean of before and after the methods)", n, threads, joined,
                       rate=statistics.fmean(f for _, f in ceilings)))
    machine = ex.Machine(**{**machine.__dict__, "load_after": ex.load_average()})
    report = TTTReport(settings, plan, rule, target, facts, machine, rows, probes, best_k, ceilings, ceiling_loads)
    fill_ttt_ratios(report)
    return report
