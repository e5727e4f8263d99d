"""Checkpoints written atomically (temp file, fsync, rename) and loaded without arbitrary unpickling."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from edgetrain.errors import EdgetrainError

LATEST = "checkpoint.pt"
MODEL = "model.pt"


class CheckpointError(EdgetrainError):
    """A checkpoint is missing, unreadable, or from another run."""


@dataclass(frozen=True)
class Checkpoint:
    completed_rounds: int
    state: dict[str, torch.Tensor]
    cursors: dict[str, int]
    meta: dict[str, Any]


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, fsync it, rename over `path`, fsync the folder."""
    _atomic(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a text file as atomic_save does: readers see the old or the new content, never a part."""
    _atomic(path, lambda fh: fh.write(text.encode()))


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
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


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete temp files a killed writer left in `run_dir` (``.<name>.<random>.tmp``, see `_atomic`)."""
    removed = []
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    path = run_dir / LATEST
    atomic_save(
        {
            "completed_rounds": ckpt.completed_rounds,
            "state": ckpt.state,
            "cursors": json.dumps(ckpt.cursors),
            "meta": json.dumps(ckpt.meta),
        },
        path,
    )
    return path


def load(run_dir: Path) -> Checkpoint:
    path = run_dir / LATEST
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
        if not isinstance(raw, dict):
            raise TypeError(f"it holds a {type(raw).__name__}, not a checkpoint's fields")
        return Checkpoint(
            completed_rounds=int(raw["completed_rounds"]),
            state=dict(raw["state"]),
            cursors={str(k): int(v) for k, v in json.loads(raw["cursors"]).items()},
            meta=json.loads(raw["meta"]),
        )
    except pickle.UnpicklingError as exc:  # torch's message suggests loading it unsafely: not said here
        raise CheckpointError(f"cannot read checkpoint {path}: not a file of tensors torch loads safely") from exc
    except (KeyError, ValueError, RuntimeError, OSError, TypeError, EOFError, AttributeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({first}): is it an edgetrain checkpoint?") from exc
