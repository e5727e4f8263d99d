"""Keep resident memory close to live memory in processes that stream many megabyte-sized buffers.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB), after which the
tensor parts and gRPC buffers come from per-thread heap arenas that keep freed memory. With many agents
streaming at once the coordinator's RSS then grows ~40x the model (measured by bench/core_perf.py); a fixed
threshold (which also turns the adjustment off) and two arenas keep it near what is really in use.
The price is latency: every megabyte buffer is then a fresh mmap (page faults, zeroing); measured on a 2-agent
MNIST round, an agent's upload took ~40 ms with it and ~13 ms without. Only the coordinator, which serves many
agents at once, applies it; an agent holds one model and keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value: buffers this large go straight to mmap
TRIM_THRESHOLD = 128 * 1024  # glibc's default: free memory above this at the heap's top goes back at once
ARENA_MAX = 2


# While the coordinator computes (evaluating the global model), buffers up to this size come from the heap: with
# every activation a fresh mmap, evaluating text-cnn on the tweets' test split took 480 ms instead of 300 ms
# (a third of the README job's wall time).
COMPUTE_MMAP_THRESHOLD = 64 * 1024 * 1024
_tuned = False


@functools.cache
def _glibc() -> Any:
    """The C library's handle where it is glibc, else None (musl and others have no mallopt)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Apply the settings where the C library is glibc; returns whether it did (a no-op elsewhere)."""
    global _tuned
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    _tuned = bool(libc.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1 and ok)
    return _tuned


@contextmanager
def compute_heap() -> Iterator[None]:
    """Within: large buffers come from the heap again (fast to reuse); after: the threshold is back, memory trimmed.

    For compute between rounds in a process `tune_malloc` tuned (a no-op otherwise). Buffers other threads take
    meanwhile (a late upload's parts) come from the heap too, and go back to the system with the trim.
    """
    libc = _glibc() if _tuned else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, COMPUTE_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, COMPUTE_MMAP_THRESHOLD)  # nor does the heap shrink and refault batch by batch
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.malloc_trim(0)


_MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


def in_memory_fs(path: str | os.PathLike[str]) -> bool:
    """Whether files under `path` live in RAM (a tmpfs or ramfs), by the mount it is on; False where unknown."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])  # "\040": a space
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        return False
    return kind in _MEMORY_FILESYSTEMS


class Recycler:
    """float32 tensors whose memory is handed out again once nothing uses it any more.

    The coordinator's running sum becomes the next global model, so every round needs a new model-sized sum;
    a fresh one page-faulted ~2 ms of the round (see `tune_malloc`: every such buffer is a new mmap). Buffers
    come from numpy arrays kept here: every tensor, view or numpy array made from one holds a reference to its
    array, so a reference count down to the recycler's own says the memory is free again. At most `keep`
    buffers of each size are kept; past that, allocations are ordinary.
    """

    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._buffers: dict[int, list[np.ndarray[tuple[int], np.dtype[np.float32]]]] = {}
        self._lock = threading.Lock()
        # What a buffer nobody else holds counts, measured the way `empty` counts (interpreters differ in the
        # references they take themselves: 3.14 borrows some that 3.11 counts).
        self._free = _references([np.empty(1, dtype=np.float32)], 0)

    def empty(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        n = math.prod(shape)
        with self._lock:
            mine = self._buffers.setdefault(n, [])
            for i in range(len(mine)):
                if _references(mine, i) <= self._free:
                    return torch.from_numpy(mine[i]).view(shape)
            buf = _aligned(n)
            if len(mine) < self._keep:
                mine.append(buf)
        return torch.from_numpy(buf).view(shape)


def _aligned(n: int) -> np.ndarray[tuple[int], np.dtype[np.float32]]:
    """A float32 array of n values from a 64-byte boundary, as torch allocates (numpy's are 16-byte aligned).

    The coordinator evaluates on these tensors: text-cnn on the tweets' test split took 201-204 ms on numpy's
    alignment against 195-196 ms on a copy in torch's memory, and 196-200 ms on these (medians of 6, noisy machine).
    """
    raw = np.empty(n + 16, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip : skip + n]


def _references(buffers: list[np.ndarray[tuple[int], np.dtype[np.float32]]], i: int) -> int:
    return sys.getrefcount(buffers[i])
