"""state_dict <-> protobuf TensorPart streams: raw little-endian bytes, dtype, shape, 128 KiB parts. No pickle.

Every encoder has its decoder here, and the decoder trusts nothing: names, dtypes, shapes, byte counts,
part order and values are checked against what the receiver expects before anything is used.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch

from edgetrain.errors import NonFiniteError, WireError
from edgetrain.proto import edgetrain_pb2 as pb

# 128 KiB of tensor data per message keeps every message far below gRPC's 4 MB default cap, whatever the model's
# size, and bounds what each part in flight costs the coordinator: gRPC and protobuf copy a part ~4 times between
# the socket and numpy. With 16 agents of the MNIST CNN, 1 MiB -> 256 KiB took 1.7x the model off the coordinator's
# peak, 256 -> 128 KiB another 0.5x; 64 KiB another 0.3x, but a quarter of the rounds per second
# (bench/core_perf.py; docs/performance.md, "Coordinator memory, fifth pass").
PART_BYTES = 1 << 17
MAX_PART_BYTES = 1 << 20  # the most a receiver takes in one part (senders before 128 KiB parts sent 1 MiB)

_TORCH_TO_WIRE: dict[torch.dtype, Any] = {  # values are pb.DType numbers
    torch.float32: pb.FLOAT32,
    torch.float64: pb.FLOAT64,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64,
    torch.int8: pb.INT8,
}
_WIRE_TO_TORCH = {v: k for k, v in _TORCH_TO_WIRE.items()}
UPDATE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects of one tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def spec_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The names, shapes and dtypes a peer must send back for this state dict."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}


def nbytes(spec: Mapping[str, TensorSpec]) -> int:
    """Bytes of uncompressed tensor data a state of this spec holds."""
    return sum(s.nbytes for s in spec.values())


def as_numpy(t: torch.Tensor) -> np.ndarray[Any, Any]:
    """A contiguous CPU tensor's own memory as a flat numpy array (shared, not copied)."""
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same 2 bytes as int16
        t = t.view(torch.int16)
    return t.detach().numpy().reshape(-1)  # flat first: a view with a 0 in its shape cannot be cast


def _raw_bytes(t: torch.Tensor) -> memoryview:
    arr = as_numpy(t.detach().to("cpu").contiguous())
    if arr.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts only
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    return arr.data.cast("B")


def _wire_tensors(
    state: Mapping[str, torch.Tensor], wire_dtype: str
) -> Iterator[tuple[pb.TensorPart, memoryview]]:
    """Each tensor's layout (name, wire dtype, shape, scale; no data) and its raw bytes, compressed as asked."""
    target = _wire_target(wire_dtype)
    for name, tensor in state.items():
        t, scale = _to_wire(tensor.detach(), target)
        if t.dtype not in _TORCH_TO_WIRE:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the wire does not carry")
        yield pb.TensorPart(name=name, dtype=_TORCH_TO_WIRE[t.dtype], shape=list(t.shape), scale=scale), _raw_bytes(t)


def encode(
    state: Mapping[str, torch.Tensor],
    *,
    wire_dtype: str = "float32",
    part_bytes: int = PART_BYTES,
) -> Iterator[pb.TensorPart]:
    """Split a state dict into TensorPart messages, optionally compressing floating tensors.

    `wire_dtype` "float16"/"bfloat16" casts floating tensors; "int8" quantises each floating tensor
    symmetrically with one scale (max|x|/127). Integer tensors always travel as they are.
    """
    return (part for part, _ in encode_sized(state, wire_dtype=wire_dtype, part_bytes=part_bytes))


Slice = tuple[pb.TensorPart, memoryview, int]  # a part's layout (no data), a view of its bytes, its offset


def encode_sized(
    state: Mapping[str, torch.Tensor],
    *,
    wire_dtype: str = "float32",
    part_bytes: int = PART_BYTES,
) -> Iterator[tuple[pb.TensorPart, int]]:
    """`encode`'s parts with the size of each one's data (reading `part.data` back would copy it)."""
    for layout, chunk, offset in slices(state, wire_dtype=wire_dtype, part_bytes=part_bytes):
        part = pb.TensorPart()
        fill(part, layout, chunk, offset)
        yield part, len(chunk)


def slices(
    state: Mapping[str, torch.Tensor],
    *,
    wire_dtype: str = "float32",
    part_bytes: int = PART_BYTES,
) -> Iterator[Slice]:
    """Each part's layout (no data), a view of its bytes in the tensor and its offset: nothing is copied.

    For a sender that makes each part only when it can send it (`fill`), so that no encoded part waits in
    memory: the coordinator's downloads, many at once.
    """
    for layout, raw in _wire_tensors(state, wire_dtype):
        offset = 0
        while True:  # at least one part, even for an empty tensor
            chunk = raw[offset : offset + part_bytes]
            yield layout, chunk, offset
            offset += len(chunk)
            if offset >= len(raw):
                break


def fill(part: pb.TensorPart, layout: pb.TensorPart, chunk: memoryview, offset: int) -> None:
    """Make `part` the part of `slices` given by (layout, chunk, offset): its one copy of the bytes."""
    part.CopyFrom(layout)
    part.offset, part.data = offset, chunk.tobytes()


def write_raw(state: Mapping[str, torch.Tensor], f: BinaryIO, *, wire_dtype: str = "float32") -> list[pb.TensorPart]:
    """Write a state dict's raw bytes back to back to `f` (the same-host file path); returns the layout.

    The layout is one TensorPart per tensor with its name, dtype, shape and scale but no data: what a reader
    needs to cut the file into tensors with `Assembler.add_file`. Compression is `encode`'s.
    """
    layout = []
    for entry, raw in _wire_tensors(state, wire_dtype):
        f.write(raw)
        layout.append(entry)
    return layout


def _wire_target(wire_dtype: str) -> torch.dtype:
    target = UPDATE_DTYPES.get(wire_dtype)
    if target is None:
        raise ValueError(f"unknown wire dtype {wire_dtype!r}; choose from {sorted(UPDATE_DTYPES)}")
    return target


def _to_wire(t: torch.Tensor, target: torch.dtype) -> tuple[torch.Tensor, float]:
    """Cast a floating tensor to the wire dtype; int8 is symmetric with one scale, max|x|/127."""
    if not t.is_floating_point() or target == t.dtype:
        return t, 0.0
    if target == torch.int8:
        peak = float(t.abs().max()) if t.numel() else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        return torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8), scale
    return t.to(target), 0.0


def from_wire(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype == torch.int8 and dtype.is_floating_point:
        return t.to(dtype) * scale
    return t.to(dtype)


def roundtrip(t: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """What the receiver decodes when `t` is sent as `wire_dtype` (for error feedback)."""
    wire, scale = _to_wire(t.detach(), _wire_target(wire_dtype))
    return from_wire(wire, scale, t.dtype)


class Region(Protocol):
    """Where one tensor's bytes go: `region[start:end] = data`."""

    def __setitem__(self, key: slice, data: bytes, /) -> None: ...


class Sliced(Protocol):
    """A floating tensor too big to hold twice, read back a slice at a time (a staged update)."""

    shape: torch.Size

    def slices(self) -> Iterator[tuple[int, np.ndarray[Any, np.dtype[np.float32]]]]:
        """(element offset, float32 values) in order; each array valid until the next is asked for."""
        ...


class Buffers(Protocol):
    """Where an Assembler puts a tensor's bytes: a writable region of `nbytes` for `name`, arriving as `dtype`."""

    def __call__(self, name: str, dtype: torch.dtype, nbytes: int) -> memoryview | bytearray | Region: ...


def widen(raw: memoryview, wire: torch.dtype, scale: float,
           out: np.ndarray[Any, np.dtype[np.float32]]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Little-endian wire values as float32, in `out` unless they are float32 already (then a view of `raw`)."""
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts only
        np.copyto(out, from_wire(from_bytes(raw, wire, (len(out),)), scale, torch.float32).numpy())
        return out
    if wire == torch.float32:
        return np.frombuffer(raw, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an Inf, which `finite` refuses
        if wire == torch.float16:
            np.copyto(out, np.frombuffer(raw, dtype=np.float16))
        elif wire == torch.bfloat16:  # the 16 high bits of a float32: widened first (numpy 1.x shifts in uint16)
            bits = out.view(np.uint32)
            np.copyto(bits, np.frombuffer(raw, dtype=np.uint16))
            np.left_shift(bits, np.uint32(16), out=bits)
        elif wire == torch.int8:
            np.multiply(np.frombuffer(raw, dtype=np.int8), np.float32(scale), out=out)
        else:
            np.copyto(out, np.frombuffer(raw, dtype=np.float64), casting="same_kind")
    return out


def into_tensors(state: Mapping[str, torch.Tensor]) -> Buffers:
    """Decode straight into `state`'s own CPU tensors (a model's weights): only uncompressed, same-dtype data fits.

    A refused decode may leave some of the tensors overwritten: the caller loads them again from elsewhere.
    """

    def view(name: str, dtype: torch.dtype, nbytes: int) -> memoryview:
        t = state[name]
        fits = dtype == t.dtype and t.device.type == "cpu" and t.is_contiguous()
        if not fits or nbytes != t.numel() * t.element_size():
            raise WireError(f"tensor {name!r} cannot be read in place (another dtype, or not in CPU memory)")
        return as_numpy(t).data.cast("B")

    return view


@dataclass(frozen=True)
class Raw:
    """One tensor as it arrived: its bytes (where `Buffers` put them), wire dtype, shape, scale and expected dtype."""

    buffer: memoryview | bytearray | Region
    wire: torch.dtype
    shape: tuple[int, ...]
    scale: float
    dtype: torch.dtype


class Assembler:
    """Rebuild tensors from TensorPart messages, checking each part against the expected spec.

    Feed parts with `add`; `finish` returns the tensors as float32/int64 like the expected dtypes.
    Raises WireError on the first thing that is wrong; nothing partial is ever returned.

    Bytes land in a fresh bytearray per tensor, or where `into` says (reused buffers, a model's own tensors):
    then the tensors `finish` returns may share that memory, and a refused update may have written part of it.
    """

    def __init__(self, expected: Mapping[str, TensorSpec], *, check_finite: bool = True,
                 into: Buffers | None = None) -> None:
        self._expected = expected
        self._check_finite = check_finite
        self._into = into
        self._buffers: dict[str, memoryview | bytearray | Region] = {}
        self._filled: dict[str, int] = {}
        self._meta: dict[str, tuple[int, tuple[int, ...], float]] = {}
        self._current: str | None = None
        self._received = 0

    @property
    def received_bytes(self) -> int:
        return self._received

    def add(self, part: pb.TensorPart, data: bytes | None = None) -> None:
        """Take one part; `data` is `part.data` when the caller read it already (each read is a new copy)."""
        if data is None:
            data = part.data
        name = part.name
        spec = self._expected.get(name)
        if spec is None:
            raise WireError(f"unexpected tensor {name!r}")
        wire_dtype = _WIRE_TO_TORCH.get(part.dtype)
        if wire_dtype is None:
            raise WireError(f"tensor {name!r}: unknown dtype {part.dtype}")
        if not _dtype_allowed(spec.dtype, wire_dtype):
            raise WireError(f"tensor {name!r}: dtype {wire_dtype} cannot stand for {spec.dtype}")
        shape = tuple(int(s) for s in part.shape)
        if shape != spec.shape:
            raise WireError(f"tensor {name!r}: shape {list(shape)}, expected {list(spec.shape)}")
        if wire_dtype == torch.int8 and spec.dtype.is_floating_point:
            if not (math.isfinite(part.scale) and part.scale > 0):
                raise WireError(f"tensor {name!r}: int8 scale {part.scale} is not a positive finite number")
        nbytes = math.prod(shape) * wire_dtype.itemsize
        if name != self._current:
            if name in self._buffers:
                raise WireError(f"tensor {name!r}: parts out of order (it was already started)")
            self._close_current()
            self._current = name
            # sized by the expected spec, never by the sender
            self._buffers[name] = bytearray(nbytes) if self._into is None else self._into(name, wire_dtype, nbytes)
            self._filled[name] = 0
            self._meta[name] = (part.dtype, shape, part.scale)
        filled = self._filled[name]
        if (part.dtype, shape, part.scale) != self._meta[name]:
            raise WireError(f"tensor {name!r}: dtype, shape or scale changed between parts")
        if part.offset != filled:
            raise WireError(f"tensor {name!r}: part at offset {part.offset}, expected {filled}")
        end = filled + len(data)
        if end > nbytes:
            raise WireError(f"tensor {name!r}: more than the {nbytes} bytes its shape holds")
        self._buffers[name][filled:end] = data
        self._filled[name] = end
        self._received += len(data)

    def add_file(self, layout: pb.TensorPart, f: io.BufferedIOBase) -> None:
        """Read one whole tensor described by `layout` (no data) from `f`'s position, with `add`'s checks.

        The name, dtype, shape and scale are checked before a byte is read, and exactly the bytes the expected
        shape holds are read: a short file is refused like a short stream.
        """
        if layout.data or layout.offset:
            raise WireError(f"tensor {layout.name!r}: a file layout entry carries no data and no offset")
        self.add(layout)  # all of add's checks; sizes the buffer from the expected spec
        name = layout.name
        buf = self._buffers[name]
        if not isinstance(buf, (memoryview, bytearray)):
            raise TypeError("add_file reads into memory, not into other buffers")
        view = memoryview(buf)
        filled = 0
        while filled < len(view):
            n = f.readinto(view[filled:])
            if not n:
                raise WireError(f"tensor {name!r}: the file ends after {filled} of its {len(view)} bytes")
            filled += n
        self._filled[name] = filled
        self._received += filled

    def _close_current(self) -> None:
        if self._current is None:
            return
        name = self._current
        wire, shape, _ = self._meta[name]
        nbytes = math.prod(shape) * _WIRE_TO_TORCH[wire].itemsize
        if self._filled[name] != nbytes:
            raise WireError(f"tensor {name!r}: {self._filled[name]} bytes, its shape needs {nbytes}")

    def finish(self) -> dict[str, torch.Tensor]:
        self._check_complete()
        out: dict[str, torch.Tensor] = {}
        for name, spec in self._expected.items():
            wire, shape, scale = self._meta[name]
            buf = self._buffers[name]
            if not isinstance(buf, (memoryview, bytearray)):
                raise TypeError("an update assembled into other buffers is read with finish_raw")
            t = from_wire(from_bytes(buf, _WIRE_TO_TORCH[wire], shape), scale, spec.dtype)
            if self._check_finite and not all_finite(t):
                raise NonFiniteError(f"tensor {name!r}: NaN or Inf values")
            out[name] = t
        self._buffers.clear()
        return out

    def finish_raw(self) -> dict[str, Raw]:
        """Every tensor's bytes where `into` put them, undecoded, once all arrived (a `Buffers` of its own kind)."""
        self._check_complete()
        out = {}
        for name, spec in self._expected.items():
            wire, shape, scale = self._meta[name]
            out[name] = Raw(self._buffers[name], _WIRE_TO_TORCH[wire], shape, scale, spec.dtype)
        self._buffers.clear()
        return out

    def _check_complete(self) -> None:
        self._close_current()
        missing = [k for k in self._expected if k not in self._buffers]
        if missing:
            raise WireError(f"missing tensors: {', '.join(missing[:5])}")


def finite(state: Mapping[str, torch.Tensor | Sliced]) -> bool:
    """Every floating tensor free of NaN and Inf (a staged one read back slice by slice)."""
    return all(
        all_finite(t) if isinstance(t, torch.Tensor) else all(_finite_array(v) for _, v in t.slices())
        for t in state.values()
    )


_BF16_EXPONENT = 0x7F80  # bfloat16's exponent bits: all set means Inf or NaN


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a CPU tensor (integer tensors always pass).

    Checked with numpy, which runs on the calling thread only: torch's isfinite is an OpenMP parallel region
    whose threads wait for each other, and on a machine whose cores are busy training (the coordinator shares
    them with local agents) that wait cost 2-30 ms per model instead of 0.3 ms.

    A sum of the values first: any NaN or Inf makes it NaN or Inf, and it allocates nothing (the element-wise
    test made a model-sized mask each time: 0.5 ms vs 0.17 ms for the MNIST CNN). Only a sum that is not
    finite, which finite values can also give by overflowing, is looked at element by element.
    """
    if not t.is_floating_point():
        return True
    if t.device.type != "cpu" or t.requires_grad:
        return bool(torch.isfinite(t).all())
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: look at the exponent bits
        bits = t.contiguous().view(torch.int16).numpy()
        return not bool((np.bitwise_and(bits, _BF16_EXPONENT) == _BF16_EXPONENT).any())
    return _finite_array(t.numpy().reshape(-1))


def _finite_array(arr: np.ndarray[Any, Any]) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(arr)):
            return True
    return bool(np.isfinite(arr).all())


def _dtype_allowed(expected: torch.dtype, wire: torch.dtype) -> bool:
    if expected.is_floating_point:
        return wire.is_floating_point or wire == torch.int8
    return wire == expected


def from_bytes(buf: memoryview | bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf:
        return torch.zeros(shape, dtype=dtype)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts only
        np_dtype = np.dtype("<i2" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch."))
        arr = np.frombuffer(buf, dtype=np_dtype.newbyteorder("<")).astype(np_dtype.newbyteorder("="))
        return torch.from_numpy(arr).view(dtype).reshape(shape)
    # Shares the buffer (no copy); the tensor keeps the buffer alive.
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def decode_file(
    f: io.BufferedIOBase,
    layout: Sequence[pb.TensorPart],
    expected: Mapping[str, TensorSpec],
    *,
    check_finite: bool = True,
    into: Buffers | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Assemble a state dict from a file written by `write_raw` (see Assembler.add_file); returns (tensors, bytes).

    The file must end exactly where the layout does.
    """
    asm = Assembler(expected, check_finite=check_finite, into=into)
    for entry in layout:
        asm.add_file(entry, f)
    if f.read(1):
        raise WireError("the file holds more bytes than its layout describes")
    return asm.finish(), asm.received_bytes


def decode(
    parts: Iterable[pb.TensorPart], expected: Mapping[str, TensorSpec], *, check_finite: bool = True
) -> dict[str, torch.Tensor]:
    """Assemble a complete state dict from parts (see Assembler)."""
    asm = Assembler(expected, check_finite=check_finite)
    for part in parts:
        asm.add(part)
    return asm.finish()
