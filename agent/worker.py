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
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as tmp

from agent.route import RoundTask, UpdateFile, read_weights, write_update
from edgetrain.errors import EdgetrainError, WireError
from edgetrain.peers import free_port, prepare_child
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.training import batch_plan, make_optimizer, set_lr, train_steps


class WorkerError(EdgetrainError):
    """A training worker failed to start or to train; the message is the worker's own."""


class WeightsFileError(EdgetrainError):
    """The worker could not use the round's weights file (the agent asks again, streamed); nothing was trained."""


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


def _main(setup: WorkerSetup, conn: Any) -> None:
    """Entry point of a spawned worker."""
    # Ctrl-C reaches the whole process group: the agent handles it and stops its workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        prepare_child(setup.cores, len(setup.cores), setup.count)
        from edgetrain.workload import load_workload

        workload = load_workload(setup.spec, setup.where)
        device = torch.device(setup.device)
        model = workload.new_model().to(device)
        optimizer = make_optimizer(model, setup.spec.train_config())
        shared: dict[str, torch.Tensor] | None = None
        if setup.index == 0:
            shared = {k: v.detach().to("cpu").clone().share_memory_() for k, v in model.state_dict().items()}
        grad_hook = None
        if setup.count > 1:
            import torch.distributed as dist

            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{setup.dist_port}", rank=setup.index,
                world_size=setup.count,
            )

            def grad_hook(m: torch.nn.Module) -> None:
                for p in m.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(setup.count)

        conn.send(("ready", workload.data.fingerprint, shared, os.getpid()))
        if shared is None:
            shared = conn.recv()  # worker 0's shared tensors, passed on by the agent
        shards: dict[tuple[int, int], torch.Tensor] = {}
        x, y = workload.data.train.x, workload.data.train.y
        weights = workload.class_weights()
        if weights is not None:
            weights = weights.to(device)
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            task: RoundTask = msg[1]
            key = (task.rank, task.world)
            if key not in shards:
                shards = {key: workload.shard(task.rank, task.world)[setup.index :: setup.count]}
                perms: dict[int, torch.Tensor] = {}  # the shard's shuffles, per epoch
            if task.weights_file:
                try:
                    read_weights(task, model.state_dict())
                except (OSError, WireError) as err:  # the agent re-asks for the weights streamed
                    conn.send(("nofile", str(err)))
                    continue
            else:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        v.copy_(shared[k])
            plan = batch_plan(
                shards[key], seed=setup.spec.seed, rank=task.rank * setup.count + setup.index,
                start_sample=task.sample_offset // setup.count, steps=task.local_steps,
                batch_size=task.batch_size, perms=perms,
            )
            epoch = (task.sample_offset // setup.count) // max(1, len(shards[key]))
            set_lr(optimizer, setup.spec.lr_at(epoch))
            step_times: list[float] = []
            result = train_steps(
                model, optimizer, x, y, plan, seed=setup.spec.seed * 1_000_003 + task.round * 101 + setup.index,
                device=device, after_step=_appender(step_times), grad_hook=grad_hook,
                class_weights=weights,
            )
            written = write_update(task, model.state_dict()) if task.update_file else None
            if setup.index == 0 and (written is None or written.error):
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        shared[k].copy_(v)
            conn.send(("done", result, step_times, written))
    except Exception as exc:  # report, then exit: the agent turns it into a WorkerError
        detail = str(exc) if isinstance(exc, EdgetrainError) else f"{type(exc).__name__}: {exc}"
        try:
            conn.send(("error", detail, traceback.format_exc()))
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
                 start_timeout: float = 600.0) -> None:
        self._ctx = tmp.get_context("spawn")
        self.device = device
        self._conns: list[Any] = []
        self.processes: list[Any] = []
        self.shared: dict[str, torch.Tensor] = {}
        self.fingerprint = ""
        count = len(core_groups)
        port = free_port() if count > 1 else 0
        for i, cores in enumerate(core_groups):
            parent, child = self._ctx.Pipe()
            setup = WorkerSetup(i, count, tuple(cores), spec, where, device, port)
            proc = self._ctx.Process(target=_main, args=(setup, child), name=f"edgetrain-worker-{i}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self.processes.append(proc)
        try:
            for i, conn in enumerate(self._conns):
                msg = self._recv(conn, start_timeout)
                if i == 0:
                    _, self.fingerprint, self.shared, _ = msg
            for conn in self._conns[1:]:
                conn.send(self.shared)
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _recv(self, conn: Any, timeout: float) -> Any:
        end = time.monotonic() + timeout
        while not conn.poll(0.2):
            if any(not p.is_alive() for p in self.processes) and not conn.poll(0.5):
                raise WorkerError("a training worker exited unexpectedly")
            if time.monotonic() > end:
                raise WorkerError(f"no answer from a training worker in {timeout:.0f} s")
        try:
            msg = conn.recv()
        except EOFError as exc:
            raise WorkerError("a training worker exited unexpectedly") from exc
        if msg[0] == "error":
            raise WorkerError(msg[1])
        return msg

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
        for conn in self._conns:
            conn.send(("train", task))
        results = [self._recv(conn, timeout) for conn in self._conns]
        if results[0][0] == "nofile":
            raise WeightsFileError(results[0][1])
        from edgetrain.training import StepResult

        parts = [r[1] for r in results]
        samples = sum(p.samples for p in parts)
        combined = StepResult(
            samples=samples,
            loss=sum(p.loss * p.samples for p in parts) / max(1, samples),
            accuracy=sum(p.accuracy * p.samples for p in parts) / max(1, samples),
            seconds=max(p.seconds for p in parts),
        )
        return combined, results[0][2], results[0][3]

    def stop(self, timeout: float = 10.0) -> None:
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.processes:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        for conn in self._conns:
            conn.close()
        self._conns = []
