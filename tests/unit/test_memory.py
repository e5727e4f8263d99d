"""The recycler hands memory out again only once nothing made from it is alive."""

from __future__ import annotations

import gc

import torch

from coordinator.rounds import RoundEngine
from edgetrain.memory import Recycler


def test_memory_is_handed_out_again_only_once_every_tensor_view_and_array_of_it_is_gone() -> None:
    r = Recycler()
    first = r.empty((3, 4))
    address = first.data_ptr()
    view = first[1:]
    array = view.numpy()
    del first, view
    assert r.empty((3, 4)).data_ptr() != address  # the numpy array still uses it
    del array
    gc.collect()
    again = r.empty((12,))
    assert again.data_ptr() == address and again.shape == (12,)
    assert r.empty((2, 6)).data_ptr() != address  # `again` holds it now


def test_at_most_keep_buffers_per_size_are_kept() -> None:
    r = Recycler(keep=2)
    held = [r.empty((5,)) for _ in range(3)]
    addresses = {t.data_ptr() for t in held}
    del held
    gc.collect()
    assert r.empty((5,)).data_ptr() in addresses
    assert len(r._buffers[5]) == 2


def test_the_engine_sums_into_the_memory_of_a_global_model_nobody_holds_any_more() -> None:
    state = {"w": torch.zeros(64), "n": torch.tensor(1)}
    engine = RoundEngine(state, batch_size=1, local_steps=1, round_timeout=30)
    seen = []
    for round_ in range(4):
        engine.open_round([("a", 0.0, 1)])
        engine.submit("a", round_, 1, {"w": torch.full((64,), float(round_)), "n": torch.tensor(1)})
        assert engine.close_round().applied
        seen.append(engine.global_state["w"].data_ptr())
        assert torch.equal(engine.global_state["w"], torch.full((64,), float(round_)))
    assert len(set(seen)) < len(seen)  # rounds 2 and 3 reused the memory of rounds 0 and 1
    kept = engine.global_state  # a caller that holds a global model keeps it unchanged
    for round_ in range(4, 7):
        engine.open_round([("a", 0.0, 1)])
        engine.submit("a", round_, 1, {"w": torch.full((64,), float(round_)), "n": torch.tensor(1)})
        assert engine.close_round().applied
    assert torch.equal(kept["w"], torch.full((64,), 3.0))

