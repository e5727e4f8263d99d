"""A local agent's training worker reads the round's weights file and writes its update file itself.

A real spawned worker pinned to a real core, the coordinator's real /dev/shm directory: the worker's file path
gives bit for bit what the shared-tensor path gives, and a file it cannot use changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from edgetrain.agent.worker import RoundTask, WeightsFileError, WorkerPool
from edgetrain.coordinator.transfer.samehost import SharedFiles

from edgetrain import serde
from edgetrain.cores import allowed_cores
from edgetrain.records import Assignment
from edgetrain.samehost import SHM_ROOT
from edgetrain.spec import DataLocation, RunSpec

pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="needs /dev/shm")

# SGD without momentum keeps no state between rounds: training twice from the same weights gives the same bytes
SPEC = RunSpec(dataset="tweets", model="text-cnn", batch_size=16, optimizer="sgd", lr=0.05)
TASK = RoundTask(Assignment(round=3, rank=0, world=1, local_steps=2, batch_size=16, sample_offset=0))


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool([allowed_cores()[:1]], SPEC, DataLocation())
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def files() -> Iterator[SharedFiles]:
    f = SharedFiles(SHM_ROOT)
    try:
        yield f
    finally:
        f.close()


def start_weights(pool: WorkerPool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in pool.shared.items()}


def copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def test_the_file_path_trains_the_same_bytes_as_the_shared_tensors(pool: WorkerPool, files: SharedFiles) -> None:
    weights = start_weights(pool)
    assert pool.reads_files
    by_tensors, _, nothing = pool.train(weights, TASK)
    from_tensors = copy(pool.shared)
    assert nothing is None and any(not torch.equal(from_tensors[k], weights[k]) for k in weights)

    path, layout, _ = files.weights(TASK.work.round, weights)
    update = files.update_file("a", TASK.work.round)
    pool.shared["embedding.weight"].zero_()  # the file path must not read the shared tensors
    by_file, _, written = pool.train(None, dataclasses.replace(
        TASK, weights_file=path, weights_layout=tuple(layout), update_file=update))
    assert written is not None and not written.error and written.size == Path(update).stat().st_size
    got, nbytes = files.read_update("a", TASK.work.round, written.layout, serde.spec_of(weights))
    assert nbytes == written.size
    for k, v in from_tensors.items():
        assert got[k].numpy().tobytes() == v.numpy().tobytes(), k
    assert (by_file.samples, by_file.loss, by_file.accuracy) == (by_tensors.samples, by_tensors.loss,
                                                                  by_tensors.accuracy)
    assert pool.shared["embedding.weight"].abs().sum() == 0  # the update went to the file only


def test_a_weights_file_the_worker_cannot_use_trains_nothing_and_the_next_round_works(
        pool: WorkerPool, files: SharedFiles) -> None:
    weights = start_weights(pool)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    poisoned = {**weights, name: torch.full_like(weights[name], math.nan)}
    path, layout, _ = files.weights(TASK.work.round, poisoned)
    before = copy(pool.shared)
    update = files.update_file("a", TASK.work.round)
    with pytest.raises(WeightsFileError, match="NaN"):
        pool.train(None, dataclasses.replace(TASK, weights_file=path, weights_layout=tuple(layout),
                                             update_file=update))
    assert not Path(update).exists()  # nothing trained, nothing written
    assert all(torch.equal(pool.shared[k], v) for k, v in before.items())
    result, _, _ = pool.train(weights, TASK)  # streamed weights, as the agent falls back to
    assert result.samples == TASK.work.local_steps * TASK.work.batch_size
    assert all(serde.all_finite(v) for v in pool.shared.values())


def test_an_update_file_outside_a_coordinators_directory_leaves_the_update_in_the_shared_tensors(
        pool: WorkerPool, files: SharedFiles, tmp_path: Path) -> None:
    weights = start_weights(pool)
    path, layout, _ = files.weights(TASK.work.round, weights)
    outside = tmp_path / "update"
    _, _, written = pool.train(None, dataclasses.replace(
        TASK, weights_file=path, weights_layout=tuple(layout), update_file=str(outside)))
    assert written is not None and "not in a coordinator's directory" in written.error
    assert not outside.exists()
    expected = copy(pool.shared)
    pool.train(weights, TASK)
    for k, v in expected.items():  # the update was in the shared tensors: the same as training from them
        assert torch.equal(pool.shared[k], v), k
