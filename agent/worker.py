"""Training worker processes: spawned (gRPC does not survive fork), pinned to their cores, fed over a pipe.

The agent and its worker(s) share one set of model tensors in shared memory: per round the agent writes
the global weights there and sends a small "train" message; the worker trains and writes its weights back.
With several workers (one agent, several core groups) they all-reduce gradients every step through
torch.distributed (gloo) and worker 0 writes the result.

On the coordinator's host a single CPU worker can skip both copies: it reads the round's weights file straight
into its model and writes its update file straight from it (`RoundTask.weights_file` / `update_file`), with
the checks the agent would make (`agent.route`). Each copy and hand-off through the agent cost ~1-2 ms of every round.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edgetrain.errors import EdgetrainError, WireError
from edgetrain.procs import ChildError, Children, Prestarted, Stop, failed, free_port, prepare_child
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.training import StepResult, batch_plan, make_optimizer, set_lr, train_steps

from .route import RoundTask, UpdateFile, read_weights, write_update


class WorkerError(ChildError):
    """A training worker failed to start or to train; the message is the worker's own."""


class WeightsFileError(EdgetrainError):
    """The worker could not use the round's weights file (the agent asks again, streamed); nothing was trained."""


@dataclass(frozen=True)
class Ready:
    """Worker to agent, once: loaded and ready; worker 0 sends the tensors it shares with the agent."""

    shared: dict[str, torch.Tensor] | None
    pid: int


@dataclass(frozen=True)
class Train:
    """Agent to worker: train one round."""

    task: RoundTask


@dataclass(frozen=True)
class Trained:
    """Worker to agent: a round trained (its figures, each step's seconds, and the update file if it wrote one)."""

    result: StepResult
    step_times: list[float]
    written: UpdateFile | None


@dataclass(frozen=True)
class NoWeightsFile:
    """Worker to agent: the round's weights file could not be used (nothing was trained)."""

    why: str


@dataclass(frozen=True)
class WorkerSetup:
    index: int
    count: int
    cores: tuple[int, ...]
    spec: RunSpec
    where: DataLocation
    device: str = "cpu"
    dist_port: int = 0  # gloo rendezvous on 127.0.0.1 when count > 1


def _appender(times: list[float]) -> Callable[[int, float], None]:
    """A step callback that records each step's seconds."""
    return lambda _i, seconds: times.append(seconds)


class _Training:
    """What a worker holds from start to stop: its model, optimizer and data; `round` trains one round on them."""

    def __init__(self, setup: WorkerSetup) -> None:
        from edgetrain.workload import load_workload

        self.setup = setup
        self.workload = load_workload(setup.spec, setup.where)
        self.device = torch.device(setup.device)
        self.model = self.workload.new_model().to(self.device)
        # the group first: init_process_group touches torch._dynamo when it finds it imported (or deferred, as
        # make_optimizer does: edgetrain.eager), and that would import the real compiler
        self.grad_hook = _all_reduce_hook(setup) if setup.count > 1 else None
        self.optimizer = make_optimizer(self.model, setup.spec.train_config())
        weights = self.workload.class_weights()
        self.class_weights = weights.to(self.device) if weights is not None else None
        self.shard_key = (-1, -1)  # (rank, world) of the agent's shard held
        self.shard = torch.empty(0, dtype=torch.int64)  # this worker's part of it
        self.perms: dict[int, torch.Tensor] = {}  # the shard's shuffles, per epoch

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """A copy of the model's tensors in shared memory (worker 0's, shared with the agent and the other workers)."""
        return {k: v.detach().to("cpu").clone().share_memory_() for k, v in self.model.state_dict().items()}

    def round(self, task: RoundTask, shared: dict[str, torch.Tensor]) -> Trained | NoWeightsFile:
        """Train `task`'s round from its weights (the file, or `shared`).

        Worker 0 leaves the trained weights in `shared` unless they went into the update file.
        """
        setup, work = self.setup, task.work
        if (work.rank, work.world) != self.shard_key:
            self.shard_key = (work.rank, work.world)
            self.shard = self.workload.shard(work.rank, work.world)[setup.index :: setup.count]
            self.perms = {}
        if task.weights_file:
            try:
                read_weights(task, self.model.state_dict())
            except (OSError, WireError) as err:  # the agent re-asks for the weights streamed
                return NoWeightsFile(str(err))
        else:
            _copy(shared, self.model.state_dict())
        start = work.sample_offset // setup.count
        # Workers in lock-step (all-reduce every step) must all take the same steps: they cannot stop on time
        steps, budget = work.steps_and_budget(can_stop_early=setup.count == 1)
        plan = batch_plan(self.shard, seed=setup.spec.seed, rank=work.rank * setup.count + setup.index,
                          start_sample=start, steps=steps, batch_size=work.batch_size, perms=self.perms)
        set_lr(self.optimizer, setup.spec.lr_at(start // max(1, len(self.shard))))
        step_times: list[float] = []
        train = self.workload.data.train
        result = train_steps(
            self.model, self.optimizer, train.x, train.y, plan,
            seed=setup.spec.seed * 1_000_003 + work.round * 101 + setup.index, device=self.device,
            after_step=_appender(step_times), grad_hook=self.grad_hook, class_weights=self.class_weights,
            budget_seconds=budget,
        )
        written = write_update(task, self.model.state_dict()) if task.update_file else None
        if setup.index == 0 and (written is None or written.error):
            _copy(self.model.state_dict(), shared)
        return Trained(result, step_times, written)


def _copy(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in target.items():
            v.copy_(source[k])


def _all_reduce_hook(setup: WorkerSetup) -> Callable[[torch.nn.Module], None]:
    """Join the workers' gloo group; the hook that averages their gradients after every backward pass."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{setup.dist_port}", rank=setup.index,
                            world_size=setup.count)

    def grad_hook(m: torch.nn.Module) -> None:
        for p in m.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(setup.count)

    return grad_hook


def _main(setup: WorkerSetup, conn: Any) -> None:
    """Entry point of a spawned worker."""
    # Ctrl-C reaches the whole process group: the agent handles it and stops its workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        prepare_child(setup.cores, len(setup.cores), setup.count)
        training = _Training(setup)
        shared = training.shared_tensors() if setup.index == 0 else None
        conn.send(Ready(shared, os.getpid()))
        if shared is None:
            shared = conn.recv()  # worker 0's shared tensors, passed on by the agent
        while not isinstance(msg := conn.recv(), Stop):
            conn.send(training.round(msg.task, shared))
    except Exception as exc:  # report, then exit: the agent turns it into a WorkerError
        try:
            conn.send(failed(exc))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if setup.count > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class WorkerPool:
    """The agent's side of its workers: start them pinned, feed rounds, collect results, stop them."""

    def __init__(self, core_groups: list[list[int]], spec: RunSpec, where: DataLocation, device: str = "cpu",
                 start_timeout: float = 600.0, prestarted: Prestarted | None = None) -> None:
        """`prestarted`: forked workers waiting for their work (one per core group; else they are spawned now)."""
        self.device = device
        self.shared: dict[str, torch.Tensor] = {}
        count = len(core_groups)
        port = free_port() if count > 1 else 0
        setups = [(WorkerSetup(i, count, tuple(cores), spec, where, device, port),)
                  for i, cores in enumerate(core_groups)]
        self._children = Children(_main, setups, name="edgetrain-worker", describe=lambda i: "a training worker",
                                  error=WorkerError, failure=lambda i, detail: detail, prestarted=prestarted)
        try:
            for i in range(count):
                ready: Ready = self._children.recv(i, start_timeout)
                if i == 0:
                    assert ready.shared is not None
                    self.shared = ready.shared
            for i in range(1, count):
                self._children.send(i, self.shared)
        except BaseException:
            self.stop()
            raise

    @property
    def processes(self) -> list[Any]:
        return self._children.processes

    @property
    def pids(self) -> list[int]:
        return self._children.pids

    @property
    def reads_files(self) -> bool:
        """One CPU worker: it can take the round's weights file and write the update file itself."""
        return len(self.processes) == 1 and self.device == "cpu"

    def train(self, weights: dict[str, torch.Tensor] | None, task: RoundTask,
              timeout: float = 3600.0) -> tuple[Any, list[float], UpdateFile | None]:
        """Train one round from `weights` (None: from `task.weights_file`).

        Returns (StepResult of all workers combined, step times, what went into `task.update_file`); the
        trained weights are in `shared` unless they went into the file. Raises WeightsFileError when the
        worker could not read the weights file.
        """
        if task.weights_file and not self.reads_files:
            raise ValueError("only a single CPU worker reads the weights file itself")
        if weights is not None:
            with torch.no_grad():
                for k, v in weights.items():
                    self.shared[k].copy_(v)
        for i in range(len(self.processes)):
            self._children.send(i, Train(task))
        results = [self._children.recv(i, timeout) for i in range(len(self.processes))]
        if isinstance(results[0], NoWeightsFile):
            raise WeightsFileError(results[0].why)
        parts = [r.result for r in results]
        samples = sum(p.samples for p in parts)
        combined = StepResult(
            samples=samples,
            loss=sum(p.loss * p.samples for p in parts) / max(1, samples),
            accuracy=sum(p.accuracy * p.samples for p in parts) / max(1, samples),
            seconds=max(p.seconds for p in parts),
        )
        return combined, results[0].step_times, results[0].written

    def stop(self, timeout: float = 10.0) -> None:
        self._children.stop(timeout)
