"""The PyTorch baselines the benchmarks compare edgetrain with, on the same model, data, batch and cores.

* `torch_single`: one process, a `DataLoader` over a `TensorDataset`, the usual loop.
* `torch_ddp`: `DistributedDataParallel` over gloo on loopback, a `DistributedSampler` per rank.
* `torch_lockstep`: DDP's processes and shards without DDP: every `sync_every` steps the ranks only wait for
  each other (a gloo barrier), exchanging nothing. No synchronous data-parallel scheme can beat it on the same
  cores: it is the bound that waiting for the slower rank alone sets. Each rank scores its own model.

Each is the kernel's plain loop (`edgetrain.pinned.PlainLoop`, which `--workers auto`'s probe times) with test
evaluations, a target and an outcome added, run inside `edgetrain.pinned.run_pinned`. Only the benchmarks
(`coordinator bench`, bench/) import this module; the agent imports none of it (tests/unit/test_layers.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.pinned import ChildSetup, PlainLoop, StepJob
from edgetrain.recipes import METRICS
from edgetrain.training import confusion, confusion_scores

EVAL_BATCH = 1024  # inference batch: large enough to keep the cores busy, small enough for any edge box


@dataclass(frozen=True)
class TrainJob(StepJob):
    """A `StepJob` with test evaluations.

    `eval_every` > 0 evaluates the test split every that many steps (for time-to-accuracy); the final evaluation
    always runs. Evaluation time counts in `seconds`, not in
    `train_seconds`, nor in the times of `TrainOutcome.evals` and `time_to_target`: those are training seconds,
    evaluations excluded.
    """

    eval_every: int = 0
    target_accuracy: float | None = None  # the target of `metric`
    metric: str = "accuracy"  # what evaluations score: accuracy, macro-f1 or macro-recall
    stop_at_target: bool = False  # end training at the first evaluation that reaches the target

    def __post_init__(self) -> None:
        super().__post_init__()
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


class _Scores:
    """A baseline's test evaluations: each one's training seconds and figure, and when the target was reached."""

    def __init__(self, loop: PlainLoop, job: TrainJob) -> None:
        self.loop, self.job = loop, job
        self.evals: list[tuple[float, float]] = []
        self.seconds = 0.0  # spent evaluating
        self.time_to_target: float | None = None
        self.accuracy = 0.0

    def evaluate(self) -> bool:
        """Score the test split (time not counted as training); True once the target is reached."""
        import torch.distributed as dist

        loop, job = self.loop, self.job
        e0 = time.perf_counter()
        trained = e0 - loop.t0 - self.seconds
        test, classes = loop.workload.data.test, loop.workload.data.num_classes
        if loop.mode == "ddp":  # every rank scores its slice of the test split on its own cores; counts are summed
            r, w = loop.setup.rank, loop.setup.world
            counts = torch_confusion(loop.net, test.x[r::w], test.y[r::w], classes, loop.device).double()
            dist.all_reduce(counts)  # (float64: exact for any test split's counts)
        else:
            counts = torch_confusion(loop.net, test.x, test.y, classes, loop.device)
        self.accuracy = confusion_figure(counts, job.metric)
        self.evals.append((trained, self.accuracy))
        if job.target_accuracy is not None and self.time_to_target is None and self.accuracy >= job.target_accuracy:
            self.time_to_target = trained
        self.seconds += time.perf_counter() - e0
        return self.time_to_target is not None

    def after_step(self, step: int) -> bool:
        """The loop's hook: evaluate on the cadence; True ends training (at the target, when asked to stop there).

        Every rank scored the same summed counts, so all stop at the same step.
        """
        job = self.job
        return bool(job.eval_every) and step % job.eval_every == 0 and self.evaluate() and job.stop_at_target


def _torch_train(setup: ChildSetup, job: TrainJob, mode: str) -> TrainOutcome:
    """The plain loop of `mode` ("single", "ddp" or "lockstep"), evaluated as `job` asks."""
    from edgetrain.cores import allowed_cores

    with PlainLoop(setup, job, mode) as loop:
        scores = _Scores(loop, job)
        loop.run(scores.after_step)
        if not (job.stop_at_target and scores.time_to_target is not None):
            scores.evaluate()
        seconds = loop.elapsed()
        return TrainOutcome(
            seconds=seconds, train_seconds=seconds - scores.seconds, samples=loop.steps * loop.spec.batch_size,
            accuracy=scores.accuracy, time_to_target=scores.time_to_target, cores=tuple(allowed_cores()),
            threads=torch.get_num_threads(), evals=tuple(scores.evals), barriers=loop.barriers,
        )


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
