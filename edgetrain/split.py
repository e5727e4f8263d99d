"""The best split of a set of cores into processes x threads, found by measuring it (`--workers auto`).

The paper's Table 1 found that the fastest affinity is not "all cores in one process", and which split wins
depends on the model and the machine. So edgetrain measures it where it will run, with the pinned children and the
plain step loop that `coordinator bench affinity --layout` uses too (`edgetrain.pinned`), and keeps the answer.

The rule:

- Candidates: every P x T with P * T = the number of cores (every core used), P = 1, ..., n over n's divisors.
- Each candidate runs in fresh processes pinned to its core groups, on the run's model, data and batch:
  `WARMUP_STEPS` untimed steps (the first steps allocate), then timed steps; `ROUNDS` (2) times, in the order
  A B ... B A, keeping its best rate: other processes on the cores only ever slow a measurement down (a
  multi-threaded process by 10x and more: its threads wait for each other at every barrier). `mode` "ddp"
  all-reduces gradients every step (an agent's workers); "lockstep" trains each process alone and waits for the
  others every `sync_every` steps (local agents with K local steps per round).
- Budget: the timed steps of all candidates and rounds together train at most `PROBE_SHARE` (5 %) of the samples
  a default run trains (`DEFAULT_EPOCHS` passes over the training split), shared equally by the runs, between
  `MIN_STEPS` and `MAX_STEPS` steps per process (on a small data set the minimum a timing needs wins). Starting
  the processes and loading the data comes on top: the probe prints its wall time beside the default run's time
  it estimates (docs/performance.md has figures).
- Choice: the highest samples/s. Candidates within `TIE` (3 %) of it count as tied, and the one with the fewest
  processes wins among them (less memory, fewer messages); a measurement cannot tell them apart reliably.
- Cache: the choice is kept in `splits.json` in the data cache folder (`$EDGETRAIN_CACHE`), keyed by model and
  what sizes its steps, the cores, the mode and the machine (CPU model, logical CPUs, torch version), so the
  next start with the same key is instant.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from edgetrain.cores import format_cores
from edgetrain.errors import ConfigError
from edgetrain.spec import DataLocation, RunSpec

DEFAULT_EPOCHS = 3.0  # `coordinator run` without a stopping rule trains this many passes
PROBE_SHARE = 0.05  # the probe's timed samples, as a share of a default run's
WARMUP_STEPS = 3
MIN_STEPS = 8  # per process: fewer cannot be timed against the clock's and the OS's noise
MAX_STEPS = 60  # per process: more tells nothing new about a split's speed
TIE = 0.03  # within this share of the fastest, the fewer processes win
ROUNDS = 2  # measurements of each candidate (the best counts)
MODES = ("ddp", "lockstep")
CACHE_FILE = "splits.json"


@dataclass(frozen=True)
class Trial:
    """One candidate split as measured."""

    processes: int
    threads: int
    samples_per_s: float
    steps: int = 0  # timed steps per process
    seconds: float = 0.0  # the slowest process's timed training

    @property
    def label(self) -> str:
        return f"{self.processes}x{self.threads}"


@dataclass(frozen=True)
class Split:
    """The chosen split, what was tried, and where the answer came from."""

    processes: int
    threads: int
    trials: tuple[Trial, ...]
    key: str
    cached: bool = False
    probe_seconds: float = 0.0  # wall time of the probe, start-up of its processes included
    default_run_seconds: float = 0.0  # a default run's training at the chosen split's speed (estimate)

    @property
    def label(self) -> str:
        return f"{self.processes}x{self.threads}"

    def summary(self) -> str:
        source = "cached" if self.cached else (
            f"probe {self.probe_seconds:.1f} s = {self.probe_share_pct:.0f} % of a default run's training at this "
            f"speed (~{self.default_run_seconds:.0f} s; its wall time adds start-up, rounds and evaluation)")
        return f"split {self.label} (processes x threads) chosen: fastest, fewer processes on a {TIE:.0%} tie; {source}"

    @property
    def probe_share_pct(self) -> float:
        return 100.0 * self.probe_seconds / self.default_run_seconds if self.default_run_seconds > 0 else 0.0


def parse_count(text: str, option: str) -> int | None:
    """`--workers` / `--local-agents`: a number, or `auto` (None: measure the split)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option} takes a number or auto, not {text!r}") from None


def candidates(n_cores: int) -> list[tuple[int, int]]:
    """Every P x T using all `n_cores` cores, fewest processes first: 4 -> 1x4, 2x2, 4x1."""
    if n_cores < 1:
        raise ConfigError(f"no split of {n_cores} cores")
    return [(p, n_cores // p) for p in range(1, n_cores + 1) if n_cores % p == 0]


def pick(trials: Sequence[Trial]) -> Trial:
    """The rule: the fastest; within TIE of it, the fewest processes (then the fastest of those)."""
    if not trials:
        raise ConfigError("no split was measured")
    best = max(t.samples_per_s for t in trials)
    tied = [t for t in trials if t.samples_per_s >= (1.0 - TIE) * best]
    return min(tied, key=lambda t: (t.processes, -t.samples_per_s))


def probe_steps(n_train: int, batch_size: int, processes: int, n_candidates: int) -> int:
    """Timed steps per process for one candidate (see the module's rule)."""
    per_candidate = PROBE_SHARE * DEFAULT_EPOCHS * n_train / max(1, n_candidates)
    return max(MIN_STEPS, min(MAX_STEPS, math.floor(per_candidate / (processes * batch_size))))


def machine_key() -> str:
    """What identifies the machine for the cache: CPU model, logical CPUs, torch version.

    Not the host name: a pod's changes at every restart, the hardware does not.
    """
    import torch

    return f"{cpu_model_name()} x{os.cpu_count() or 0}; torch {torch.__version__}"


def cpu_model_name() -> str:
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_key(spec: RunSpec, cores: Sequence[int], mode: str, sync_every: int) -> str:
    """Model (a data set's default is named by the data set), what sizes its steps, the cores, mode and machine."""
    sync = f" sync {sync_every}" if mode == "lockstep" else ""
    return (f"{spec.model or 'default model'} on {spec.dataset} (batch {spec.batch_size}, max_len {spec.max_len}, "
            f"{spec.optimizer}); cores {format_cores(list(cores))}; {mode}{sync}; {machine_key()}")


def cache_path(cache_dir: Path | None = None) -> Path:
    from edgetrain.datasets.download import default_cache_dir

    return (cache_dir or default_cache_dir()) / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return data if isinstance(data, dict) else {}


def cached_split(key: str, cache_dir: Path | None = None) -> Split | None:
    entry = _read_cache(cache_path(cache_dir)).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        trials = tuple(Trial(**t) for t in entry["trials"])
        return Split(int(entry["processes"]), int(entry["threads"]), trials, key, cached=True)
    except (KeyError, TypeError, ValueError):
        return None


def store_split(split: Split, cache_dir: Path | None = None) -> Path | None:
    """Keep the answer; a cache that cannot be written only costs the next start a probe (None)."""
    path = cache_path(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[split.key] = {"processes": split.processes, "threads": split.threads,
                           "trials": [asdict(t) for t in split.trials], "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def probe(spec: RunSpec, where: DataLocation, cores: Sequence[int], *, mode: str = "ddp", sync_every: int = 1,
          say: Callable[[str], None] | None = None) -> Split:
    """Measure every candidate split of `cores` in fresh pinned processes (see the module's rule)."""
    from edgetrain.pinned import StepJob, core_groups, run_pinned, timed_steps
    from edgetrain.workload import load_workload

    if mode not in MODES:
        raise ConfigError(f"split probe mode {mode!r}: use one of {', '.join(MODES)}")
    t0 = time.perf_counter()
    n_train = len(load_workload(spec, where).data.train)  # sizes the probe; the children load their own copy
    options = candidates(len(cores))
    best_of: dict[tuple[int, int], Trial] = {}
    for r in range(ROUNDS):
        for p, t in options if r % 2 == 0 else options[::-1]:
            steps = probe_steps(n_train, spec.batch_size, p, len(options) * ROUNDS)
            if say is not None:
                say(f"probing {p}x{t} on cores {format_cores(list(cores))} ({r + 1}/{ROUNDS}): {WARMUP_STEPS} + "
                    f"{steps} steps per process")
            job = StepJob(spec, where, steps=WARMUP_STEPS + steps, warmup_steps=WARMUP_STEPS, sync_every=sync_every)
            ranks = run_pinned(timed_steps, core_groups(p, t, list(cores)), job, mode)
            seconds = max(o.seconds for o in ranks)  # a split is as fast as its slowest process
            rate = sum(o.samples for o in ranks) / seconds if seconds > 0 else 0.0
            if rate > best_of.get((p, t), Trial(p, t, -1.0)).samples_per_s:
                best_of[(p, t)] = Trial(p, t, rate, steps, seconds)
    trials = [best_of[o] for o in options]
    best = pick(trials)
    wall = time.perf_counter() - t0
    default_run = DEFAULT_EPOCHS * n_train / best.samples_per_s if best.samples_per_s > 0 else 0.0
    return Split(best.processes, best.threads, tuple(trials), cache_key(spec, cores, mode, sync_every),
                 probe_seconds=wall, default_run_seconds=default_run)


def choose_split(spec: RunSpec, where: DataLocation, cores: Sequence[int], *, mode: str = "ddp", sync_every: int = 1,
                 cache_dir: Path | None = None, before_probe: Callable[[], None] | None = None,
                 say: Callable[[str], None] | None = None) -> Split:
    """The cached answer for this key, else a probe (whose answer is then cached); `before_probe` runs first."""
    key = cache_key(spec, cores, mode, sync_every)
    if len(cores) == 1:  # nothing to choose
        return Split(1, 1, (Trial(1, 1, 0.0),), key)
    hit = cached_split(key, cache_dir)
    if hit is not None:
        return hit
    if before_probe is not None:
        before_probe()
    split = probe(spec, where, cores, mode=mode, sync_every=sync_every, say=say)
    store_split(split, cache_dir)
    return split


def split_table(split: Split, title: str = "") -> Table:
    """The candidates tried (or cached), the chosen one marked."""
    table = Table(title=title or f"core split: {split.key.split(';')[0]}")
    for col in ("processes x threads", "timed steps/process", "timed s", "samples/s", "chosen"):
        table.add_column(col, justify="right")
    for t in split.trials:
        table.add_row(t.label, str(t.steps), f"{t.seconds:.2f}", f"{t.samples_per_s:.0f}",
                      "<-" if (t.processes, t.threads) == (split.processes, split.threads) else "")
    table.caption = split.summary()
    return table
