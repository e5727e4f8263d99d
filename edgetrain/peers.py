"""Peer baselines in plain PyTorch, and the pinned child processes every benchmark runs in.

The benchmarks compare edgetrain with what a user would write without it, on the same model, data,
batch and cores:

* `torch_single`: one process, a `DataLoader` over a `TensorDataset`, the usual loop.
* `torch_ddp`: `DistributedDataParallel` over gloo on loopback, a `DistributedSampler` per rank.
* `torch_lockstep`: DDP's processes and shards without DDP: every `sync_every` steps the ranks only wait for
  each other (a gloo barrier), exchanging nothing. No synchronous data-parallel scheme can beat it on the same
  cores: it is the bound that waiting for the slower rank alone sets. Each rank scores its own model.

All three run inside `run_pinned`, which starts `spawn` children (gRPC and OpenMP do not survive fork),
pins each to its own cores with `sched_setaffinity` and sets torch's thread count to match before any
torch work runs. The training loops here use nothing of edgetrain but the data and the model (so all
methods start from the same weights on the same tensors).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as tmp
from torch import nn
from torch.nn import functional as F  # noqa: N812

from edgetrain.cores import allowed_cores, format_cores, pin_current_process
from edgetrain.errors import ConfigError, CoresError, EdgetrainError
from edgetrain.recipes import METRICS
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.training import confusion, confusion_scores, make_optimizer

EVAL_BATCH = 1024  # inference batch: large enough to keep the cores busy, small enough for any edge box


class PeerError(EdgetrainError):
    """A benchmark child process failed or hung; the message is the child's own."""


@dataclass(frozen=True)
class ChildSetup:
    """What a pinned child knows about itself."""

    rank: int
    world: int
    cores: tuple[int, ...]
    threads: int
    dist_port: int = 0  # gloo rendezvous on 127.0.0.1 when world > 1


@dataclass(frozen=True)
class TrainJob:
    """A fixed amount of training: `steps` optimizer steps of `spec.batch_size` examples per process.

    `eval_every` > 0 evaluates the test split every that many steps (for time-to-accuracy); the
    final evaluation always runs. Evaluation time counts in `seconds`, not in `train_seconds`, nor in the
    times of `TrainOutcome.evals` and `time_to_target`: those are training seconds, evaluations excluded.
    """

    spec: RunSpec
    where: DataLocation = field(default_factory=DataLocation)
    steps: int = 1
    eval_every: int = 0
    target_accuracy: float | None = None  # the target of `metric`
    metric: str = "accuracy"  # what evaluations score: accuracy, macro-f1 or macro-recall
    stop_at_target: bool = False  # end training at the first evaluation that reaches the target
    device: str = "cpu"
    sync_every: int = 1  # torch_lockstep's steps between barriers (the K of a synchronous round)
    warmup_steps: int = 0  # of `steps`, run before the clock starts (a short probe: the first steps allocate)
    final_eval: bool = True  # False: no test evaluation at the end (a probe times training only)

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} of {self.steps}")
        if self.sync_every < 1:
            raise ConfigError(f"sync_every must be at least 1, got {self.sync_every}")
        if self.steps < 1:
            raise ConfigError(f"a training job needs at least one step, got {self.steps}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every cannot be negative, got {self.eval_every}")
        if self.metric not in METRICS:
            raise ConfigError(f"a benchmark scores {', '.join(METRICS)}, not {self.metric!r}")


@dataclass(frozen=True)
class TrainOutcome:
    """What one process of a job did, timed from the moment all processes were ready."""

    seconds: float  # training and evaluations, wall clock
    train_seconds: float  # training only (seconds minus evaluation time)
    samples: int  # examples this process trained on
    accuracy: float  # final test figure of `TrainJob.metric` (DDP: every rank scores a slice; all hold the total)
    time_to_target: float | None  # training seconds until the test figure first reached the target
    cores: tuple[int, ...]  # the affinity the kernel reports for this child
    threads: int  # torch.get_num_threads() in this child
    evals: tuple[tuple[float, float], ...] = ()  # (training seconds so far, figure) of every evaluation
    barriers: int = 0  # torch_lockstep: the barriers this rank passed while training


# ---------------------------------------------------------------------------- pinned children


def free_port() -> int:
    """A TCP port free on loopback right now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_child(cores: Sequence[int], threads: int, world: int) -> None:
    """What every spawned training child does first (the agent's workers and the peers' children alike).

    Pins itself to `cores` before torch runs anything (its pools start lazily), runs `threads` intra-op threads
    and one inter-op thread, and keeps a gloo group of `world` > 1 processes on loopback.
    """
    pin_current_process(list(cores))
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    if world > 1 and sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # rendezvous and traffic stay on loopback


def _child(target: Callable[..., Any], setup: ChildSetup, args: tuple[Any, ...], conn: Any) -> None:
    """Entry point of a spawned child: prepare it (pinned, thread pools sized), run `target`, send its result."""
    try:
        prepare_child(setup.cores, setup.threads, setup.world)
        conn.send(("ok", target(setup, *args)))
    except BaseException as exc:  # report, then exit: the parent raises PeerError
        detail = str(exc) if isinstance(exc, EdgetrainError) else f"{type(exc).__name__}: {exc}"
        try:
            conn.send(("error", detail, traceback.format_exc()))
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
    `timeout` seconds raises PeerError; the others are then stopped.
    """
    if not groups:
        raise ConfigError("run_pinned needs at least one core group")
    world = len(groups)
    port = free_port() if world > 1 else 0
    ctx = tmp.get_context("spawn")
    conns: list[Any] = []
    procs: list[Any] = []
    results: list[Any] = [None] * world
    finished = False
    try:
        for rank, cores in enumerate(groups):
            setup = ChildSetup(rank, world, tuple(cores), threads or len(cores), port)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(target, setup, args, child), name=f"edgetrain-bench-{rank}",
                               daemon=True)
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        end = time.monotonic() + timeout
        pending = set(range(world))
        while pending:
            for rank in sorted(pending):
                if conns[rank].poll(0.05):
                    try:
                        msg = conns[rank].recv()
                    except EOFError:
                        raise PeerError(f"benchmark child {rank} exited without a result") from None
                    if msg[0] == "error":
                        raise PeerError(f"benchmark child {rank} (cores {format_cores(list(groups[rank]))}): {msg[1]}")
                    results[rank] = msg[1]
                    pending.discard(rank)
                elif not procs[rank].is_alive() and not conns[rank].poll(0.2):
                    raise PeerError(f"benchmark child {rank} died with exit code {procs[rank].exitcode}")
            if pending and time.monotonic() > end:
                raise PeerError(f"benchmark children gave no result in {timeout:.0f} s")
        finished = True
        return results
    finally:
        for proc in procs:  # after a result a child only closes its pipe; after a failure, stop it now
            proc.join(10.0 if finished else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in conns:
            conn.close()


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


# ---------------------------------------------------------------------------- plain PyTorch loops


@torch.no_grad()
def torch_confusion(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    device: torch.device) -> torch.Tensor:
    """The confusion matrix of test predictions, the plain way: eval mode, batches, argmax."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for s in range(0, len(y), EVAL_BATCH):
        logits = model(x[s : s + EVAL_BATCH].to(device))
        counts += confusion(logits.argmax(1).cpu(), y[s : s + EVAL_BATCH], num_classes)
    model.train(was_training)
    return counts


def confusion_figure(counts: torch.Tensor, metric: str) -> float:
    """`metric` (accuracy, macro-f1 or macro-recall) of a confusion matrix, as edgetrain.training.evaluate has it."""
    if metric == "accuracy":
        return float(counts.trace()) / max(1, int(counts.sum()))
    f1, recall = confusion_scores(counts)
    return f1 if metric == "macro-f1" else recall


def _torch_train(setup: ChildSetup, job: TrainJob, mode: str) -> TrainOutcome:
    """The plain loop of `mode`: "single", "ddp" or "lockstep" (see the module's docstring)."""
    import torch.distributed as dist
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler, TensorDataset

    from edgetrain.workload import load_workload  # data and initial weights only

    workload = load_workload(job.spec, job.where)
    spec = workload.spec  # the model, lr and decay named: the data set's defaults filled in
    device = torch.device(job.device)
    net = workload.new_model().to(device)
    model: nn.Module = net
    distributed = mode in ("ddp", "lockstep")  # a gloo group; each rank trains its own shard
    if distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{setup.dist_port}", rank=setup.rank,
                                world_size=setup.world)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
    try:
        optimizer = make_optimizer(model, spec.train_config())  # the spec's optimizer, same mapping as the agents
        assert spec.lr_decay is not None  # resolved by load_workload
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=spec.lr_decay)  # per epoch
        weights = workload.class_weights()
        weight = weights.to(device) if weights is not None else None
        train = TensorDataset(workload.data.train.x, workload.data.train.y)
        base: Sampler[int]
        if distributed:
            base = DistributedSampler(train, num_replicas=setup.world, rank=setup.rank, shuffle=True, seed=spec.seed)
        else:
            base = RandomSampler(train, generator=torch.Generator().manual_seed(spec.seed))
        # batch_size=None with a BatchSampler: TensorDataset gathers each batch in one indexing op
        loader = DataLoader(train, sampler=BatchSampler(base, spec.batch_size, drop_last=True), batch_size=None)
        if len(loader) == 0:
            raise ConfigError(f"batch size {spec.batch_size} exceeds the {len(train)} examples of a shard")
        test_x, test_y = workload.data.test.x, workload.data.test.y
        torch.manual_seed(spec.seed * 1_000_003 + setup.rank)  # dropout
        evals: list[tuple[float, float]] = []
        eval_seconds = 0.0
        time_to_target: float | None = None
        accuracy = 0.0

        classes = workload.data.num_classes

        def evaluate(t0: float) -> bool:
            """Score the test split (time not counted as training); True once the target is reached."""
            nonlocal eval_seconds, time_to_target, accuracy
            e0 = time.perf_counter()
            trained = e0 - t0 - eval_seconds
            if mode == "ddp":  # every rank scores its slice of the test split on its own cores; counts are summed
                r, w = setup.rank, setup.world
                counts = torch_confusion(net, test_x[r::w], test_y[r::w], classes, device).double()
                dist.all_reduce(counts)  # (float64: exact for any test split's counts)
            else:
                counts = torch_confusion(net, test_x, test_y, classes, device)
            accuracy = confusion_figure(counts, job.metric)
            evals.append((trained, accuracy))
            if job.target_accuracy is not None and time_to_target is None and accuracy >= job.target_accuracy:
                time_to_target = trained
            eval_seconds += time.perf_counter() - e0
            return time_to_target is not None

        model.train()
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        step, epoch, barriers = 0, 0, 0
        while step < job.steps:
            if isinstance(base, DistributedSampler):
                base.set_epoch(epoch)
            for xb, yb in loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb, weight=weight)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                step += 1
                if mode == "lockstep" and (step % job.sync_every == 0 or step == job.steps):
                    dist.barrier()  # wait for the slower rank, as a synchronous round does
                    barriers += 1
                if step == job.warmup_steps:
                    t0 = time.perf_counter()
                if step >= job.steps:
                    break
                if job.eval_every and step % job.eval_every == 0 and evaluate(t0) and job.stop_at_target:
                    break  # every rank scored the same summed counts: all stop at the same step
            else:  # a whole pass over this process's data
                scheduler.step()
                epoch += 1
                continue
            break
        if job.final_eval and not (job.stop_at_target and time_to_target is not None):
            evaluate(t0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return TrainOutcome(
            seconds=seconds, train_seconds=seconds - eval_seconds, samples=step * spec.batch_size,
            accuracy=accuracy, time_to_target=time_to_target, cores=tuple(allowed_cores()),
            threads=torch.get_num_threads(), evals=tuple(evals), barriers=barriers,
        )
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def torch_single(setup: ChildSetup, job: TrainJob) -> TrainOutcome:
    """Plain PyTorch in one process: `DataLoader` + `loss.backward()` + `optimizer.step()`."""
    return _torch_train(setup, job, "single")


def torch_ddp(setup: ChildSetup, job: TrainJob) -> TrainOutcome:
    """One rank of `DistributedDataParallel` over gloo: gradients all-reduced every step."""
    return _torch_train(setup, job, "ddp")


def torch_lockstep(setup: ChildSetup, job: TrainJob) -> TrainOutcome:
    """One rank of the lock-step bound: DDP's shards, no DDP, a barrier every `job.sync_every` steps."""
    return _torch_train(setup, job, "lockstep")


def combine(outcomes: Sequence[TrainOutcome]) -> TrainOutcome:
    """One figure for a multi-process job: the slowest rank's time, all ranks' samples, rank 0's accuracy."""
    first = outcomes[0]
    cores: set[int] = set()
    for o in outcomes:
        cores.update(o.cores)
    return TrainOutcome(
        seconds=max(o.seconds for o in outcomes),
        train_seconds=max(o.train_seconds for o in outcomes),
        samples=sum(o.samples for o in outcomes),
        accuracy=first.accuracy,
        time_to_target=first.time_to_target,
        cores=tuple(sorted(cores)),
        threads=first.threads,
        evals=first.evals,
        barriers=first.barriers,  # every rank passes the same ones
    )


def steps_for(samples: float, batch_size: int, processes: int = 1) -> int:
    """Optimizer steps per process so that `processes` processes see at least `samples` examples."""
    return max(1, math.ceil(samples / (batch_size * processes)))
