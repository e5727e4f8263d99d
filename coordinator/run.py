"""The coordinator's driver: load the workload, serve, wait for agents, run rounds, evaluate, checkpoint, report."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator import checkpoint
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.rounds import Outcome, RoundEngine
from coordinator.server import start_server
from coordinator.servicer import ServiceState
from edgetrain.cli_util import new_folder_kept_only_if_used, output_folder
from edgetrain.cores import allowed_cores, format_cores, split_cores
from edgetrain.errors import ConfigError, EdgetrainError
from edgetrain.httpmetrics import MetricsServer
from edgetrain.memory import compute_heap, tune_malloc
from edgetrain.training import EvalResult, evaluate, state_of
from edgetrain.workload import Workload, load_workload

log = logging.getLogger("edgetrain.coordinator")


class TrainingError(EdgetrainError):
    """Training could not go on: too few agents, local agents died, a round got no updates."""


@dataclass
class NodeSummary:
    name: str
    rounds: int = 0
    samples: int = 0
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    last_accuracy: float = 0.0
    last_loss: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.compute_seconds if self.compute_seconds > 0 else 0.0


@dataclass
class RunResult:
    completed_rounds: int
    wall_seconds: float
    final: EvalResult | None
    history: list[dict[str, Any]]
    nodes: dict[str, NodeSummary]
    run_dir: Path | None
    samples: int
    stopped_by: str
    time_to_target: float | None = None
    sync_overheads: list[float] = field(default_factory=list)  # round wall time minus slowest compute


LOG = "rounds.jsonl"


def trim_log(path: Path, completed: int) -> None:
    """Keep the log's records of rounds before `completed` (the checkpoint's), atomically.

    A coordinator killed after logging round r but before checkpointing it runs round r again on resume;
    without this the log would hold r twice (or a torn last line).
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] < completed:
            kept.append(line + "\n")
    checkpoint.atomic_write_text(path, "".join(kept))


def holds_run(run_dir: Path) -> bool:
    """A run folder with a run to go on with: its log or a checkpoint (what --resume needs, --auto-resume looks for)."""
    return (run_dir / LOG).exists() or (run_dir / checkpoint.LATEST).exists()


def local_core_groups(n: int, cores: list[int] | None = None) -> list[list[int]]:
    """Disjoint core groups for n local agents; with more agents than cores, agents share cores round-robin."""
    cores = cores or allowed_cores()
    if n <= len(cores):
        return split_cores(cores, n)
    return [[cores[i % len(cores)]] for i in range(n)]


class Coordinator:
    """One training run. `run()` blocks until a stopping rule holds; `stop` ends it early but cleanly."""

    def __init__(self, cfg: CoordinatorConfig, *, registry: CollectorRegistry | None = None,
                 stop: threading.Event | None = None, console: Console | None = None) -> None:
        tune_malloc()
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = CoordinatorMetrics(self.registry)
        self.stop = stop or threading.Event()
        self.console = console or Console(stderr=True)
        self.membership = Membership(on_leave=lambda agent: self.metrics.node_left(agent.name))
        self.metrics.agents.set_function(lambda: len(self.membership))  # read at each scrape: always current
        self.workload: Workload | None = None
        self.engine: RoundEngine | None = None
        self.port = 0
        self.metrics_server: MetricsServer | None = None
        self.local_agents: list[subprocess.Popen[bytes]] = []
        self._server: Any = None
        self._svc: ServiceState | None = None
        self._model: torch.nn.Module | None = None
        self._benched: dict[str, float] = {}  # agent_id -> when it missed a round (it is not ready since)
        self.health: Any = None  # grpc_health HealthServicer: SERVING while the run goes, NOT_SERVING after

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
        self.workload = load_workload(cfg.spec, cfg.where, progress=cfg.progress)
        spec = self.workload.spec
        # only ever evaluated, on the global tensors themselves (`_evaluate`): nothing may write to its parameters
        self._model = self.workload.new_model().requires_grad_(False)
        state = state_of(self._model)
        completed, cursors = 0, {}
        if cfg.run_dir is not None:
            checkpoint.remove_stale_temps(cfg.run_dir)  # a coordinator killed mid-write leaves one
            if cfg.resume and (cfg.run_dir / checkpoint.LATEST).exists():
                ck = checkpoint.load(cfg.run_dir)
                same_data = ck.meta.get("fingerprint") == spec.data_fingerprint
                if not same_data or ck.meta.get("model") != self.workload.model_name:
                    raise ConfigError(f"checkpoint in {cfg.run_dir} is from another data set or model")
                state, completed, cursors = ck.state, ck.completed_rounds, ck.cursors
                self.console.print(f"resuming from round {completed} ({cfg.run_dir / checkpoint.LATEST})")
            elif cfg.resume:  # the run stopped before its first checkpoint: round 0 again
                self.console.print(f"resuming from round 0 ({cfg.run_dir} has no checkpoint yet)")
            if cfg.resume:
                trim_log(cfg.run_dir / LOG, completed)
        self.engine = RoundEngine(
            state, batch_size=spec.batch_size, local_steps=cfg.local_steps, round_timeout=cfg.round_timeout,
            aggregator=cfg.aggregator, trim=cfg.trim, balance=cfg.balance, completed_rounds=completed,
            cursors=cursors,
        )
        self._svc = ServiceState(self.engine, self.membership, spec, self.metrics,
                                 upload_slots=cfg.upload_slots, staging_dir=cfg.staging_dir)
        if cfg.aggregator == "mean":
            self._svc.prepare_staging()
        self._server, self.port, self.health = start_server(
            self._svc, cfg.host, cfg.port, token=cfg.token, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
            tls_client_ca=cfg.tls_client_ca,
        )
        if cfg.metrics_port is not None:
            self.metrics_server = MetricsServer(self.registry, cfg.metrics_host, cfg.metrics_port,
                                                json_routes={"/sd": self.service_discovery})
        self._spawn_local_agents()

    def _check_run_dir(self, run_dir: Path) -> None:
        """With --resume, a folder holding a run; without, the folder made, holding no earlier run."""
        held = [name for name in (LOG, checkpoint.LATEST, checkpoint.MODEL) if (run_dir / name).exists()]
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

    def _spawn_local_agents(self) -> None:
        cfg = self.cfg
        devices = list(cfg.local_devices)
        n = cfg.local_agents + len(devices)
        if n == 0:
            return
        groups = local_core_groups(n)
        used = sorted({c for g in groups for c in g})
        if n > len(used):
            log.warning("%d local agents on %d core(s) (%s): they share cores, round-robin", n, len(used),
                        format_cores(used))
        fewest = min(len(g) for g in groups)
        if cfg.local_workers > fewest:
            log.warning("--local-workers %d: a local agent has %d core(s); it runs one worker per core",
                        cfg.local_workers, fewest)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        for i, cores in enumerate(groups):
            device = devices[i - cfg.local_agents] if i >= cfg.local_agents else "cpu"
            name = f"local-{i}" if device == "cpu" else f"gpu-{device.split(':')[-1]}"
            cmd = [sys.executable, "-m", "agent", "start", "--coordinator", f"{host}:{self.port}",
                   "--cores", format_cores(cores), "--name", name, "--device", device,
                   "--workers", str(min(cfg.local_workers, len(cores))), "--give-up-after", "60"]
            w = cfg.where
            if w.data_dir is not None:
                cmd += ["--data-dir", str(w.data_dir)]
            if w.data_path is not None:
                cmd += ["--data-path", str(w.data_path)]
            if w.cache_dir is not None:
                cmd += ["--cache-dir", str(w.cache_dir)]
            if not w.download:
                cmd.append("--no-download")
            if cfg.token:
                cmd += ["--token-env", "EDGETRAIN_TOKEN"]
            if cfg.tls_cert is not None:
                cmd += ["--tls-ca", str(cfg.tls_cert)]
            env = dict(os.environ, EDGETRAIN_TOKEN=cfg.token or "")
            self.local_agents.append(subprocess.Popen(cmd, env=env))

    # ---- the loop
    def _wait_for_agents(self) -> None:
        end = time.monotonic() + self.cfg.join_timeout
        while self.membership.ready_count() < self.cfg.min_agents:
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

    def _evaluate(self, state: dict[str, torch.Tensor]) -> EvalResult:
        assert self._model is not None and self.workload is not None
        # The model takes the global tensors themselves (it is only evaluated, without gradients): a copy kept a
        # third model-sized buffer beside the global model and the running sum for the whole run. It lets go of
        # them afterwards: with --eval-every N > 1 it kept an old global model alive until the next evaluation.
        self._model.load_state_dict(state, assign=True)
        test = self.workload.data.test
        try:
            with compute_heap():  # every activation a fresh mmap made this 1.6x slower (edgetrain.memory)
                return evaluate(self._model, test.x, test.y, self.workload.data.num_classes)
        finally:
            self._model.to("meta")  # shapes only, no storage: the next evaluation assigns tensors again

    def run(self) -> RunResult:
        if self.engine is None:
            self.start()
        assert self.engine is not None and self.workload is not None
        cfg, engine = self.cfg, self.engine
        n_train = len(self.workload.data.train)
        history: list[dict[str, Any]] = []
        nodes: dict[str, NodeSummary] = {}
        overheads: list[float] = []
        log_file = None  # opened with the first round's record: a run that never trains leaves no log
        final: EvalResult | None = None
        samples_total = sum(engine.cursors.values())  # every sample trained so far, a resumed run's included
        stopped_by = "stop"
        time_to_target: float | None = None
        t_start = time.perf_counter()
        try:
            self._wait_for_agents()
            t_start = time.perf_counter()
            with self._progress() as progress:
                task = progress.add_task("training", total=cfg.rounds, acc="-", tput="-", slow="-")
                def budget_spent() -> str | None:
                    """"rounds" or "epochs" once that budget is used up, else None."""
                    if cfg.rounds is not None and engine.completed_rounds >= cfg.rounds:
                        return "rounds"
                    if cfg.epochs is not None and samples_total >= cfg.epochs * n_train:
                        return "epochs"
                    return None

                while not self.stop.is_set():
                    spent = budget_spent()
                    if spent is not None:
                        stopped_by = spent
                        break
                    self._wait_for_agents()
                    live = self.membership.live(ready_only=True)
                    if self.stop.is_set():
                        break
                    if not live:  # the last agent left between the wait and now
                        continue
                    engine.open_round([(a.agent_id, a.throughput, a.workers) for a in live])
                    for a in live:  # left or replaced since `live` was read: its forget() came too early
                        if self.membership.get(a.agent_id) is None:
                            engine.forget(a.agent_id)
                    names = {a.agent_id: a.name for a in live}
                    engine.wait_for_updates(self.stop)
                    outcome = engine.close_round(min_updates=min(cfg.min_agents, len(live)))
                    if not self.stop.is_set() and not outcome.spoiled:  # a round cut short by a stop or by
                        self._bench(outcome, names)  # a staged update's failed read is nobody's fault
                        if outcome.missing:
                            self.metrics.rounds_short.inc()
                    if not outcome.applied:
                        why = ("an average that overflows float32 (model kept)" if outcome.overflow
                               else "an update that failed while it was being added" if outcome.spoiled
                               else "too few updates")
                        log.warning("round %d closed with %s; running it again", outcome.round, why)
                        continue
                    samples_total += outcome.samples
                    record = self._record(outcome, names, nodes, t_start)
                    overheads.append(record["sync_overhead_seconds"])
                    last = budget_spent() is not None  # the last round is evaluated and logged
                    if last or cfg.target_accuracy is not None or engine.completed_rounds % cfg.eval_every == 0:
                        final = self._evaluate(engine.global_state)
                        record.update(accuracy=final.accuracy, loss=final.loss, macro_f1=final.macro_f1,
                                      macro_recall=final.macro_recall)
                        self.metrics.accuracy.set(final.accuracy)
                        self.metrics.loss.set(final.loss)
                        self.metrics.macro_f1.set(final.macro_f1)
                    record["elapsed_seconds"] = time.perf_counter() - t_start
                    self.metrics.elapsed.set(record["elapsed_seconds"])
                    history.append(record)
                    if cfg.run_dir is not None:
                        if log_file is None:
                            log_file = open(cfg.run_dir / LOG, "a" if cfg.resume else "w")  # noqa: SIM115
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    if cfg.run_dir is not None and engine.completed_rounds % cfg.checkpoint_every == 0:
                        self._checkpoint()
                    slow = max(record["nodes"].items(), key=lambda kv: kv[1]["compute_seconds"], default=("-", {}))[0]
                    progress.update(task, advance=1, acc=f"{final.accuracy:.4f}" if final else "-",
                                    tput=f"{record['samples_per_second']:.0f}", slow=slow)
                    if cfg.target_accuracy is not None and final is not None and final.accuracy >= cfg.target_accuracy:
                        time_to_target = record["elapsed_seconds"]
                        stopped_by = "target"
                        break
            if final is None or (history and "accuracy" not in history[-1]):
                final = self._evaluate(engine.global_state)
            wall = time.perf_counter() - t_start
            if cfg.run_dir is not None:
                self._checkpoint()
                checkpoint.atomic_save(engine.global_state, cfg.run_dir / checkpoint.MODEL)
            return RunResult(engine.completed_rounds, wall, final, history, nodes, cfg.run_dir, samples_total,
                             stopped_by, time_to_target, overheads)
        finally:
            if log_file is not None:
                log_file.close()
            self.close()

    def _bench(self, outcome: Outcome, names: dict[str, str]) -> None:
        """Take agents that sent nothing out of the next rounds (the world shrinks; shards are reassigned).

        A straggler stays admitted: its late update is refused as "late" and its next GetRound makes it ready
        again. A dead agent never asks again and is forgotten once unseen for `_gone_after()` seconds; a
        restart under the same name replaces it at once.
        """
        now = time.monotonic()
        for agent_id in outcome.missing:
            agent = self.membership.get(agent_id)
            if agent is not None:
                agent.ready = False
                self._benched[agent_id] = now
            log.warning("round %d closed without an update from %s (%s)", outcome.round, names.get(agent_id, agent_id),
                        "left or replaced" if agent is None else "out of the rounds until it asks for work again")
        for agent_id, since in list(self._benched.items()):
            agent = self.membership.get(agent_id)
            if agent is None or agent.ready:  # left, replaced by a restart, or back
                del self._benched[agent_id]
            elif now - max(since, agent.last_seen) > self._gone_after():
                del self._benched[agent_id]
                self.membership.remove(agent_id)
                log.warning("agent %s unseen for %.0f s; forgotten", agent.name, self._gone_after())

    def _gone_after(self) -> float:
        # A live agent calls at least once per long-poll (20 s) when idle, and once per round when busy.
        return max(2 * self.cfg.round_timeout, 60.0)

    def _record(self, outcome: Outcome, names: dict[str, str], nodes: dict[str, NodeSummary],
                t_start: float) -> dict[str, Any]:
        duration = outcome.closed_at - outcome.opened_at
        self.metrics.round.set(outcome.round + 1)
        self.metrics.round_duration.observe(duration)
        per_node: dict[str, dict[str, float]] = {}
        for agent_id, c in outcome.contributions.items():
            name = names.get(agent_id, agent_id)
            s = nodes.setdefault(name, NodeSummary(name))
            s.rounds += 1
            s.samples += c.samples
            s.compute_seconds += c.stats.compute_seconds
            s.communication_seconds += c.stats.communication_seconds
            s.last_accuracy = c.stats.accuracy
            s.last_loss = c.stats.loss
            per_node[name] = {"samples": c.samples, **asdict(c.stats)}
        slowest = max((n["compute_seconds"] for n in per_node.values()), default=0.0)
        return {
            "round": outcome.round,
            "duration_seconds": duration,
            "sync_overhead_seconds": max(0.0, duration - slowest),
            "samples": outcome.samples,
            "samples_per_second": outcome.samples / duration if duration > 0 else 0.0,
            "missing": [names.get(a, a) for a in outcome.missing],
            "nodes": per_node,
        }

    def _checkpoint(self) -> None:
        assert self.engine is not None and self.workload is not None and self.cfg.run_dir is not None
        snap = self.engine.snapshot()
        checkpoint.save(self.cfg.run_dir, checkpoint.Checkpoint(
            completed_rounds=snap["completed_rounds"], state=self.engine.global_state, cursors=snap["cursors"],
            meta={"fingerprint": self.workload.spec.data_fingerprint, "model": self.workload.model_name,
                  "spec": asdict(self.workload.spec)},
        ))

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
            self.engine.finish()
            self._let_agents_hear_finished()
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


def summary_table(result: RunResult) -> Table:
    """Per-node figures at the end of a run."""
    table = Table(title=f"{result.completed_rounds} rounds in {result.wall_seconds:.1f} s ({result.stopped_by})")
    for col in ("node", "rounds", "samples", "compute s", "comm s", "samples/s", "local acc"):
        table.add_column(col, justify="left" if col == "node" else "right")
    for s in sorted(result.nodes.values(), key=lambda s: s.name):
        table.add_row(s.name, str(s.rounds), str(s.samples), f"{s.compute_seconds:.2f}",
                      f"{s.communication_seconds:.2f}", f"{s.samples_per_second:.0f}", f"{s.last_accuracy:.3f}")
    if result.final is not None:
        f = result.final
        table.caption = (f"global test: accuracy {f.accuracy:.4f}, loss {f.loss:.4f}, macro-F1 {f.macro_f1:.4f}, "
                         f"macro-recall {f.macro_recall:.4f} on {f.n} examples")
    return table

