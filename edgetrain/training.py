"""Local steps and evaluation as plain functions: no gRPC, no processes, deterministic under a seed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from edgetrain.eager import defer_compiler
from edgetrain.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adadelta")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local training; validated on construction."""

    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"learning rate must be positive and finite, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight decay must be zero or positive and finite, got {self.weight_decay}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over `model`'s parameters (on their device already): every method's, agents and baselines.

    Adam is fused where torch has the kernel (float32 on CPU or CUDA): one pass over each tensor instead of a
    dozen. Its step is dense over the whole model, so for text-ngram's 786k-weight table, of which a batch
    touches a few thousand rows, it was half of every step: 6.8-9.0 ms a step became 4.1-4.3 ms (`tweets`, one
    thread). The CNNs' steps are the convolutions' and did not move (72-76 against 69-74 ms).

    The first optimizer of a process would import torch's compiler (~1 s of a core, see edgetrain.eager):
    it is deferred until something compiles, which nothing in edgetrain does.
    """
    defer_compiler()
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params) or None
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.Adadelta(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _mix(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of tuples is not stable across versions)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def batch_plan(shard: torch.Tensor, *, seed: int, rank: int, start_sample: int, steps: int,
               batch_size: int, perms: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Indices of the `steps` mini-batches a worker trains on, starting `start_sample` into its stream.

    The stream is the shard reshuffled each epoch by a generator seeded from (seed, rank, epoch), so any
    machine computes the same batches for the same arguments, and consecutive rounds continue the stream.
    `perms` keeps each epoch's order between calls for the same shard, seed and rank (a round of one step
    otherwise spent ~0.4 ms shuffling a 30,000-example shard again).
    """
    n = len(shard)
    if n == 0:
        raise ConfigError("empty shard: more workers than training examples")
    out: list[torch.Tensor] = []
    pos = start_sample
    perms = {} if perms is None else perms
    for _ in range(steps):
        idx = []
        need = batch_size
        while need > 0:
            epoch, within = divmod(pos, n)
            if epoch not in perms:
                for old in [e for e in perms if e < epoch - 1]:  # the stream only moves on
                    del perms[old]
                g = torch.Generator().manual_seed(_mix(seed, rank, epoch))
                perms[epoch] = shard[torch.randperm(n, generator=g)]
            take = min(need, n - within)
            idx.append(perms[epoch][within : within + take])
            pos += take
            need -= take
        out.append(torch.cat(idx))
    return out


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """N / (k * count_c) per class, as scikit-learn's "balanced": rare classes weigh more, mean weight ~1.

    Macro-recall (TweetEval's sentiment metric) rewards every class equally, so the loss should too.
    """
    counts = torch.bincount(labels, minlength=num_classes).double().clamp(min=1)
    return (len(labels) / (num_classes * counts)).float()


@dataclass(frozen=True)
class StepResult:
    """What local training did: samples seen, mean loss and accuracy on its batches, seconds spent."""

    samples: int
    loss: float
    accuracy: float
    seconds: float


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: list[torch.Tensor],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    after_step: Callable[[int, float], None] | None = None,
    grad_hook: Callable[[nn.Module], None] | None = None,
    class_weights: torch.Tensor | None = None,
    budget_seconds: float = 0.0,
) -> StepResult:
    """Run one optimizer step per batch; dropout draws from a generator seeded by `seed`.

    `grad_hook`, when given, runs between backward and step (multi-worker agents all-reduce there).
    `after_step(i, seconds)` reports each step's time (for the step-time histogram).
    `class_weights` weighs the loss per class (see `balanced_class_weights`).
    `budget_seconds` > 0 (a timed round): stop before the batches run out, at the step whose end lies closest
    to that many seconds from the start (at least one step). `StepResult.samples` says how many were trained.
    """
    model.train()
    # the generators dropout draws from: torch.manual_seed seeds every backend torch knows (CUDA, MPS, XPU, ...)
    # and took 0.2-0.7 ms, in every round's critical path; on CUDA it is what it was
    torch.default_generator.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)  # every GPU's: the worker's need not be the current device
    total_loss = 0.0
    correct = 0
    seen = 0
    start = time.perf_counter()
    for i, idx in enumerate(batches):
        t0 = time.perf_counter()
        # another step ends nearer the budget than stopping now does: elapsed + step / 2 < budget
        if budget_seconds > 0 and i > 0 and (t0 - start) * (1 + 0.5 / i) >= budget_seconds:
            break
        xb = x[idx].to(device, non_blocking=True)
        yb = y[idx].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb, weight=class_weights)
        loss.backward()  # type: ignore[no-untyped-call]
        if grad_hook is not None:
            grad_hook(model)
        optimizer.step()
        total_loss += float(loss.detach()) * len(idx)
        correct += int((logits.detach().argmax(1) == yb).sum())
        seen += len(idx)
        if after_step is not None:
            after_step(i, time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    if seen == 0:
        return StepResult(0, 0.0, 0.0, seconds)
    return StepResult(seen, total_loss / seen, correct / seen, seconds)


@dataclass(frozen=True)
class EvalResult:
    """Loss, accuracy, macro-F1 and macro-recall (TweetEval's sentiment metric) on a split.

    `confusion[t][p]` counts the examples of true class t predicted as p (empty when not kept).
    """

    n: int
    loss: float
    accuracy: float
    macro_f1: float
    macro_recall: float
    confusion: tuple[tuple[int, ...], ...] = ()

    def per_class(self) -> list[tuple[float, float, float, int]]:
        """(precision, recall, F1, support) of each class, from the confusion matrix."""
        rows = self.confusion
        out = []
        for c in range(len(rows)):
            tp = rows[c][c]
            support = sum(rows[c])
            predicted = sum(r[c] for r in rows)
            precision = tp / predicted if predicted else 0.0
            recall = tp / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
            out.append((precision, recall, f1, support))
        return out

    def value(self, metric: str, class_index: int | None = None) -> float:
        """The figure `metric` names: accuracy, macro-f1, macro-recall, or f1:<class> (the F1 of `class_index`)."""
        if metric == "accuracy":
            return self.accuracy
        if metric == "macro-f1":
            return self.macro_f1
        if metric == "macro-recall":
            return self.macro_recall
        if metric.startswith("f1:") and class_index is not None and class_index < len(self.confusion):
            return self.per_class()[class_index][2]
        raise ConfigError(f"cannot compute metric {metric!r} on this result")


def classification_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Macro-F1 and macro-recall over the classes that occur in `target` or `pred`."""
    return confusion_scores(confusion(pred, target, num_classes))


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`[t][p]`: how many examples of true class t were predicted as p (int64, num_classes x num_classes)."""
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def confusion_scores(counts: torch.Tensor) -> tuple[float, float]:
    """Macro-F1 and macro-recall of a confusion matrix, over the classes that occur as truth or prediction.

    Confusion matrices add up: one summed over slices of a split scores the whole split.
    """
    cm = counts.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    present = (support + predicted) > 0
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    k = int(present.sum())
    if k == 0:
        return 0.0, 0.0
    return float(f1[present].sum() / k), float(recall[support > 0].mean())


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
             batch_size: int = 1024, device: torch.device | str = "cpu") -> EvalResult:
    """Evaluate in inference mode over the whole split."""
    model.eval()
    n = len(y)
    if n == 0:
        raise ConfigError("cannot evaluate on an empty split")
    total = 0.0
    preds = []
    for s in range(0, n, batch_size):
        xb = x[s : s + batch_size].to(device)
        yb = y[s : s + batch_size].to(device)
        logits = model(xb)
        total += float(F.cross_entropy(logits, yb, reduction="sum"))
        preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds)
    acc = float((pred == y).double().mean())
    cm = confusion(pred, y, num_classes)
    f1, recall = confusion_scores(cm)
    return EvalResult(n, total / n, acc, f1, recall, tuple(tuple(int(v) for v in row) for row in cm.tolist()))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as CPU tensors, detached (what travels and what is averaged)."""
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
