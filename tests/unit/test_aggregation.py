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
