from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from edgetrain import aggregation as agg


def test_weighted_mean_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([4.0, -1.0]), "n": torch.tensor(9)}
    out = agg.weighted_mean([a, b], [1, 2])
    # (1*1 + 2*4)/3 = 3, (1*2 + 2*-1)/3 = 0
    assert torch.allclose(out["w"], torch.tensor([3.0, 0.0]))
    assert int(out["n"]) == 5  # integer buffers are not averaged: the first is kept


def test_running_mean_equals_batch_mean_in_any_order() -> None:
    g = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(10, generator=g)} for _ in range(5)]
    weights = [3, 1, 7, 2, 5]
    fwd = agg.weighted_mean(states, weights)
    rev = agg.weighted_mean(states[::-1], weights[::-1])
    manual = sum(s["w"] * w for s, w in zip(states, weights, strict=True)) / sum(weights)
    assert torch.allclose(fwd["w"], manual, atol=1e-6)
    assert torch.allclose(rev["w"], manual, atol=1e-6)


def test_running_mean_refuses_nonpositive_weight_and_empty() -> None:
    acc = agg.RunningWeightedMean()
    with pytest.raises(ValueError):
        acc.add({"w": torch.ones(1)}, 0)
    with pytest.raises(ValueError):
        acc.result({"w": torch.ones(1)})


def test_median_and_trimmed_mean_by_hand() -> None:
    states = [{"w": torch.tensor([v, -v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert torch.equal(agg.coordinate_median(states)["w"], torch.tensor([3.0, -3.0]))
    # trim 0.2 of 5 drops one from each end: mean(2, 3, 4) = 3
    assert torch.allclose(agg.trimmed_mean(states, 0.2)["w"], torch.tensor([3.0, -3.0]))


def test_one_poisoned_agent_cannot_move_robust_aggregates() -> None:
    honest = [{"w": torch.full((4,), 1.0 + 0.01 * i)} for i in range(4)]
    poisoned = {"w": torch.full((4,), 1e6)}
    for name in ("median", "trimmed-mean"):
        out = agg.aggregate(name, [*honest, poisoned], [1] * 5, trim=0.2)
        assert float(out["w"].max()) < 1.05, name
    assert float(agg.aggregate("mean", [*honest, poisoned], [1] * 5)["w"].max()) > 1e5


def test_running_mean_over_slices_matches_by_hand_and_is_spent_by_result() -> None:
    # larger than one scratch slice, with an odd remainder, plus a 2-D tensor and an integer one
    n = agg.RunningWeightedMean._SLICE * 2 + 7
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(n, generator=g), "m": torch.randn(3, 5, generator=g), "n": torch.tensor(i)}
              for i in range(3)]
    weights = [64, 3, 17]
    acc = agg.RunningWeightedMean()
    for s, w in zip(states, weights, strict=True):
        acc.add(s, w)
    out = acc.result(states[0])
    for k in ("w", "m"):
        manual = sum(s[k].double() * w for s, w in zip(states, weights, strict=True)) / sum(weights)
        assert out[k].dtype == torch.float32 and out[k].shape == states[0][k].shape
        assert torch.allclose(out[k].double(), manual, atol=1e-6)
    assert int(out["n"]) == 0  # integer tensors keep the first update's value
    assert float(states[0]["w"].abs().sum()) > 0  # the inputs are not touched
    with pytest.raises(RuntimeError):
        acc.add(states[0], 1)  # the result owns the sum now
    with pytest.raises(RuntimeError):
        acc.result(states[0])


class _InSlices:
    """A tensor handed over a few elements at a time, as a staged update is (serde.Sliced)."""

    def __init__(self, t: torch.Tensor, step: int) -> None:
        self.shape, self._flat, self._step = t.shape, t.reshape(-1).numpy(), step

    def slices(self) -> Iterator[tuple[int, np.ndarray[Any, np.dtype[np.float32]]]]:
        for lo in range(0, self._flat.size, self._step):
            yield lo, self._flat[lo : lo + self._step].copy()  # a fresh array each time, like a reused buffer


def test_running_mean_takes_an_update_in_slices_to_the_same_bits_as_whole() -> None:
    g = torch.Generator().manual_seed(3)
    states = [{"w": torch.randn(1000, generator=g), "m": torch.randn(3, 50, generator=g), "n": torch.tensor(i)}
              for i in range(3)]
    weights = [64, 3, 17]
    whole, sliced = agg.RunningWeightedMean(), agg.RunningWeightedMean()
    for i, (s, w) in enumerate(zip(states, weights, strict=True)):
        whole.add(s, w)
        # the first update sliced too: its slices start the sum, the later ones add to it
        sliced.add({"w": _InSlices(s["w"], 333 + i), "m": _InSlices(s["m"], 7), "n": s["n"]}, w)
    a, b = whole.result(states[0]), sliced.result(states[0])
    assert {k: v.numpy().tobytes() for k, v in a.items()} == {k: v.numpy().tobytes() for k, v in b.items()}
    assert b["m"].shape == (3, 50) and int(b["n"]) == 0
