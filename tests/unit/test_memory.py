"""The recycler hands memory out again only once nothing made from it is alive."""

from __future__ import annotations

import gc
import subprocess
from pathlib import Path

import pytest
import torch
from edgetrain.coordinator.rounds import RoundEngine

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



def test_compute_heap_takes_large_buffers_from_the_heap_and_gives_them_back_after() -> None:
    """The coordinator's tuned allocator maps every large buffer anew; within compute_heap it must not."""
    import subprocess
    import sys

    code = """
import numpy as np, psutil
from edgetrain.memory import compute_heap, tune_malloc

def on_heap(a):  # in the main thread, heap memory is the [heap] mapping; a buffer of its own is elsewhere
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                return int(lo <= a.ctypes.data < hi)
    return 0

assert tune_malloc()
a = np.ones(1 << 21, dtype=np.float32); tuned = on_heap(a); del a
with compute_heap():
    b = np.ones(1 << 21, dtype=np.float32); inside = on_heap(b)
    held = psutil.Process().memory_info().rss
    del b
after = psutil.Process().memory_info().rss
c = np.ones(1 << 21, dtype=np.float32); again = on_heap(c)
print(tuned, inside, again, (held - after) // (1 << 20))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    tuned, inside, again, released_mb = (int(v) for v in out.stdout.split())
    assert tuned == 0  # an 8 MiB buffer is a mapping of its own under the coordinator's settings ...
    assert inside == 1  # ... but comes from the heap while computing ...
    assert again == 0  # ... and the setting is back afterwards
    assert released_mb >= 7  # the heap's 8 MiB went back to the system when compute_heap ended


def test_in_memory_fs_tells_a_tmpfs_from_a_disk(tmp_path: Path) -> None:
    from edgetrain.memory import in_memory_fs

    def fs_type(path: str | Path) -> str:  # coreutils' answer, from statfs(2)
        return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip()

    if fs_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    assert in_memory_fs("/dev/shm") and in_memory_fs("/dev/shm/not-made-yet")
    assert not in_memory_fs("/proc")
    assert in_memory_fs(tmp_path) == (fs_type(tmp_path) in ("tmpfs", "ramfs"))


def test_recycled_buffers_start_on_64_byte_boundaries_like_torchs() -> None:
    rec = Recycler()
    for n in (1, 3, 17, 1000, 300_001):
        t = rec.empty((n,))
        assert t.data_ptr() % 64 == 0 and t.numel() == n
