"""Checkpoints and the final model as safetensors: written atomically, checksummed, and loaded without unpickling.

One file holds a checkpoint: safetensors (an 8-byte header length, a JSON header naming each tensor's dtype, shape
and byte range, then the raw bytes), which has no code path on load. Its header's `__metadata__` carries our JSON
(round, cursors, run facts) and a SHA-256 of the whole file taken with the digest's own 64 characters as zeros,
so a flipped bit anywhere (header, metadata or tensor bytes) or a truncated file is refused before anything is
used. One file, not a file and a checksum beside it: the rename that publishes it is then atomic for both.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors
import safetensors.torch
import torch

from edgetrain.errors import EdgetrainError

LATEST = "checkpoint.safetensors"
MODEL = "model.safetensors"
# What an edgetrain before safetensors left in a run folder: torch.save pickles, never loaded (docs/security.md)
LEGACY = ("checkpoint.pt", "model.pt")
FORMAT = "edgetrain-checkpoint/1"
_DIGEST_HOLE = "0" * 64  # the digest's place while the file is hashed


class CheckpointError(EdgetrainError):
    """A checkpoint is missing, unreadable, damaged, or from another run."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint or model could not be written (disk full, read-only, ...); the previous one is intact."""


@dataclass(frozen=True)
class Checkpoint:
    completed_rounds: int
    state: dict[str, torch.Tensor]
    cursors: dict[str, int]
    meta: dict[str, Any]


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a text file atomically: readers see the old or the new content, never a part."""
    _atomic(path, lambda fh: fh.write(text.encode()))


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write to a temp file beside `path`, fsync it, rename it over `path`, fsync the folder.

    An OSError (ENOSPC, EROFS, EIO, ...) becomes one CheckpointWriteError line naming the file; the temp file
    is removed and `path` keeps its previous content.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise write_error(path, exc) from exc


def write_error(path: Path, exc: OSError) -> CheckpointWriteError:
    """One line for a failed write of `path`: "cannot write PATH: No space left on device (ENOSPC)"."""
    code = f" ({errno.errorcode[exc.errno]})" if exc.errno is not None and exc.errno in errno.errorcode else ""
    return CheckpointWriteError(f"cannot write {path}: {exc.strerror or exc}{code}")


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete temp files a killed writer left in `run_dir` (``.<name>.<random>.tmp``, see `_atomic`)."""
    removed = []
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """`tensors` and the JSON `meta` as one checksummed safetensors file, atomically."""
    header = {"format": FORMAT, "meta": json.dumps(meta, sort_keys=True), "sha256": _DIGEST_HOLE}
    blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=header)
    hole = _digest_hole(blob)
    digest = hashlib.sha256(blob).hexdigest().encode()
    view = memoryview(blob)
    _atomic(path, lambda fh: (fh.write(view[:hole]), fh.write(digest), fh.write(view[hole + len(digest):])))


def _digest_hole(blob: bytes) -> int:
    """Where the 64 hex digits of the digest sit in the header."""
    (size,) = struct.unpack("<Q", blob[:8])
    at = blob.find(f'"sha256":"{_DIGEST_HOLE}"'.encode(), 8, 8 + size)
    assert at >= 0, "safetensors wrote no sha256 entry in its header"
    return at + len('"sha256":"')


def read_tensors(path: Path, expected: Mapping[str, torch.Tensor] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A file `write_tensors` wrote: its tensors and meta, after checking its checksum and every tensor.

    Every floating tensor must be finite, and with `expected` the names, shapes and dtypes must be its own.
    Any failure is one CheckpointError line naming the file. Nothing is unpickled.
    """
    try:
        blob = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"no checkpoint at {path}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        (size,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + size])
        extra = header["__metadata__"]
        if extra["format"] != FORMAT:
            raise ValueError(f"format {extra['format']!r}")
        digest = str(extra["sha256"])
    except (struct.error, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeError are ValueErrors
        raise CheckpointError(f"cannot read {path}: not an edgetrain safetensors checkpoint") from exc
    at = blob.find(f'"sha256":"{digest}"'.encode(), 8, 8 + size) if re.fullmatch("[0-9a-f]{64}", digest) else -1
    hole = at + len('"sha256":"')
    hashed = hashlib.sha256(memoryview(blob)[:hole])
    hashed.update(_DIGEST_HOLE.encode())
    hashed.update(memoryview(blob)[hole + len(digest):])
    if at < 0 or hashed.hexdigest() != digest:
        raise CheckpointError(f"{path} is damaged (its SHA-256 does not match: truncated or altered); "
                              "refusing to load it")
    try:
        tensors = safetensors.torch.load(blob)
        meta = json.loads(extra["meta"])
        if not isinstance(meta, dict):
            raise TypeError("meta is not an object")
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if expected is not None:
        _check_fits(path, tensors, expected)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN/Inf value(s); refusing to load it")
    return tensors, meta


def _check_fits(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    if set(tensors) != set(expected):
        odd = sorted(set(tensors) ^ set(expected))
        raise CheckpointError(f"checkpoint in {path.parent} is from another data set or model "
                              f"(tensors {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''} differ)")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"checkpoint in {path.parent} is from another data set or model ({name}: {got.dtype} "
                f"{list(got.shape)} in {path.name}, {want.dtype} {list(want.shape)} in this model)")


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    path = run_dir / LATEST
    write_tensors(path, ckpt.state, {"kind": "checkpoint", "completed_rounds": ckpt.completed_rounds,
                                     "cursors": ckpt.cursors, "run": ckpt.meta})
    return path


def save_model(run_dir: Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """The final model: plain safetensors any safetensors reader opens (our metadata rides in its header)."""
    path = run_dir / MODEL
    write_tensors(path, state, {"kind": "model", "run": dict(meta)})
    return path


def load(run_dir: Path, expected: Mapping[str, torch.Tensor] | None = None) -> Checkpoint:
    """The run's checkpoint, checked whole (see `read_tensors`); an old pickled one is refused, never opened."""
    path = run_dir / LATEST
    if not path.exists() and (run_dir / LEGACY[0]).exists():
        raise CheckpointError(legacy_message(run_dir / LEGACY[0]))
    state, meta = read_tensors(path, expected)
    try:
        if meta.get("kind") != "checkpoint":
            raise ValueError(f"it holds a {meta.get('kind')!r}, not a checkpoint")
        rounds = meta["completed_rounds"]
        if not isinstance(rounds, int) or rounds < 0 or isinstance(rounds, bool):
            raise ValueError(f"completed_rounds {rounds!r}")
        cursors = {str(k): int(v) for k, v in dict(meta["cursors"]).items()}
        run = dict(meta["run"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if any(v < 0 for v in cursors.values()):
        raise CheckpointError(f"cannot read checkpoint {path}: a negative sample cursor")
    return Checkpoint(completed_rounds=rounds, state=state, cursors=cursors, meta=run)


def load_model(path: Path, expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A final model `save_model` wrote, checked as a checkpoint is."""
    return read_tensors(path, expected)[0]


def legacy_message(path: Path) -> str:
    return (f"{path} was written by an older edgetrain with torch.save (a pickle), which this version never loads: "
            "finish that run with the edgetrain that started it, or start a new run (docs/security.md)")
