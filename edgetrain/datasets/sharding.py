"""Split a training set among ``world`` nodes: IID or Dirichlet label skew.

Every node calls :func:`shard_indices` with the same labels, seed and world and its own
rank; the shards are computed from an explicitly seeded ``numpy.random.Generator`` (never
a global RNG), so all nodes agree on who holds what without talking to each other.
"""

from __future__ import annotations

import numpy as np
import torch

from edgetrain.datasets.base import ShardingError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet")

# Distinct stream tags, so that the IID and Dirichlet schemes never share random draws.
_STREAM_IID = 0x11D
_STREAM_DIRICHLET = 0xD112


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, stream])))


def shard_indices(
    labels: torch.Tensor, rank: int, world: int, seed: int, scheme: str = "iid", alpha: float = 0.5
) -> torch.Tensor:
    """Return the indices (int64, ascending) into the training set that node ``rank`` of ``world`` trains on.

    ``iid``: a seeded permutation of all indices cut into ``world`` contiguous pieces whose
    sizes differ by at most one. ``dirichlet``: for each class, proportions drawn from
    Dirichlet(``alpha`` * 1) decide how many of that class's (seeded-shuffled) examples each
    node gets; small ``alpha`` means strong label skew. Afterwards any empty shard takes one
    example from the largest shard, so every shard is non-empty when there are at least
    ``world`` examples. In both schemes the shards are disjoint and their union is every index.
    The result depends only on (labels, rank, world, seed, scheme, alpha).
    """
    if labels.dim() != 1:
        raise ShardingError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if world < 1:
        raise ShardingError(f"world must be at least 1, got {world}")
    if not 0 <= rank < world:
        raise ShardingError(f"rank must be in 0..{world - 1}, got {rank}")
    if scheme not in SCHEMES:
        raise ShardingError(f"unknown sharding scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    n = int(labels.shape[0])
    if scheme == "iid":
        perm = _rng(seed, _STREAM_IID).permutation(n)
        base, extra = divmod(n, world)
        start = rank * base + min(rank, extra)
        stop = start + base + (1 if rank < extra else 0)
        mine = perm[start:stop]
    else:
        if not (alpha > 0 and np.isfinite(alpha)):
            raise ShardingError(f"alpha must be a positive finite number, got {alpha}")
        mine = np.asarray(_dirichlet_shards(labels.cpu().numpy(), world, seed, alpha)[rank], dtype=np.int64)
    return torch.from_numpy(np.sort(mine).astype(np.int64))


def _dirichlet_shards(labels: np.ndarray, world: int, seed: int, alpha: float) -> list[list[int]]:
    rng = _rng(seed, _STREAM_DIRICHLET)
    shards: list[list[int]] = [[] for _ in range(world)]
    for cls in np.unique(labels):  # sorted, so the draw order is fixed
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(members.size)]
        proportions = rng.dirichlet(np.full(world, alpha))
        if not np.all(np.isfinite(proportions)):  # defensive: numpy handles tiny alpha, but never trust NaN
            proportions = np.full(world, 1.0 / world)
        cuts = np.rint(np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
        for shard, piece in zip(shards, np.split(members, cuts), strict=True):
            shard.extend(piece.tolist())
    # Every shard non-empty where possible: an empty shard takes the last example of the
    # currently largest shard (lowest rank on ties). Deterministic, keeps disjoint/union.
    for shard in shards:
        if not shard:
            donor = max(shards, key=len)
            if len(donor) <= 1:
                break
            shard.append(donor.pop())
    return shards
