"""The coordinator's driver: load the workload, serve, wait for agents, run rounds, evaluate, checkpoint, report."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgetrain import recipes, serde
from edgetrain.cli_util import new_folder_kept_only_if_used, output_folder
from edgetrain.cores import allowed_cores, format_cores, pin_current_process, split_cores
from edgetrain.errors import ConfigError, EdgetrainError
from edgetrain.httpmetrics import MetricsServer
from edgetrain.memory import compute_heap, tune_malloc
from edgetrain.procs import Forked, Waiting, fork_waiting, may_fork
from edgetrain.recipes import Metric
from edgetrain.records import NodeStats
from edgetrain.training import EvalResult, evaluate, state_of
from edgetrain.workload import Workload, label_counts, load_workload

from . import checkpoint
from .adapt import Adaptation, Adapter
from .admission import with_newcomers_capped
from .afterwork import AfterWork
from .cadence import Cadence
from .config import CoordinatorConfig
from .membership import Membership
from .metrics import CoordinatorMetrics
from .rounds import Outcome, RoundEngine
from .runlog import LOG, Figures, LogWriter, RoundRecord, trim_log
from .server import start_server
from .service import ServiceState
from .stragglers import NodeTimes, slowest

log = logging.getLogger("edgetrain.coordinator")


class TrainingError(EdgetrainError):
    """Training could not go on: too few agents, local agents died, a round got no updates."""


@dataclass
class NodeSummary:
    """One node's figures summed over the run's rounds, for the summary table and the straggler line.

    Not a NodeStats: those are one round's figures (the log keeps them per round); this adds them up (rounds,
    samples, seconds, bytes), keeps the last round's accuracy and loss, and counts the rounds it missed.
    """

    name: str
    rounds: int = 0
    samples: int = 0
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    last_accuracy: float = 0.0
    last_loss: float = 0.0
    bytes: float = 0.0  # its updates' tensor bytes, as received
    missed: int = 0  # applied rounds that closed without its update
    downloaded: float = 0.0  # the float32 weights handed to it with the rounds it sent updates for

    def times(self) -> NodeTimes:
        return NodeTimes(self.rounds, self.compute_seconds, self.communication_seconds, self.bytes, self.missed,
                         self.downloaded)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.compute_seconds if self.compute_seconds > 0 else 0.0


@dataclass
class RunResult:
    completed_rounds: int
    wall_seconds: float
    final: EvalResult | None
    history: list[RoundRecord]
    nodes: dict[str, NodeSummary]
    run_dir: Path | None
    samples: int
    stopped_by: str
    time_to_target: float | None = None
    sync_overheads: list[float] = field(default_factory=list)  # round wall time minus slowest compute
    choice: Choice | None = None  # the model kept (best on val) and what it scores
    startup_seconds: float = 0.0  # from the command (Coordinator's `started_at`) to the first round
    training_share: float = 0.0  # the nodes' mean time in training steps over `wall_seconds`
    adaptation: Adaptation | None = None  # the last K and upload dtype the rounds asked for, and why (auto)
    auto: tuple[str, ...] = ()  # what was auto: "K", "dtype", and "timed" for timed rounds


@dataclass
class _Tally:
    """What `Coordinator.run` gathers round by round, for its RunResult."""

    history: deque[RoundRecord]  # the records kept (all, or the last one)
    choice: Choice
    samples: int  # every sample trained so far, a resumed run's included
    nodes: dict[str, NodeSummary] = field(default_factory=dict)
    overheads: list[float] = field(default_factory=list)
    stopped_by: str = "stop"
    time_to_target: float | None = None
    t_start: float = field(default_factory=time.perf_counter)  # when the first round could open


@dataclass
class Choice:
    """The run's model and its test (and val) figures.

    It is the round whose global model scored best on val by the run's metric (the last round's where there is
    no val split). Test never picks it.
    """

    metric: Metric
    classes: tuple[str, ...]
    round: int = -1  # rounds completed when it was evaluated (0: the initial model)
    val: EvalResult | None = None
    test: EvalResult | None = None
    majority: EvalResult | None = None  # the majority class of train, predicted for every test example
    state: dict[str, torch.Tensor] | None = None

    def value(self, result: EvalResult | None) -> float:
        return result.value(self.metric.name, self.metric.class_index) if result is not None else float("nan")

    def to_json(self) -> dict[str, Any]:
        def figures(r: EvalResult | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {"value": self.value(r), "accuracy": r.accuracy, "macro_f1": r.macro_f1,
                    "macro_recall": r.macro_recall, "loss": r.loss if math.isfinite(r.loss) else None, "n": r.n,
                    "per_class": [dict(zip(("precision", "recall", "f1", "support"), row, strict=True))
                                  for row in r.per_class()],
                    "confusion": [list(row) for row in r.confusion]}
        return {"metric": self.metric.name, "classes": list(self.classes), "round": self.round,
                "chosen_on": "val" if self.val is not None else "last round (no val split)",
                "val": figures(self.val), "test": figures(self.test), "majority": figures(self.majority)}


RESULT = "result.json"  # the kept model's figures: what `coordinator report` draws the confusion matrix from


def holds_run(run_dir: Path) -> bool:
    """A run folder with a run to go on with: its log or a checkpoint (what --resume needs, --auto-resume looks for).

    An older version's checkpoint counts too: --resume then says why it is not loaded and what to do.
    """
    return any((run_dir / name).exists() for name in (LOG, checkpoint.LATEST, checkpoint.LEGACY[0]))


def agent_cores(coordinator_cores: tuple[int, ...], warn: bool = True) -> list[int]:
    """The cores local agents share: this host's, less the coordinator's own (`--cores`) while any are left."""
    host = allowed_cores()
    rest = [c for c in host if c not in coordinator_cores]
    if coordinator_cores and not rest and warn:
        log.warning("--cores %s takes every core of this host: local agents share them with the coordinator",
                    format_cores(coordinator_cores))
    return rest or host


def _agent_main(token: str, argv: list[str]) -> int:
    """A forked local agent: the `python -m edgetrain.agent` command with `argv`, in this process (see procs).

    The command by its module name, as the spawned agents are started: the coordinator imports none of the
    agent's code. The token goes through the environment, as it does for them (never argv, which `ps` shows).
    """
    import runpy

    for handler in list(logging.root.handlers):  # the agent's --log-level configures its own, as in a new process
        logging.root.removeHandler(handler)
    os.environ["EDGETRAIN_TOKEN"] = token
    sys.argv = ["edge-agent", *argv]
    runpy.run_module("edgetrain.agent", run_name="__main__", alter_sys=True)  # exits with the agent's code
    return 0


def local_core_groups(n: int, cores: list[int] | None = None) -> list[list[int]]:
    """Disjoint core groups for n local agents; with more agents than cores, agents share cores round-robin."""
    cores = cores or allowed_cores()
    if n <= len(cores):
        return split_cores(cores, n)
    return [[cores[i % len(cores)]] for i in range(n)]


class Coordinator:
    """One training run. `run()` blocks until a stopping rule holds; `stop` ends it early but cleanly."""

    # True: each round's evaluation, log record and checkpoint pause the rounds (as with --target), for
    # benchmarks that time evaluations to take them off their clock; False: they overlap the next round.
    evaluate_inline = False

    def __init__(self, cfg: CoordinatorConfig, *, registry: CollectorRegistry | None = None,
                 stop: threading.Event | None = None, console: Console | None = None,
                 keep_history: bool = True, started_at: float | None = None, fork_agents: bool = False) -> None:
        """`keep_history` False: `RunResult.history` holds the last round's record only (the log has them all).

        `started_at`: when the command started (time.time(); default: now), whence the start-up time is counted.
        `fork_agents`: the caller (the command) has run neither gRPC nor torch in this process, so the local
        CPU agents may be forked (`_fork_local_agents`); a process that did, such as a test's, spawns them.
        """
        self.started_at = time.time() if started_at is None else started_at
        self.startup_seconds = 0.0  # from `started_at` to the first round
        self._final: EvalResult | None = None  # the global model's last figures on test
        self._logged = 0  # rounds completed when the last record was logged
        self._log: LogWriter | None = None  # opens the file with the first round's record: a run that never
        # trains leaves no log
        self.cfg = cfg
        self.keep_history = keep_history
        self.registry = registry or CollectorRegistry()
        self.metrics = CoordinatorMetrics(self.registry)
        self.stop = stop or threading.Event()
        self.console = console or Console(stderr=True)
        self.membership = Membership(on_leave=lambda agent: self.metrics.node_left(agent.name),
                                     max_agents=cfg.limits.max_agents)
        self.metrics.agents.set_function(lambda: len(self.membership))  # read at each scrape: always current
        self.workload: Workload | None = None
        self.engine: RoundEngine | None = None
        self.port = 0
        self.metrics_server: MetricsServer | None = None
        self.local_agents: list[subprocess.Popen[bytes] | Forked] = []
        self.fork_agents = fork_agents
        self._waiting: list[Waiting] = []  # forked local agents not yet told the address
        self._server: Any = None
        self._svc: ServiceState | None = None
        self._model: torch.nn.Module | None = None
        self.health: Any = None  # grpc_health HealthServicer: SERVING while the run goes, NOT_SERVING after
        self._failure = ""  # why run() failed: agents hear FAILED with it, never FINISHED
        self._checkpointed: int | None = None  # the round count of the last checkpoint on disk
        self._evals, self._saves = Cadence(1), Cadence(1)  # when to evaluate and checkpoint: set per run
        self._agents_apart = False  # local agents on cores other than the coordinator's own (--cores)
        self.adapter: Adapter | None = None  # K and the uploads' dtype from the links (coordinator/adapt.py)

    # ---- set-up
    def start(self) -> None:
        """Load the workload, serve, start local agents; on any failure undo what was started."""
        try:
            with new_folder_kept_only_if_used(self.cfg.run_dir):
                self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        cfg = self.cfg
        if cfg.run_dir is not None:
            self._check_run_dir(cfg.run_dir)  # before the data loads: a wrong folder is said at once
        groups = self._local_agent_groups()
        self._fork_local_agents()
        tune_malloc()  # after the fork: an agent keeps glibc's defaults (edgetrain.memory)
        self.workload = load_workload(cfg.spec, cfg.where, metric=cfg.metric, progress=cfg.progress)
        spec = self.workload.spec
        cfg = self.cfg = self._fill_in_recipe(cfg, self.workload)
        # only ever evaluated, on the global tensors themselves (`_evaluate`): nothing may write to its parameters
        self._model = self.workload.new_model().requires_grad_(False)
        state = state_of(self._model)
        completed, cursors = 0, {}
        if cfg.run_dir is not None:
            checkpoint.remove_stale_temps(cfg.run_dir)  # a coordinator killed mid-write leaves one
            if cfg.resume and any((cfg.run_dir / name).exists() for name in (checkpoint.LATEST, *checkpoint.LEGACY)):
                ck = checkpoint.load(cfg.run_dir, expected=state)  # checksum, names, shapes, dtypes, finite
                same_data = ck.meta.get("fingerprint") == spec.data_fingerprint
                if not same_data or ck.meta.get("model") != self.workload.model_name:
                    raise ConfigError(f"checkpoint in {cfg.run_dir} is from another data set or model")
                state, completed, cursors = ck.state, ck.completed_rounds, ck.cursors
                self._checkpointed = completed
                self.console.print(f"resuming from round {completed} ({cfg.run_dir / checkpoint.LATEST})")
            elif cfg.resume:  # the run stopped before its first checkpoint: round 0 again
                self.console.print(f"resuming from round 0 ({cfg.run_dir} has no checkpoint yet)")
            if cfg.resume:
                trim_log(cfg.run_dir / LOG, completed)
        self.engine = RoundEngine(
            state, batch_size=spec.batch_size, local_steps=cfg.local_steps or 1, round_timeout=cfg.round_timeout,
            aggregator=cfg.aggregator, trim=cfg.trim, balance=cfg.balance, completed_rounds=completed,
            timed=cfg.times_rounds,
            cursors=cursors, limits=cfg.limits, quorum=cfg.quorum,
        )
        shard_batches = len(self.workload.data.train) // max(1, cfg.min_agents) // max(1, spec.batch_size)
        self.adapter = Adapter(self.engine.local_steps, spec.update_dtype, serde.nbytes(serde.spec_of(state)),
                               k_auto=cfg.local_steps_auto, dtype_auto=cfg.update_dtype_auto,
                               k_max=shard_batches, max_round_seconds=cfg.round_timeout / 2)
        self.metrics.adapted(self.engine.local_steps, spec.update_dtype)
        self._svc = ServiceState(self.engine, self.membership, spec, self.metrics, min_agents=cfg.min_agents,
                                 upload_slots=cfg.upload_slots, staging_dir=cfg.staging_dir, limits=cfg.limits)
        self._svc.transfer.prepare_staging()
        self._server, self.port, self.health = start_server(
            self._svc, cfg.host, cfg.port, token=cfg.token, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
            tls_client_ca=cfg.tls_client_ca,
        )
        if cfg.metrics_port is not None:
            self.metrics_server = MetricsServer(self.registry, cfg.metrics_host, cfg.metrics_port,
                                                json_routes={"/sd": self.service_discovery})
        self._spawn_local_agents(groups)
        # after the local agents started: a child inherits its parent's affinity
        if cfg.cores and not pin_current_process(list(cfg.cores)):
            log.warning("--cores: this OS has no CPU affinity call; the coordinator runs unpinned")

    @staticmethod
    def _fill_in_recipe(cfg: CoordinatorConfig, workload: Workload) -> CoordinatorConfig:
        """K, the epochs and the metric the user left out: the recipe's for this model and data (recipes)."""
        data, model = workload.data, workload.model_name
        metric = cfg.metric or recipes.default_metric(data.name, data.classes, label_counts(data))
        recipes.resolve_metric(metric, data.classes)  # f1:<class> must name one of the data's classes
        agents = max(1, cfg.min_agents)
        steps = cfg.local_steps or recipes.local_steps(model, len(data.train), agents, workload.spec.batch_size)
        no_stop = cfg.rounds is None and cfg.epochs is None and cfg.target is None
        epochs = recipes.epochs(model, len(data.train)) if no_stop else cfg.epochs
        return replace(cfg, local_steps=steps, local_steps_auto=cfg.local_steps is None, epochs=epochs, metric=metric)

    def _check_run_dir(self, run_dir: Path) -> None:
        """With --resume, a folder holding a run; without, the folder made, holding no earlier run."""
        held = [name for name in (LOG, checkpoint.LATEST, checkpoint.MODEL, *checkpoint.LEGACY)
                if (run_dir / name).exists()]
        resumable = holds_run(run_dir)
        if self.cfg.resume:
            if not resumable:
                raise ConfigError(f"--resume: {run_dir} holds no run to go on with (no {checkpoint.LATEST}, no {LOG})")
            return
        output_folder(run_dir, "--run-dir")
        if held:
            advice = "pass --resume to go on with it, or name another folder" if resumable else "name another folder"
            raise ConfigError(f"--run-dir {run_dir} holds a run already ({', '.join(held)}): {advice}")

    def service_discovery(self) -> list[dict[str, Any]]:
        """Prometheus http_sd: one target group per agent that serves /metrics."""
        return [
            {"targets": [a.metrics_address], "labels": {"node": a.name}}
            for a in self.membership.live()
            if a.metrics_address
        ]

    def _local_agent_groups(self) -> list[list[int]]:
        """Each local agent's cores (CPU agents first, then one per --local-gpus device); warns of sharing."""
        cfg = self.cfg
        n = cfg.local_agents + len(cfg.local_devices)
        if n == 0:
            return []
        cores = agent_cores(cfg.cores)
        self._agents_apart = not set(cores) & set(cfg.cores)
        groups = local_core_groups(n, cores)
        used = sorted({c for g in groups for c in g})
        if n > len(used):
            log.warning("%d local agents on %d core(s) (%s): they share cores, round-robin", n, len(used),
                        format_cores(used))
        fewest = min(len(g) for g in groups)
        if cfg.local_workers > fewest:
            log.warning("--local-workers %d: a local agent has %d core(s); it runs one worker per core",
                        cfg.local_workers, fewest)
        return groups

    def _fork_local_agents(self) -> None:
        """The CPU agents' processes, forked now, before the data loads, gRPC or torch ran (see procs.may_fork).

        They skip the ~1.5 s import of torch each and wait for the coordinator's address (`_spawn_local_agents`).
        Only when the command asked for it (`fork_agents`) and this process may fork; otherwise they are
        spawned as `python -m edgetrain.agent` once the server listens.
        """
        if self.fork_agents and self.cfg.local_agents and may_fork():
            token = self.cfg.token or ""
            self._waiting = fork_waiting(self.cfg.local_agents, functools.partial(_agent_main, token),
                                         name="edge-agent")
            self.local_agents.extend(w.proc for w in self._waiting)

    def _spawn_local_agents(self, groups: list[list[int]]) -> None:
        cfg = self.cfg
        devices = list(cfg.local_devices)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        for i, cores in enumerate(groups):
            device = devices[i - cfg.local_agents] if i >= cfg.local_agents else "cpu"
            name = f"local-{i}" if device == "cpu" else f"gpu-{device.split(':')[-1]}"
            cmd = ["start", "--coordinator", f"{host}:{self.port}",
                   "--cores", format_cores(cores), "--name", name, "--device", device,
                   "--workers", str(min(cfg.local_workers, len(cores))), "--give-up-after", "60"]
            w = cfg.where
            if w.data_dir is not None:
                cmd += ["--data-dir", str(w.data_dir)]
            if w.data_path is not None:
                cmd += ["--data-path", str(w.data_path)]
            for option, path in (("--test-path", w.test_path), ("--val-path", w.val_path)):
                if path is not None:
                    cmd += [option, str(path)]
            if w.cache_dir is not None:
                cmd += ["--cache-dir", str(w.cache_dir)]
            if not w.download:
                cmd.append("--no-download")
            if cfg.token:
                cmd += ["--token-env", "EDGETRAIN_TOKEN"]
            if cfg.tls_cert is not None:
                cmd += ["--tls-ca", str(cfg.tls_cert)]
            if i < len(self._waiting):
                self._waiting[i].go(cmd)
                continue
            env = dict(os.environ, EDGETRAIN_TOKEN=cfg.token or "")
            self.local_agents.append(subprocess.Popen([sys.executable, "-m", "edgetrain.agent", *cmd], env=env))
        self._waiting = []

    # ---- the loop
    def _wait_for_agents(self) -> None:
        end = time.monotonic() + self.cfg.join_timeout
        assert self._svc is not None
        self._svc.sweep()
        while self.membership.ready_count() < self.cfg.min_agents:
            self._svc.sweep()
            if self.stop.is_set():
                return
            dead = [p for p in self.local_agents if p.poll() not in (None, 0)]
            if dead:
                raise TrainingError(f"{len(dead)} local agent(s) exited with code {dead[0].returncode} before joining")
            if time.monotonic() > end:
                raise TrainingError(
                    f"only {self.membership.ready_count()} of --min-agents {self.cfg.min_agents} ready in "
                    f"{self.cfg.join_timeout:.0f} s"
                )
            time.sleep(0.05)

    def _evaluate(self, state: dict[str, torch.Tensor]) -> tuple[EvalResult, EvalResult | None]:
        """The global model's figures on test, and on val where the data set has one."""
        assert self._model is not None and self.workload is not None
        # The model takes the global tensors themselves (it is only evaluated, without gradients): a copy kept a
        # third model-sized buffer beside the global model and the running sum for the whole run. It lets go of
        # them afterwards: with --eval-every N > 1 it kept an old global model alive until the next evaluation.
        self._model.load_state_dict(state, assign=True)
        data = self.workload.data
        try:
            with compute_heap():  # every activation a fresh mmap made this 1.6x slower (edgetrain.memory)
                test = evaluate(self._model, data.test.x, data.test.y, data.num_classes)
                val = evaluate(self._model, data.val.x, data.val.y, data.num_classes) if data.val else None
                return test, val
        finally:
            self._model.to("meta")  # shapes only, no storage: the next evaluation assigns tensors again

    def _new_choice(self) -> Choice:
        assert self.workload is not None
        data = self.workload.data
        choice = Choice(recipes.resolve_metric(self.cfg.metric, data.classes), data.classes)
        top = int(torch.bincount(data.train.y, minlength=data.num_classes).argmax())
        choice.majority = _constant_prediction(data.test.y, top, data.num_classes)
        return choice

    def _consider(self, choice: Choice, test: EvalResult, val: EvalResult | None, rounds: int,
                  state: dict[str, torch.Tensor]) -> None:
        """Keep this round's global model (`state`) if it is the best on val so far (every round's, with no val)."""
        better = val is None or choice.val is None or choice.value(val) > choice.value(choice.val)
        if better:
            choice.round, choice.val, choice.test = rounds, val, test
            # a copy: the engine's global tensors are replaced, not changed in place, but a copy is certain
            choice.state = {k: v.clone() for k, v in state.items()} if val is not None else None

    def _after_round(self, record: RoundRecord, state: dict[str, torch.Tensor] | None, evaluate: bool,
                     snap: dict[str, Any] | None, choice: Choice, history: deque[RoundRecord]) -> None:
        """A closed round's after-work: evaluate its global model `state`, log the record, checkpoint (`snap` given).

        Runs on the after-work thread (coordinator/afterwork.py), in the order rounds closed, while the agents
        train the next round; inline when a --target is judged.
        """
        cfg = self.cfg
        if evaluate:
            assert state is not None
            with self._evals.timed():
                final, val = self._evaluate(state)
            self._consider(choice, final, val, record.round + 1, state)
            record = replace(record, test=_figures(final, choice), val=None if val is None else _figures(val, choice))
            self.metrics.accuracy.set(final.accuracy)
            self.metrics.loss.set(final.loss)
            self.metrics.macro_f1.set(final.macro_f1)
            self.metrics.metric.labels(choice.metric.name).set(choice.value(final))
            self._final = final
        history.append(record)
        if cfg.run_dir is not None:
            if self._log is None:
                self._log = LogWriter(cfg.run_dir, append=cfg.resume)
            self._log.write(record)
        self._logged = record.round + 1  # once its record is on disk: a failed write does not count it
        if snap is not None:
            assert state is not None
            with self._saves.timed():
                self._checkpoint(state, snap)

    def _report_share(self, nodes: dict[str, NodeSummary], elapsed: float) -> float:
        """The training share so far: the nodes' mean time in training steps over the wall time since round 1.

        Into the gauge; returned (for the round's record, or the run's result).
        """
        computed = [s.compute_seconds for s in nodes.values()]
        share = sum(computed) / len(computed) / elapsed if computed and elapsed > 0 else 0.0
        self.metrics.training_share.set(share)
        return share

    def run(self) -> RunResult:
        if self.engine is None:
            self.start()
        assert self.engine is not None
        engine = self.engine
        self._logged = engine.completed_rounds
        # every round's record, for the benchmarks that read them; a long CLI run keeps the last one only (the soak
        # measured ~1.6 MB per 100 rounds of 32 agents held here), its log on disk has them all
        tally = _Tally(deque(maxlen=None if self.keep_history else 1), self._new_choice(),
                       samples=sum(engine.cursors.values()))  # every sample trained so far, a resumed run's included
        self._evals, self._saves = Cadence(self.cfg.eval_every), Cadence(self.cfg.checkpoint_every)
        threads = self._after_work_threads()
        after = AfterWork(init=(lambda: torch.set_num_threads(threads)) if threads else None)
        try:
            self._wait_for_agents()
            tally.t_start = time.perf_counter()
            self.startup_seconds = time.time() - self.started_at
            self.metrics.startup.set(self.startup_seconds)
            with self._progress() as progress:
                task = progress.add_task("training", total=self.cfg.rounds, acc="-", tput="-", slow="-")
                while not self.stop.is_set():
                    spent = self._budget_spent(tally.samples)
                    if spent is not None:
                        tally.stopped_by = spent
                        break
                    played = self._play_round()
                    if played is None:
                        continue
                    record = self._finish_round(*played, tally, after)
                    slow = max(record.nodes, key=lambda name: record.nodes[name].compute_seconds, default="-")
                    progress.update(task, advance=1, acc=f"{self._final.accuracy:.4f}" if self._final else "-",
                                    tput=f"{record.samples_per_second:.0f}", slow=slow)
                    if self._reached_target(record):
                        tally.time_to_target = record.elapsed_seconds
                        tally.stopped_by = "target"
                        break
            after.drain()
            return self._finish(tally)
        except checkpoint.CheckpointWriteError as exc:
            # Stop rather than train on without checkpoints: every round after the last one on disk would be
            # lost to the next crash, and the final model could not be written either (docs/security.md).
            # the rounds logged: the after-work of later rounds, if any closed meanwhile, was not done
            failed = TrainingError(f"{exc}; the run stopped after {self._logged} rounds, "
                                   f"{self._resume_hint()}")
            self._failure = str(failed)
            raise failed from exc
        except Exception as exc:
            self._failure = " ".join(str(exc).split()) or type(exc).__name__
            raise
        finally:
            after.close()
            if self._log is not None:
                self._log.close()
                self._log = None
            self.close()

    def _after_work_threads(self) -> int:
        """The thread count of the coordinator's tensor work (0: torch's default); torch keeps it process-wide.

        Local agents hold every core of this host: the coordinator's tensor work (the after-work thread's
        evaluation, the handlers adding updates) takes one thread, as the agent's own does (with torch's default,
        one per core, evaluation took ~4x longer, spinning meanwhile); pinned (--cores) apart from them, or with no
        local agents, one per core of its own.
        """
        cfg = self.cfg
        local = cfg.local_agents + len(cfg.local_devices)
        return len(cfg.cores) if cfg.cores and (self._agents_apart or not local) else (1 if local else 0)

    def _budget_spent(self, samples: int) -> str | None:
        """"rounds" or "epochs" once that budget is used up (`samples` trained so far), else None."""
        assert self.engine is not None and self.workload is not None
        if self.cfg.rounds is not None and self.engine.completed_rounds >= self.cfg.rounds:
            return "rounds"
        if self.cfg.epochs is not None and samples >= self.cfg.epochs * len(self.workload.data.train):
            return "epochs"
        return None

    def _play_round(self) -> tuple[Outcome, dict[str, str]] | None:
        """Open a round for the ready agents, wait for their updates, close it.

        Returns the applied outcome and the agents' names by id; None when no round was applied (stopped, nobody
        left, or a round to run again).
        """
        assert self.engine is not None
        cfg, engine = self.cfg, self.engine
        self._wait_for_agents()
        live = with_newcomers_capped(self.membership.live(ready_only=True), lambda a: engine.measured(a.agent_id),
                                     cfg.limits.newcomers_per_round)
        if self.stop.is_set() or not live:  # (none: the last agent left between the wait and now)
            return None
        min_updates = min(cfg.min_agents, len(live))
        engine.open_round([(a.agent_id, a.throughput, a.workers) for a in live], min_updates)
        for a in live:  # left or replaced since `live` was read: its forget() came too early
            if self.membership.get(a.agent_id) is None:
                engine.forget(a.agent_id)
        names = {a.agent_id: a.name for a in live}
        engine.wait_for_updates(self.stop)
        outcome = engine.close_round(min_updates=min_updates)
        if not self.stop.is_set() and not outcome.spoiled:  # a round cut short by a stop or by
            self._bench(outcome, names)  # a staged update's failed read is nobody's fault
            if outcome.missing:
                self.metrics.rounds_short.inc()
        if not outcome.applied:
            why = ("an average that overflows float32 (model kept)" if outcome.overflow
                   else "an update that failed while it was being added" if outcome.spoiled
                   else "too few updates")
            log.warning("round %d closed with %s; running it again", outcome.round, why)
            return None
        return outcome, names

    def _finish_round(self, outcome: Outcome, names: dict[str, str], tally: _Tally, after: AfterWork) -> RoundRecord:
        """An applied round's record; its after-work (evaluation, log, checkpoint) handed to `after`.

        With a --target the after-work is done here, the target judged before the next round opens (the record
        returned then carries its figures).
        """
        assert self.engine is not None
        cfg, engine = self.cfg, self.engine
        tally.samples += outcome.samples
        last = self._budget_spent(tally.samples) is not None  # the last round is evaluated and logged
        evaluated = last or cfg.target is not None or self._evals.due(engine.completed_rounds)
        if evaluated:
            self._evals.begin()
        record = self._record(outcome, names, tally.nodes, time.perf_counter() - tally.t_start)
        tally.overheads.append(record.sync_overhead_seconds)
        self._adapt(outcome)
        state = engine.global_state  # replaced by the next round, never changed: this round's
        # (the last round's checkpoint is the run's final one, which _finish writes in any case)
        due = cfg.run_dir is not None and not last and self._saves.due(engine.completed_rounds)
        snap = engine.snapshot() if due else None
        if snap is not None:
            self._saves.begin()
        held = evaluated or snap is not None
        job = functools.partial(self._after_round, record, state if held else None, evaluated, snap, tally.choice,
                                tally.history)
        if cfg.target is None and not self.evaluate_inline:  # the agents train the next round meanwhile
            after.submit(job, holds_state=held)
            return record
        job()
        return tally.history[-1]  # with its figures

    def _reached_target(self, record: RoundRecord) -> bool:
        """Whether this round reached the --target (with one, every round is evaluated: `_finish_round`)."""
        target, judged = self.cfg.target, record.judged
        return target is not None and judged is not None and judged >= target

    def _finish(self, tally: _Tally) -> RunResult:
        """The run's end: the final model's figures, the last checkpoint, the model kept and result.json."""
        assert self.engine is not None and self.adapter is not None
        cfg, engine, adapted = self.cfg, self.engine, self.adapter.choice
        final = self._final
        if final is None or (tally.history and tally.history[-1].test is None):
            final, val = self._evaluate(engine.global_state)
            self._consider(tally.choice, final, val, engine.completed_rounds, engine.global_state)
        wall = time.perf_counter() - tally.t_start
        share = self._report_share(tally.nodes, wall)
        choice = tally.choice
        if cfg.run_dir is not None:
            self._checkpoint(engine.global_state, engine.snapshot())
            # the model kept: the best round on val (the last round's without a val split)
            kept = choice.state if choice.state is not None else engine.global_state
            checkpoint.save_model(cfg.run_dir, kept, self._run_facts())
            result = {**choice.to_json(), "wall_seconds": wall, "startup_seconds": self.startup_seconds,
                      "training_share": share, "local_steps": adapted.local_steps,
                      "update_dtype": adapted.update_dtype, "auto": list(self._auto())}
            checkpoint.atomic_write_text(cfg.run_dir / RESULT, json.dumps(result, indent=1) + "\n")
        choice.state = None
        return RunResult(engine.completed_rounds, wall, final, list(tally.history), tally.nodes, cfg.run_dir,
                         tally.samples, tally.stopped_by, tally.time_to_target, tally.overheads, choice,
                         self.startup_seconds, share, adapted, self._auto())

    def _resume_hint(self) -> str:
        """After a failed write: what is kept on disk and how to go on."""
        assert self.cfg.run_dir is not None
        kept = ("no checkpoint yet, --resume starts from round 0" if self._checkpointed is None
                else f"its checkpoint after {self._checkpointed} rounds is intact")
        return f"{kept}; free space, then coordinator run --resume --run-dir {self.cfg.run_dir}"

    def _bench(self, outcome: Outcome, names: dict[str, str]) -> None:
        """Take agents that sent nothing out of the next rounds (the world shrinks; shards are reassigned).

        A straggler stays admitted: its late update is refused as "late" (and measures it, so rounds wait for it
        from then on) and its next GetRound makes it ready again. One that stays quiet is evicted by the sweep
        (coordinator/admission.py, Limits.idle_seconds); a restart under the same name replaces it at once.
        """
        for agent_id in outcome.missing:
            agent = self.membership.get(agent_id)
            if agent is not None:
                agent.ready = False
            log.warning("round %d closed without an update from %s (%s)", outcome.round, names.get(agent_id, agent_id),
                        "left or replaced" if agent is None else "out of the rounds until it asks for work again")

    def _auto(self) -> tuple[str, ...]:
        """What the coordinator chooses in this run: "K" and "dtype" (the link rule), "timed" (rounds by time)."""
        timed = self.engine is not None and self.engine.timed
        return ("K",) * self.cfg.local_steps_auto + ("dtype",) * self.cfg.update_dtype_auto + ("timed",) * timed

    def _adapt(self, outcome: Outcome) -> None:
        """Feed an applied round's updates to the auto rule; a changed K or dtype holds from the next round on."""
        assert self.adapter is not None and self.engine is not None
        for agent_id, c in outcome.contributions.items():
            agent = self.membership.get(agent_id)
            if agent is not None and not agent.local:  # an agent on this host has no link to adapt to
                self.adapter.observe(agent.name, c.stats, outcome.assignments[agent_id].local_steps, outcome.round)
        previous = self.adapter.choice
        new = self.adapter.decide(self.engine.completed_rounds)
        if new is None:
            return
        self.engine.local_steps, self.engine.update_dtype = new.local_steps, new.update_dtype
        self.metrics.adapted(new.local_steps, new.update_dtype)
        line = f"round {outcome.round}: {new.describe(previous)}"
        self.console.print(line)

    def _record(self, outcome: Outcome, names: dict[str, str], nodes: dict[str, NodeSummary],
                elapsed: float) -> RoundRecord:
        """An applied round's record (without its evaluation), `elapsed` seconds after the first round opened.

        The run's per-node summary and the round's gauges are brought up to date.
        """
        duration = outcome.closed_at - outcome.opened_at
        self.metrics.round.set(outcome.round + 1)
        self.metrics.round_duration.observe(duration)
        self.metrics.elapsed.set(elapsed)
        per_node: dict[str, NodeStats] = {}
        for agent_id, c in outcome.contributions.items():
            name = names.get(agent_id, agent_id)
            s = nodes.setdefault(name, NodeSummary(name))
            s.rounds += 1
            s.samples += c.samples
            s.compute_seconds += c.stats.compute_seconds
            s.communication_seconds += c.stats.communication_seconds
            s.bytes += c.stats.bytes
            s.downloaded += self.adapter.model_bytes if self.adapter is not None else c.stats.bytes
            s.last_accuracy = c.stats.accuracy
            s.last_loss = c.stats.loss
            per_node[name] = c.stats
        for agent_id in outcome.missing:  # named in the summary, not silently gone
            name = names.get(agent_id, agent_id)
            nodes.setdefault(name, NodeSummary(name)).missed += 1
        slowest = max((n.compute_seconds for n in per_node.values()), default=0.0)
        asked = list(outcome.assignments.values())
        return RoundRecord(
            round=outcome.round,
            duration_seconds=duration,
            sync_overhead_seconds=max(0.0, duration - slowest),
            samples=outcome.samples,
            samples_per_second=outcome.samples / duration if duration > 0 else 0.0,
            missing=tuple(names.get(a, a) for a in outcome.missing),
            nodes=per_node,
            elapsed_seconds=elapsed,
            training_share=self._report_share(nodes, elapsed),
            local_steps=round(sum(a.local_steps for a in asked) / len(asked)) if asked else 0,
            update_dtype=(asked[0].update_dtype or self.cfg.spec.update_dtype) if asked else "",
        )

    def _checkpoint(self, state: dict[str, torch.Tensor], snap: dict[str, Any]) -> None:
        """Write `state`, the global model after `snap["completed_rounds"]` rounds, with the engine's `snap`."""
        assert self.workload is not None and self.cfg.run_dir is not None
        checkpoint.save(self.cfg.run_dir, checkpoint.Checkpoint(
            completed_rounds=snap["completed_rounds"], state=state, cursors=snap["cursors"],
            meta=self._run_facts(),
        ))
        self._checkpointed = snap["completed_rounds"]

    def _run_facts(self) -> dict[str, Any]:
        """What a checkpoint and the final model say about their run (a resume checks the first two)."""
        assert self.workload is not None
        return {"fingerprint": self.workload.spec.data_fingerprint, "model": self.workload.model_name,
                "spec": asdict(self.workload.spec)}

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]round {task.completed:.0f}" + (f"/{self.cfg.rounds}" if self.cfg.rounds else "")),
            BarColumn(),
            TextColumn("acc {task.fields[acc]}"),
            TextColumn("{task.fields[tput]} samples/s"),
            TextColumn("slowest {task.fields[slow]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.cfg.progress,
        )

    def close(self) -> None:
        if self.health is not None:  # before FINISHED goes out: probes see the run is over, not a new one
            self.health.enter_graceful_shutdown()
        if self.engine is not None:
            self.engine.finish(self._failure)
            self._let_agents_hear_finished()
        for waiting in self._waiting:  # never told the address: they exit at once
            waiting.cancel()
        self._waiting = []
        deadline = time.monotonic() + 15
        for proc in self.local_agents:  # they see FINISHED and exit; stragglers are stopped
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.local_agents = []
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
            self._server = None
        if self._svc is not None:  # after the server: no handler is left to write a file
            self._svc.close()
            self._svc = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None


    def _let_agents_hear_finished(self, grace: float = 10.0) -> None:
        """Serve a little longer while ready agents are still training (the run stopped mid-round).

        They hear FINISHED when they next ask, rather than finding the coordinator gone and retrying.
        """
        assert self.engine is not None
        end = time.monotonic() + min(grace, self.cfg.round_timeout)
        while time.monotonic() < end and any(
                a.agent_id not in self.engine.told_finished for a in self.membership.live(ready_only=True)):
            time.sleep(0.05)


def _figures(result: EvalResult, choice: Choice) -> Figures:
    """The global model's figures on a split, as its round's record keeps them."""
    return Figures(accuracy=result.accuracy, loss=result.loss, macro_f1=result.macro_f1,
                   macro_recall=result.macro_recall, metric=choice.value(result))


def _constant_prediction(y: torch.Tensor, label: int, num_classes: int) -> EvalResult:
    """The figures of a model that predicts `label` for everything (the majority-class baseline)."""
    counts = torch.bincount(y, minlength=num_classes).tolist()
    confusion = tuple(tuple(counts[t] if p == label else 0 for p in range(num_classes)) for t in range(num_classes))
    n = max(1, len(y))
    present = [c for c in range(num_classes) if counts[c] > 0 or c == label]
    scores = EvalResult(len(y), float("nan"), counts[label] / n, 0.0, 0.0, confusion)
    f1 = [scores.per_class()[c][2] for c in present]
    recall = [scores.per_class()[c][1] for c in range(num_classes) if counts[c] > 0]
    return replace(scores, macro_f1=sum(f1) / len(f1), macro_recall=sum(recall) / max(1, len(recall)))


def summary_table(result: RunResult) -> Table:
    """Per-node figures at the end of a run."""
    table = Table(title=f"{result.completed_rounds} rounds in {result.wall_seconds:.1f} s ({result.stopped_by}); "
                        f"training share {result.training_share:.1%}, start-up {result.startup_seconds:.1f} s"
                        f"{_adapted(result)}")
    for col in ("node", "rounds", "missed", "samples", "compute s", "comm s", "samples/s", "local acc"):
        table.add_column(col, justify="left" if col == "node" else "right")
    for s in sorted(result.nodes.values(), key=lambda s: s.name):
        table.add_row(s.name, str(s.rounds), str(s.missed), str(s.samples), f"{s.compute_seconds:.2f}",
                      f"{s.communication_seconds:.2f}", f"{s.samples_per_second:.0f}", f"{s.last_accuracy:.3f}")
    if result.final is not None:
        f = result.final
        table.caption = (f"last round's global model, test: accuracy {f.accuracy:.4f}, loss {f.loss:.4f}, "
                         f"macro-F1 {f.macro_f1:.4f}, macro-recall {f.macro_recall:.4f} on {f.n} examples")
    return table


def _adapted(result: RunResult) -> str:
    """The summary title's K and uploads, with what was chosen by the link rule marked auto."""
    a = result.adaptation
    if a is None:
        return ""
    marks = ["auto"] * ("K" in result.auto) + ["timed rounds"] * ("timed" in result.auto)
    k = f"K {a.local_steps}" + (f" ({', '.join(marks)})" if marks else "")
    dtype = f"uploads {a.update_dtype}" + (" (auto)" if "dtype" in result.auto else "")
    return f"; {k}, {dtype}"


def slow_node(result: RunResult) -> str | None:
    """The run summary's line naming the node that held rounds back, and why (coordinator/stragglers.py)."""
    straggler = slowest({s.name: s.times() for s in result.nodes.values()})
    return None if straggler is None else str(straggler)


def quality_tables(choice: Choice) -> list[Table]:
    """The kept model's figures: a headline table, then precision, recall and F1 per class.

    The headline is the run's metric on test and the round chosen on val; below it the other figures, beside
    those on val and the majority-class baseline's.
    """
    if choice.test is None:
        return []
    name = choice.metric.name
    where = (f"round {choice.round}, best {name} on val ({choice.value(choice.val):.4f})" if choice.val is not None
             else f"round {choice.round}, the last (no val split)")
    headline = Table(title=f"test {name} {choice.value(choice.test):.4f} — model of {where}")
    headline.add_column("test", justify="left")
    splits: list[tuple[str, EvalResult | None]] = [("model kept", choice.test), ("val", choice.val),
                                                   ("majority class", choice.majority)]
    splits = [(label, r) for label, r in splits if r is not None]
    for label, _ in splits:
        headline.add_column(label, justify="right")
    rows: list[tuple[str, Callable[[EvalResult], float]]] = [
        (name, choice.value), ("accuracy", lambda r: r.accuracy), ("macro-f1", lambda r: r.macro_f1),
        ("macro-recall", lambda r: r.macro_recall)]
    for row_name, get in rows[:1] + [r for r in rows[1:] if r[0] != name]:
        headline.add_row(row_name, *(f"{get(r):.4f}" for _, r in splits if r is not None))
    per_class = Table(title="per class (test, model kept)")
    for col in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for cls, (p, r, f1, n) in zip(choice.classes, choice.test.per_class(), strict=True):
        per_class.add_row(cls, f"{p:.4f}", f"{r:.4f}", f"{f1:.4f}", str(n))
    return [headline, per_class]
