from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetrain.datasets import ShardingError, shard_indices
from edgetrain.errors import DatasetError


def all_shards(labels: torch.Tensor, world: int, seed: int, scheme: str, alpha: float = 0.5) -> list[torch.Tensor]:
    return [shard_indices(labels, rank, world, seed, scheme, alpha) for rank in range(world)]


def assert_partition(shards: list[torch.Tensor], n: int) -> None:
    for shard in shards:
        assert shard.dtype == torch.int64 and shard.dim() == 1
        assert torch.equal(shard, shard.sort().values)  # ascending
    joined = torch.cat(shards) if shards else torch.empty(0, dtype=torch.int64)
    assert joined.numel() == n, "shards overlap or miss indices"
    assert torch.equal(joined.sort().values, torch.arange(n)), "union is not every index"


labels_st = st.lists(st.integers(0, 4), min_size=0, max_size=300).map(lambda v: torch.tensor(v, dtype=torch.int64))


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, world=st.integers(1, 9), seed=st.integers(-(2**40), 2**40))
def test_iid_partition_near_equal(labels: torch.Tensor, world: int, seed: int) -> None:
    shards = all_shards(labels, world, seed, "iid")
    assert_partition(shards, labels.numel())
    sizes = [s.numel() for s in shards]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_st,
    world=st.integers(1, 9),
    seed=st.integers(0, 2**32),
    alpha=st.sampled_from([0.01, 0.1, 0.5, 1.0, 100.0]),
)
def test_dirichlet_partition_non_empty(labels: torch.Tensor, world: int, seed: int, alpha: float) -> None:
    shards = all_shards(labels, world, seed, "dirichlet", alpha)
    assert_partition(shards, labels.numel())
    if labels.numel() >= world:
        assert all(s.numel() > 0 for s in shards)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_arguments_same_shard(scheme: str) -> None:
    labels = torch.arange(1000) % 10
    a = shard_indices(labels, 2, 5, seed=7, scheme=scheme)
    b = shard_indices(labels.clone(), 2, 5, seed=7, scheme=scheme)
    assert torch.equal(a, b)
    assert not torch.equal(a, shard_indices(labels, 2, 5, seed=8, scheme=scheme))
    assert not torch.equal(a, shard_indices(labels, 3, 5, seed=7, scheme=scheme))


def test_global_rng_does_not_matter() -> None:
    labels = torch.arange(500) % 3
    torch.manual_seed(1)
    a = shard_indices(labels, 0, 4, 3, "dirichlet")
    torch.manual_seed(2)
    import numpy as np

    np.random.seed(5)
    assert torch.equal(a, shard_indices(labels, 0, 4, 3, "dirichlet"))


def test_pinned_iid_shards() -> None:
    # The shard a rank trains on must not change across releases: every node must agree.
    labels = torch.zeros(10, dtype=torch.int64)
    shards = [shard_indices(labels, r, 3, seed=0).tolist() for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert shards == PINNED_IID


PINNED_IID = [[3, 4, 6, 9], [0, 2, 5], [1, 7, 8]]


def test_dirichlet_small_alpha_skews_labels() -> None:
    labels = torch.arange(10000) % 10
    skewed = all_shards(labels, 5, 0, "dirichlet", alpha=0.05)
    even = all_shards(labels, 5, 0, "dirichlet", alpha=1000.0)

    def max_class_share(shards: list[torch.Tensor]) -> float:
        return max(float(labels[s].bincount(minlength=10).max()) / max(s.numel(), 1) for s in shards)

    assert max_class_share(skewed) > 0.5
    assert max_class_share(even) < 0.15


def test_iid_shards_are_label_balanced_roughly() -> None:
    labels = torch.arange(10000) % 10
    for shard in all_shards(labels, 4, 0, "iid"):
        counts = labels[shard].bincount(minlength=10)
        assert counts.min() > 200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 3, "world": 3}, "rank must be in 0..2"),
        ({"rank": -1, "world": 3}, "rank"),
        ({"rank": 0, "world": 0}, "world"),
        ({"rank": 0, "world": 2, "scheme": "round-robin"}, "unknown sharding scheme"),
        ({"rank": 0, "world": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"rank": 0, "world": 2, "scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ShardingError, match=match):
        shard_indices(torch.zeros(10, dtype=torch.int64), seed=0, **kwargs)  # type: ignore[arg-type]
    assert issubclass(ShardingError, DatasetError)


def test_labels_must_be_1d() -> None:
    with pytest.raises(ShardingError, match="1-D"):
        shard_indices(torch.zeros(2, 2, dtype=torch.int64), 0, 1, 0)
