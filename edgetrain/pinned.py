"""Runs pinned to core groups, and the plain PyTorch step loop that `--workers auto`'s probe times in them.

`run_pinned` starts one `spawn` child per core group (`edgetrain.procs`, as the agent's workers are started: gRPC
and OpenMP do not survive fork), pins each to its own cores and sizes torch's thread pools before any torch work
runs. `PlainLoop` is one rank's training the way a user writes it without edgetrain: a `DataLoader` over a
`TensorDataset`, `loss.backward()`, `optimizer.step()`, in one of three modes:

* "single": one process.
* "ddp": `DistributedDataParallel` over gloo on loopback, a `DistributedSampler` per rank: gradients all-reduced
  every step, as an agent's workers do (agent/worker.py; DDP buckets them and overlaps the exchange with the
  backward pass).
* "lockstep": DDP's processes and shards without DDP: every `sync_every` steps the ranks only wait for each other
  (a gloo barrier), exchanging nothing, as local agents that each train K steps of a synchronous round do.

`edgetrain.split`'s probe times candidate splits with `timed_steps` ("ddp" or "lockstep"). The benchmarks'
baselines (coordinator/experiments/baselines.py) run the same loop and add evaluations, targets and outcomes; the
kernel keeps no benchmark. The loop uses nothing of edgetrain's training but the data, the model and the
optimizer mapping (so every method starts from the same weights on the same tensors).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from edgetrain.cores import allowed_cores, format_cores
from edgetrain.errors import ConfigError, CoresError
from edgetrain.procs import ChildError, Children, failed, free_port, prepare_child
from edgetrain.spec import DataLocation, RunSpec

MODES = ("single", "ddp", "lockstep")


class PinnedError(ChildError):
    """A pinned child process failed or hung; the message is the child's own."""


@dataclass(frozen=True)
class ChildSetup:
    """What a pinned child knows about itself."""

    rank: int
    world: int
    cores: tuple[int, ...]
    threads: int
    dist_port: int = 0  # gloo rendezvous on 127.0.0.1 when world > 1


@dataclass(frozen=True)
class StepJob:
    """A fixed amount of training: `steps` optimizer steps of `spec.batch_size` examples per process."""

    spec: RunSpec
    where: DataLocation = field(default_factory=DataLocation)
    steps: int = 1
    warmup_steps: int = 0  # of `steps`, run before the clock starts (a short probe: the first steps allocate)
    sync_every: int = 1  # "lockstep": steps between barriers (the K of a synchronous round)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"a training job needs at least one step, got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} of {self.steps}")
        if self.sync_every < 1:
            raise ConfigError(f"sync_every must be at least 1, got {self.sync_every}")


@dataclass(frozen=True)
class Timed:
    """What one rank's timed steps did."""

    seconds: float  # the timed steps (after the warm-up), wall clock
    samples: int  # examples the timed steps trained on


# ---------------------------------------------------------------------------- pinned children


@dataclass(frozen=True)
class Result:
    """A pinned child's one message: what `target` returned."""

    value: Any


def _child(target: Callable[..., Any], setup: ChildSetup, args: tuple[Any, ...], conn: Any) -> None:
    """Entry point of a spawned child: prepare it (pinned, thread pools sized), run `target`, send its result."""
    try:
        prepare_child(setup.cores, setup.threads, setup.world)
        conn.send(Result(target(setup, *args)))
    except BaseException as exc:  # report, then exit: the parent raises PinnedError
        try:
            conn.send(failed(exc))
        except (BrokenPipeError, OSError):
            pass
    finally:
        conn.close()


def run_pinned(
    target: Callable[..., Any],
    groups: Sequence[Sequence[int]],
    *args: Any,
    threads: int | None = None,
    timeout: float = 3600.0,
) -> list[Any]:
    """Run `target(ChildSetup, *args)` in one spawned child per core group; return their results by rank.

    Child `r` is pinned to `groups[r]` and runs `threads` torch threads (default: its core count).
    `target` must be importable (a module-level function). A child that fails, dies or outlasts
    `timeout` seconds raises PinnedError; the others are then stopped.
    """
    if not groups:
        raise ConfigError("run_pinned needs at least one core group")
    world = len(groups)
    port = free_port() if world > 1 else 0
    setups = [(target, ChildSetup(rank, world, tuple(cores), threads or len(cores), port), args)
              for rank, cores in enumerate(groups)]
    children = Children(_child, setups, name="edgetrain-pinned", error=PinnedError, one_shot=True,
                        describe=lambda r: f"pinned child {r} (cores {format_cores(list(groups[r]))})")
    finished = False
    try:
        end = time.monotonic() + timeout
        results = [children.recv(rank, max(0.0, end - time.monotonic())).value for rank in range(world)]
        finished = True
        return results
    finally:  # after a result a child only closes its pipe; after a failure, stop it now
        children.stop(10.0 if finished else 0.1)


def core_groups(processes: int, threads: int, cores: Sequence[int] | None = None) -> list[list[int]]:
    """`processes` disjoint groups of `threads` consecutive allowed cores (a PxT layout)."""
    cores = list(cores) if cores is not None else allowed_cores()
    if processes < 1 or threads < 1:
        raise ConfigError(f"layout {processes}x{threads}: processes and threads must be at least 1")
    need = processes * threads
    if need > len(cores):
        raise CoresError(
            f"layout {processes}x{threads} needs {need} cores, but this process may use only {len(cores)} "
            f"(cores {format_cores(cores)})"
        )
    return [cores[i * threads : (i + 1) * threads] for i in range(processes)]


# ---------------------------------------------------------------------------- the plain loop


class PlainLoop:
    """One rank's plain PyTorch training in a pinned child; a context manager (it leaves its gloo group on exit).

    `net` is the model as built (DDP's wrapped module: what to evaluate), `workload` its data.
    """

    def __init__(self, setup: ChildSetup, job: StepJob, mode: str) -> None:
        import torch.distributed as dist
        from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler, TensorDataset

        from edgetrain.training import make_optimizer
        from edgetrain.workload import load_workload  # data and initial weights only

        if mode not in MODES:
            raise ConfigError(f"plain loop mode {mode!r}: use one of {', '.join(MODES)}")
        self.setup, self.job, self.mode = setup, job, mode
        self.workload = load_workload(job.spec, job.where)
        self.spec = spec = self.workload.spec  # the model, lr and decay named: the data set's defaults filled in
        self.device = torch.device(job.device)
        self.net = self.workload.new_model().to(self.device)
        self.model: nn.Module = self.net
        self.distributed = mode in ("ddp", "lockstep")  # a gloo group; each rank trains its own shard
        if self.distributed:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{setup.dist_port}", rank=setup.rank,
                                    world_size=setup.world)
        try:
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                self.model = DistributedDataParallel(self.net)
            self.optimizer = make_optimizer(self.model, spec.train_config())  # the same mapping as the agents
            assert spec.lr_decay is not None  # resolved by load_workload
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=spec.lr_decay)
            weights = self.workload.class_weights()
            self.weight = weights.to(self.device) if weights is not None else None
            train = TensorDataset(self.workload.data.train.x, self.workload.data.train.y)
            self.sampler: Sampler[int]
            if self.distributed:
                self.sampler = DistributedSampler(train, num_replicas=setup.world, rank=setup.rank, shuffle=True,
                                                  seed=spec.seed)
            else:
                self.sampler = RandomSampler(train, generator=torch.Generator().manual_seed(spec.seed))
            # batch_size=None with a BatchSampler: TensorDataset gathers each batch in one indexing op
            self.loader = DataLoader(train, sampler=BatchSampler(self.sampler, spec.batch_size, drop_last=True),
                                     batch_size=None)
            if len(self.loader) == 0:
                raise ConfigError(f"batch size {spec.batch_size} exceeds the {len(train)} examples of a shard")
        except BaseException:
            self.close()
            raise
        self.steps = self.barriers = 0
        self.t0 = 0.0  # perf_counter when the clock started (after the warm-up)

    def __enter__(self) -> PlainLoop:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def run(self, after_step: Callable[[int], bool] | None = None) -> None:
        """Train `job.steps` steps (fewer when `after_step(step)`, called between steps, returns True).

        The learning rate decays by `spec.lr_decay` after every pass over this rank's data. The clock (`t0`)
        starts when every rank is ready, and again after the warm-up steps.
        """
        import torch.distributed as dist
        from torch.utils.data import DistributedSampler

        job = self.job
        torch.manual_seed(self.spec.seed * 1_000_003 + self.setup.rank)  # dropout
        self.model.train()
        if self.distributed:
            dist.barrier()
        self.t0 = time.perf_counter()
        epoch = 0
        while self.steps < job.steps:
            if isinstance(self.sampler, DistributedSampler):
                self.sampler.set_epoch(epoch)
            for xb, yb in self.loader:
                self._step(xb, yb)
                if self.steps >= job.steps or (after_step is not None and after_step(self.steps)):
                    return
            self.scheduler.step()  # a whole pass over this process's data
            epoch += 1

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        import torch.distributed as dist

        xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(xb), yb, weight=self.weight)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.steps += 1
        if self.mode == "lockstep" and (self.steps % self.job.sync_every == 0 or self.steps == self.job.steps):
            dist.barrier()  # wait for the slower rank, as a synchronous round does
            self.barriers += 1
        if self.steps == self.job.warmup_steps:
            self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the clock started, the device's queued work finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0


def timed_steps(setup: ChildSetup, job: StepJob, mode: str) -> Timed:
    """One rank of `mode` ("ddp" or "lockstep": a split's ranks), its steps after the warm-up timed (the probe)."""
    with PlainLoop(setup, job, mode) as loop:
        loop.run()
        return Timed(loop.elapsed(), (loop.steps - job.warmup_steps) * loop.spec.batch_size)
