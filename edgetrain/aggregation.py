"""Aggregation as pure functions: sample-weighted mean (as a running sum), coordinate-wise median, trimmed mean.

The weighted mean keeps one accumulator the size of the model whatever the number of agents. Median and
trimmed mean need every update at once (O(agents x model)), which is their known price for robustness.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from edgetrain.errors import ConfigError

State = Mapping[str, torch.Tensor]
AGGREGATORS = ("mean", "median", "trimmed-mean")


class RunningWeightedMean:
    """Sum of weight * tensor, divided at the end; memory is one float32 copy of the model.

    Integer tensors (e.g. BatchNorm's num_batches_tracked) are not averaged: the first update's value is kept.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._ints: dict[str, torch.Tensor] = {}
        self.total_weight = 0
        self.count = 0

    def add(self, state: State, weight: int) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        for name, t in state.items():
            if not t.is_floating_point():
                self._ints.setdefault(name, t.clone())
                continue
            acc = self._sum.get(name)
            if acc is None:
                self._sum[name] = t.to(torch.float32) * weight
            else:
                acc.add_(t, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self, like: State) -> dict[str, torch.Tensor]:
        """The weighted mean, with dtypes and key order of `like` (the current global model)."""
        if self.count == 0:
            raise ValueError("no updates to average")
        out: dict[str, torch.Tensor] = {}
        for name, ref in like.items():
            if name in self._sum:
                out[name] = (self._sum[name] / self.total_weight).to(ref.dtype)
            else:
                out[name] = self._ints.get(name, ref).clone()
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
    if name == "mean":
        return weighted_mean(states, weights)
    if name == "median":
        return coordinate_median(states)
    if name == "trimmed-mean":
        return trimmed_mean(states, trim)
    raise ConfigError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
