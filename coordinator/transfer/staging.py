"""Where an update's bytes wait while it is read: a reused buffer (`Arena`) or a reused staging file (`Stage`).

Both are `serde.Buffers`: an `Assembler` writes each tensor's bytes where they say and checks them as serde
does. They are reused upload after upload by whoever holds an upload slot (`Pool`), so the coordinator's memory
stays O(model) however many agents upload: page-faulting a fresh model-sized buffer per update cost ~2 ms of the
round, and an update waiting whole in a file is in the page cache (or on disk), outside the process's RSS.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from edgetrain import serde


class Arena:
    """One reusable buffer the size of a whole update of `expected`, cut per tensor.

    Whoever decodes into it owns it until the decoded tensors are no longer used; a tensor that arrives in a
    wider dtype than expected (float64 for float32) gets a fresh buffer instead.
    """

    def __init__(self, expected: Mapping[str, serde.TensorSpec]) -> None:
        self._slots: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, spec in expected.items():
            size = spec.nbytes
            self._slots[name] = (offset, size)
            offset += -(-size // 64) * 64  # each tensor on a 64-byte boundary, as allocators give them
        self._memory = memoryview(bytearray(offset))

    def __call__(self, name: str, dtype: torch.dtype, nbytes: int) -> memoryview | bytearray:
        offset, size = self._slots.get(name, (0, -1))
        if nbytes > size:
            return bytearray(nbytes)
        return self._memory[offset : offset + nbytes]


class Stage:
    """A reusable file where one streamed update waits, whole, until it is checked and added slice by slice.

    The coordinator writes an update's parts here as they arrive instead of into a model-sized buffer; once every
    part is in, `finish_staged` hands out its floating tensors as `StagedTensor`s that read the file back a slice
    at a time. The update is checked whole before any of it is added to the round's sum (a NaN in its last part
    adds nothing). `end` empties the file again: its pages are in the kernel's page cache only while an update is
    in it, and, in a directory on disk, can be written out when memory is short. On a tmpfs they are memory as
    much as an `Arena` would be, but only while an update is in them.

    The file has no name (it goes when the Stage is closed or collected, or the process dies). Whoever holds
    the Stage owns the file until its tensors are no longer used. Staged tensors are float32 (the sum's dtype):
    the coordinator stages updates only for models whose floating tensors are all float32.
    """

    CHUNK = 1 << 15  # elements per slice read back: 128 KiB of float32

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        with tempfile.TemporaryFile(dir=directory) as f:
            self.fd = os.dup(f.fileno())  # a plain descriptor, closed with the Stage or when it is collected
        self.close = weakref.finalize(self, os.close, self.fd)
        self._end = 0
        self._read = bytearray(self.CHUNK * 8)  # the widest wire dtype (float64)
        self._out = np.empty(self.CHUNK, dtype=np.float32)

    def begin(self) -> Stage:
        """Start a new update at the file's start."""
        self._end = 0
        return self

    def end(self) -> None:
        """Drop the update's bytes (the page cache's pages go back at once, none is written to disk)."""
        os.ftruncate(self.fd, 0)
        self._end = 0

    def staged_bytes(self) -> int:
        """Bytes of the file in the page cache or on disk now."""
        return os.fstat(self.fd).st_blocks * 512

    def __call__(self, name: str, dtype: torch.dtype, nbytes: int) -> _FileRegion:
        region = _FileRegion(self, self._end, nbytes)
        self._end += nbytes
        return region

    def tensor(self, region: _FileRegion, wire: torch.dtype, shape: tuple[int, ...], scale: float,
               dtype: torch.dtype, base: torch.Tensor | None) -> StagedTensor | torch.Tensor:
        """A staged float32 tensor; integer ones (counters, small) are read whole."""
        if dtype.is_floating_point:
            if dtype != torch.float32:
                raise TypeError(f"a staged tensor is float32 (the sum's dtype), not {dtype}")
            return StagedTensor(self, region, wire, shape, scale, base)
        whole = bytearray(region.nbytes)
        self.read_into(memoryview(whole), region.offset)
        return serde.from_wire(serde.from_bytes(whole, wire, shape), scale, dtype)

    def read_into(self, view: memoryview, offset: int) -> None:
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n <= 0:
                raise OSError(f"the staging file ended {len(view)} bytes early")
            view, offset = view[n:], offset + n


class _FileRegion:
    def __init__(self, stage: Stage, offset: int, nbytes: int) -> None:
        self.stage, self.offset, self.nbytes = stage, offset, nbytes

    def __setitem__(self, key: slice, data: bytes, /) -> None:
        view, at = memoryview(data), self.offset + key.start
        while view:
            n = os.pwrite(self.stage.fd, view, at)
            view, at = view[n:], at + n


class StagedTensor:
    """A float32 tensor in a `Stage`'s file, read back a slice at a time (`base` + it for a delta)."""

    def __init__(self, stage: Stage, region: _FileRegion, wire: torch.dtype, shape: tuple[int, ...], scale: float,
                 base: torch.Tensor | None) -> None:
        self._stage, self._region, self._wire, self._scale = stage, region, wire, scale
        self.shape = torch.Size(shape)
        self._base = None if base is None else serde.as_numpy(base.detach().to(torch.float32).contiguous())

    def slices(self) -> Iterator[tuple[int, np.ndarray[Any, np.dtype[np.float32]]]]:
        """(element offset, float32 values): each array is only valid until the next one is asked for.

        Bit for bit what `Assembler.finish` (and `apply_delta` for a delta) make of the same bytes: float16 and
        bfloat16 widen exactly, int8 is float32(value) * float32(scale) as torch computes it. Into the Stage's
        own buffers: nothing is allocated per slice.
        """
        stage, size = self._stage, self._wire.itemsize
        numel = self.shape.numel()
        for lo in range(0, numel, stage.CHUNK):
            n = min(stage.CHUNK, numel - lo)
            raw = memoryview(stage._read)[: n * size]
            stage.read_into(raw, self._region.offset + lo * size)
            out = stage._out[:n]
            values = serde.widen(raw, self._wire, self._scale, out)
            if self._base is not None:
                with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an Inf, which `finite` refuses
                    values = np.add(self._base[lo : lo + n], values, out=out)
            yield lo, values


def finish_staged(asm: serde.Assembler,
                  base: Mapping[str, torch.Tensor] | None = None) -> dict[str, serde.Sliced | torch.Tensor]:
    """`Assembler.finish` for an update assembled into a `Stage`: its floating tensors stay in the file.

    `base`: the update is a delta, and the tensors read back are base + delta. Values are not checked here:
    `serde.finite` reads them back for that (a staged update is checked whole before any of it is used).
    """
    out: dict[str, serde.Sliced | torch.Tensor] = {}
    for name, raw in asm.finish_raw().items():
        region = raw.buffer
        if not isinstance(region, _FileRegion):
            raise TypeError("finish_staged is for an Assembler writing into a Stage")
        delta_base = base[name] if base is not None and raw.dtype.is_floating_point else None
        out[name] = region.stage.tensor(region, raw.wire, raw.shape, raw.scale, raw.dtype, delta_base)
    return out


_T = TypeVar("_T")


class Pool(Generic[_T]):
    """Objects reused by whoever holds an upload slot: one is made when none is free and kept for the next."""

    def __init__(self, make: Callable[[], _T], discard: Callable[[_T], object] = lambda _: None) -> None:
        self._make, self._discard = make, discard
        self._lock = threading.Lock()
        self._free: list[_T] = []
        self._made: list[_T] = []
        self._dropped: list[_T] = []
        self._closed = False

    @contextmanager
    def take(self) -> Iterator[_T]:
        with self._lock:
            item = self._free.pop() if self._free else None
        if item is None:
            item = self._make()
            with self._lock:
                self._made.append(item)
        try:
            yield item
        finally:
            with self._lock:
                keep = not self._closed and all(d is not item for d in self._dropped)
                if keep:
                    self._free.append(item)
                else:  # given back after close, or dropped: nobody takes it again
                    self._made = [m for m in self._made if m is not item]
                    self._dropped = [d for d in self._dropped if d is not item]
            if not keep:
                self._discard(item)

    def drop(self, item: _T) -> None:
        """Discard `item` (taken now) when it is given back instead of keeping it."""
        with self._lock:
            self._dropped.append(item)

    def made(self) -> list[_T]:
        with self._lock:
            return list(self._made)

    def close(self) -> None:
        """Discard the free ones now, the others as they come back."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            self._made = [m for m in self._made if all(m is not f for f in free)]
        for item in free:
            self._discard(item)
