"""`coordinator bench affinity`: the CPU-affinity sweep (the paper's Table 1) and the processes x threads sweep."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from edgetrain.cores import allowed_cores, format_cores, parse_cores, validate_cores
from edgetrain.errors import ConfigError, CoresError
from edgetrain.pinned import core_groups, run_pinned
from edgetrain.split import TIE, Trial, pick

from .baselines import TrainJob, TrainOutcome, combine, steps_for, torch_ddp
from .common import (
    BenchSettings,
    DataFacts,
    Machine,
    data_facts,
    edgetrain_serial,
    load_average,
    machine_info,
    max_pct,
    measure,
    progress_steps,
    result_line,
)
from .tables import csv_cell, markdown_head, markdown_table, num_cell, write_csv, write_report


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
        return max_pct(self.other_load)

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
    with progress_steps(progress, len(plans) * settings.repeats, "bench affinity") as step:
        for rep in range(settings.repeats):
            for row, runner in plans:
                step(f"{row.sweep} {row.label} (repeat {rep + 1}/{settings.repeats})")
                m = measure(settings, runner)
                out = m.outcome
                row.other_load.append(m.other_load)
                row.reruns += m.reruns
                step(result_line(m, out.train_seconds))
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


def affinity_headers(repeats: int) -> list[str]:
    return ["sweep", "affinity", "processes x threads", "cores", *(f"time ms r{i + 1}" for i in range(repeats)),
            "mean ms", "median ms", "% gain vs slowest", "test accuracy %", "samples/s", "other load % (max)", "reruns"]


def affinity_cells(report: AffinityReport) -> list[list[str]]:
    return [[r.sweep, r.label, f"{r.processes}x{r.threads}", r.cores, *(f"{t:.0f}" for t in r.times_ms),
             f"{r.mean_ms:.0f}", f"{r.median_ms:.0f}", f"{r.gain_vs_slowest_pct:.2f}", f"{r.accuracy * 100:.2f}",
             f"{r.samples_per_s:.0f}", num_cell(r.other_load_max_pct, ".0f"), str(r.reruns)] for r in report.rows]


def affinity_markdown(report: AffinityReport, command: str = "") -> str:
    s = report.settings
    parts = [
        *markdown_head("affinity", s, report.facts.model, report.machine.describe()),
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


def affinity_csv(report: AffinityReport, path: Path) -> Path:
    reps = report.settings.repeats
    header = ["sweep", "affinity", "processes", "threads_per_process", "cores",
              *(f"time_ms_r{i + 1}" for i in range(reps)), "mean_ms", "median_ms", "gain_vs_slowest_pct",
              "test_accuracy", "samples", "samples_per_s", "other_load_max_pct", "reruns"]
    return write_csv(path, header, ([r.sweep, r.label, r.processes, r.threads, r.cores, *(repr(t) for t in r.times_ms),
                                     repr(r.mean_ms), repr(r.median_ms), repr(r.gain_vs_slowest_pct), repr(r.accuracy),
                                     r.samples, repr(r.samples_per_s), csv_cell(r.other_load_max_pct), r.reruns]
                                    for r in report.rows))


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


def write_affinity(report: AffinityReport, out: Path, command: str = "") -> list[Path]:
    return write_report(out, "affinity", affinity_markdown(report, command), partial(affinity_csv, report),
                        partial(affinity_png, report))
