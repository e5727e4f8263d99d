"""Aggregation as pure functions: sample-weighted mean (as a running sum), coordinate-wise median, trimmed mean.

The weighted mean keeps one accumulator the size of the model whatever the number of agents. Median and
trimmed mean need every update at once (O(agents x model)), which is their known price for robustness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgetrain.errors import ConfigError

if TYPE_CHECKING:
    from edgetrain.serde import Sliced

State = Mapping[str, torch.Tensor]
MEAN = "mean"  # the default: a running sum, weighted by samples (memory O(model))
AGGREGATORS = (MEAN, "median", "trimmed-mean")


def keeps_updates(name: str) -> bool:
    """Whether aggregator `name` keeps every update of a round whole (the robust ones) instead of summing them."""
    return name != MEAN


class RunningWeightedMean:
    """Sum of weight * tensor, divided at the end; memory is one float32 copy of the model.

    Integer tensors (e.g. BatchNorm's num_batches_tracked) are not averaged: the first update's value is kept.

    The float32 arithmetic runs in numpy on the calling thread, in slices through a small reused scratch buffer:
    torch's elementwise ops are OpenMP regions, and in a coordinator whose cores are held by local training
    workers their threads spun at the barrier (stealing the workers' cores) and waited for a core, ~2-4 ms per
    model; and `result` divides the sum in place instead of allocating another model-sized tensor.
    """

    _SLICE = 1 << 16  # elements per step through the scratch buffer (256 KiB of float32, stays in cache)

    def __init__(self, empty: Callable[[torch.Size], torch.Tensor] | None = None) -> None:
        self._empty = empty or (lambda shape: torch.empty(shape, dtype=torch.float32))  # float32 sum buffers
        self._sum: dict[str, torch.Tensor] = {}
        self._ints: dict[str, torch.Tensor] = {}
        self._scratch = np.empty(0, dtype=np.float32)
        self._done = False
        self.spoiled = False  # part of an update went in and the rest failed: no result from this sum
        self.total_weight = 0
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor | Sliced], weight: int) -> None:
        """Add weight * state.

        A Sliced tensor is read while it is added: if reading fails, the sum holds part of the update and is
        `spoiled` (no result: the caller runs the round again).
        """
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._done:
            raise RuntimeError("this running mean was already turned into its result")
        if self.spoiled:
            raise RuntimeError("this running mean holds part of an update that failed while it was added")
        try:
            self._add(state, weight)
        except BaseException:
            self.spoiled = True
            raise
        self.total_weight += weight
        self.count += 1

    def _add(self, state: Mapping[str, torch.Tensor | Sliced], weight: int) -> None:
        for name, t in state.items():
            if isinstance(t, torch.Tensor):
                if not t.is_floating_point():
                    self._ints.setdefault(name, t.clone())
                    continue
                if t.device.type != "cpu" or t.requires_grad:  # pragma: no cover - the coordinator holds CPU tensors
                    self._add_torch(name, t, weight)
                    continue
            acc = self._sum.get(name)
            first = acc is None
            if acc is None:
                acc = self._sum[name] = self._empty(t.shape)
            out = acc.numpy().reshape(-1)
            slices: Iterable[tuple[int, np.ndarray[Any, Any]]]
            if isinstance(t, torch.Tensor):
                slices = [(0, t.to(torch.float32).contiguous().numpy().reshape(-1))]
            else:
                slices = t.slices()
            for lo, src in slices:
                self._add_numpy(out[lo : lo + src.size], src, weight, first)

    def _add_torch(self, name: str, t: torch.Tensor, weight: int) -> None:  # pragma: no cover - see add
        acc = self._sum.get(name)
        if acc is None:
            self._sum[name] = t.detach().to("cpu", torch.float32) * weight
        else:
            acc.add_(t.detach().to("cpu", torch.float32), alpha=weight)

    def _add_numpy(self, out: np.ndarray[Any, Any], src: np.ndarray[Any, Any], weight: int, first: bool) -> None:
        """Set out to weight * src (a tensor's first update) or add that to it: the same per element in slices."""
        # Overflow to Inf is not an error here, as it is not in torch: the caller checks the average is finite.
        with np.errstate(over="ignore", invalid="ignore"):
            if first:
                np.multiply(src, np.float32(weight), out=out)
                return
            if self._scratch.size < min(self._SLICE, src.size):
                self._scratch = np.empty(min(self._SLICE, max(src.size, 1)), dtype=np.float32)
            for lo in range(0, src.size, self._SLICE):
                hi = min(lo + self._SLICE, src.size)
                tmp = self._scratch[: hi - lo]
                np.multiply(src[lo:hi], np.float32(weight), out=tmp)
                np.add(out[lo:hi], tmp, out=out[lo:hi])

    def result(self, like: State) -> dict[str, torch.Tensor]:
        """The weighted mean, with dtypes and key order of `like` (the current global model).

        Divides the running sum in place and hands it out: the accumulator is spent afterwards (no more `add`).
        """
        if self.count == 0:
            raise ValueError("no updates to average")
        if self._done:
            raise RuntimeError("this running mean was already turned into its result")
        if self.spoiled:
            raise RuntimeError("this running mean holds part of an update that failed while it was added")
        self._done = True
        out: dict[str, torch.Tensor] = {}
        for name, ref in like.items():
            if name in self._sum:
                acc = self._sum[name]
                if acc.device.type == "cpu":
                    view = acc.numpy()
                    with np.errstate(over="ignore", invalid="ignore"):
                        np.divide(view, np.float32(self.total_weight), out=view)
                else:  # pragma: no cover - CPU only in the coordinator
                    acc.div_(self.total_weight)
                out[name] = acc.to(ref.dtype)
            else:
                out[name] = self._ints.get(name, ref).clone()
        self._sum = {}
        self._scratch = np.empty(0, dtype=np.float32)
        return out


def weighted_mean(states: Sequence[State], weights: Sequence[int]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of whole state dicts (the running sum, fed all at once)."""
    if len(states) != len(weights) or not states:
        raise ValueError("need one positive weight per state, and at least one state")
    acc = RunningWeightedMean()
    for s, w in zip(states, weights, strict=True):
        acc.add(s, w)
    return acc.result(states[0])


def coordinate_median(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (lower median for even counts): robust to < half poisoned updates."""
    if not states:
        raise ValueError("no updates to aggregate")
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        stacked = torch.stack([s[name].to(torch.float32) for s in states])
        out[name] = stacked.median(dim=0).values.to(ref.dtype)
    return out


def trimmed_mean(states: Sequence[State], trim: float = 0.2) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the `trim` fraction of largest and of smallest values."""
    if not states:
        raise ValueError("no updates to aggregate")
    if not 0 <= trim < 0.5:
        raise ConfigError(f"trim must be in [0, 0.5), got {trim}")
    n = len(states)
    k = int(n * trim)
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        stacked = torch.stack([s[name].to(torch.float32) for s in states]).sort(dim=0).values
        out[name] = stacked[k : n - k].mean(dim=0).to(ref.dtype)
    return out


def aggregate(name: str, states: Sequence[State], weights: Sequence[int], trim: float = 0.2) -> dict[str, torch.Tensor]:
    """Dispatch by aggregator name."""
    if name == MEAN:
        return weighted_mean(states, weights)
    if name == "median":
        return coordinate_median(states)
    if name == "trimmed-mean":
        return trimmed_mean(states, trim)
    raise ConfigError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
