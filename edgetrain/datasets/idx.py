"""Strict reader for the IDX format of MNIST (LeCun et al.): big-endian header, then raw data.

Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
one big-endian uint32 per dimension, then ``prod(dims)`` items in C order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from edgetrain.datasets.base import DatasetFormatError

# IDX type codes -> big-endian numpy dtypes (from the format description on LeCun's MNIST page).
IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAGIC_LABELS = 0x00000801  # 2049: unsigned bytes, 1 dimension
MAGIC_IMAGES = 0x00000803  # 2051: unsigned bytes, 3 dimensions
_GZIP_MAGIC = b"\x1f\x8b"


def read_maybe_gzip(path: Path) -> bytes:
    """Bytes of ``path``, gunzipped when it starts with the gzip magic (whatever its suffix)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def parse_idx(
    data: bytes, *, source: str, magic: int | None = None, dims: tuple[int | None, ...] | None = None
) -> np.ndarray:
    """Parse IDX ``data`` into a numpy array (native byte order).

    ``source`` names the file in error messages. ``magic`` (e.g. :data:`MAGIC_IMAGES`)
    pins type and rank; ``dims`` pins dimensions (``None`` entries are free). Raises
    :class:`DatasetFormatError` on a bad magic number, an unexpected dimension, a
    truncated file or trailing bytes.
    """
    if len(data) < 4:
        raise DatasetFormatError(f"{source}: truncated: {len(data)} bytes, too short for an IDX magic number")
    found = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DatasetFormatError(f"{source}: bad magic number 0x{found:08x}: not an IDX file")
    if magic is not None and found != magic:
        raise DatasetFormatError(f"{source}: bad magic number {found} (0x{found:08x}), expected {magic}")
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetFormatError(f"{source}: truncated header: {len(data)} bytes, {ndim} dimensions need {header_len}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims is not None:
        if len(dims) != ndim:
            raise DatasetFormatError(f"{source}: has {ndim} dimensions, expected {len(dims)}")
        for axis, (got, want) in enumerate(zip(shape, dims, strict=True)):
            if want is not None and got != want:
                raise DatasetFormatError(f"{source}: dimension {axis} is {got}, expected {want}")
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload < expected:
        raise DatasetFormatError(
            f"{source}: truncated: header promises {shape} items ({expected} bytes) but only {payload} bytes follow"
        )
    if payload > expected:
        raise DatasetFormatError(f"{source}: {payload - expected} unexpected trailing bytes after the data")
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable, native-order copy
