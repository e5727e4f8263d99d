"""A run's log: one JSON `RoundRecord` per line in `LOG` in the run folder, named, written and read here only.

`coordinator run` appends a record per round (coordinator/run.py, through `LogWriter`) and trims the log to its
checkpoint on resume; `coordinator report` and the benchmarks read it back, checked (`read_log`). The JSON keys
are those of every earlier version, so old logs still read.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

from edgetrain.errors import EdgetrainError
from edgetrain.records import NodeStats

from . import checkpoint

LOG = "rounds.jsonl"


class ReportError(EdgetrainError):
    """The run folder has no readable log."""


@dataclass(frozen=True)
class Figures:
    """The global model's figures on one split (the log writes test's bare, val's with a `val_` prefix)."""

    accuracy: float
    loss: float
    macro_f1: float
    macro_recall: float
    metric: float  # the run's --metric


@dataclass(frozen=True)
class RoundRecord:
    """One applied round, as the run log keeps it (one JSON object per line, keys as the fields here)."""

    round: int
    duration_seconds: float
    sync_overhead_seconds: float  # the round's wall time minus its slowest node's compute
    samples: int
    samples_per_second: float
    missing: tuple[str, ...]  # participants that sent nothing in time
    nodes: Mapping[str, NodeStats]  # by node name
    elapsed_seconds: float  # since this process's first round (a resumed run counts from 0 again)
    training_share: float  # the nodes' mean time in training steps over `elapsed_seconds`
    test: Figures | None = None  # rounds that were evaluated
    val: Figures | None = None  # ... where the data set has a val split
    local_steps: int = 0  # K the round asked for (--balance: the mean of its nodes' steps; 0: an older log)
    update_dtype: str = ""  # the dtype it asked uploads in ("": an older log)

    @property
    def judged(self) -> float | None:
        """The figure a --target is judged by: the run's metric on val, on test only without a val split."""
        chosen = self.val or self.test
        return None if chosen is None else chosen.metric

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "round": self.round, "duration_seconds": self.duration_seconds,
            "sync_overhead_seconds": self.sync_overhead_seconds, "samples": self.samples,
            "samples_per_second": self.samples_per_second, "missing": list(self.missing),
            "nodes": {name: asdict(stats) for name, stats in self.nodes.items()},
            "elapsed_seconds": self.elapsed_seconds, "training_share": self.training_share,
            "local_steps": self.local_steps, "update_dtype": self.update_dtype,
        }
        for prefix, figures in (("", self.test), ("val_", self.val)):
            if figures is not None:
                record.update({prefix + k: v for k, v in asdict(figures).items()})
        return record

    @classmethod
    def from_json(cls, record: object) -> RoundRecord:
        """A logged record; ValueError names the first field the reader cannot use.

        Fields older logs lack read as 0 (a node's `bytes`, `training_share`, ...) or, among an evaluation's
        figures, as NaN.
        """
        problem = _record_problem(record)
        if problem:  # valid JSON that is not a round record would otherwise end in a KeyError/TypeError
            raise ValueError(problem)
        assert isinstance(record, dict)
        return cls(
            round=record["round"], duration_seconds=record["duration_seconds"],
            sync_overhead_seconds=record.get("sync_overhead_seconds", 0.0), samples=record.get("samples", 0),
            samples_per_second=record.get("samples_per_second", 0.0), missing=tuple(record.get("missing", ())),
            nodes={name: NodeStats(**{f: stats[f] for f in _NODE_FIELDS if f in stats})
                   for name, stats in record["nodes"].items()},
            elapsed_seconds=record["elapsed_seconds"], training_share=record.get("training_share", 0.0),
            test=_figures(record, ""), val=_figures(record, "val_"), local_steps=record.get("local_steps", 0),
            update_dtype=record.get("update_dtype", ""),
        )


_NODE_FIELDS = tuple(f.name for f in fields(NodeStats))


def _figures(record: dict[str, Any], prefix: str) -> Figures | None:
    """The split's figures, where the record has its accuracy (the evaluated rounds)."""
    if prefix + "accuracy" not in record:
        return None
    return Figures(**{f.name: record.get(prefix + f.name, math.nan) for f in fields(Figures)})


class LogWriter:
    """Appends a run's round records to `LOG` in `run_dir`; the file is made with the first record."""

    def __init__(self, run_dir: Path, *, append: bool) -> None:
        """`append`: go on with the log there (a resumed run), else start it anew."""
        self.path = run_dir / LOG
        self._append = append
        self._file: IO[str] | None = None

    def write(self, record: RoundRecord) -> None:
        """The record as one line, flushed; a failed write raises checkpoint.CheckpointWriteError."""
        try:
            if self._file is None:
                self._file = open(self.path, "a" if self._append else "w")  # noqa: SIM115
            self._file.write(json.dumps(record.to_json()) + "\n")
            self._file.flush()
        except OSError as exc:  # a torn last line is dropped by --resume (trim_log)
            raise checkpoint.write_error(self.path, exc) from exc

    def close(self) -> None:
        """Close the file; a failing close (a full disk fails its flush too) was said by the write already."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def read_log(run_dir: Path) -> list[RoundRecord]:
    """A run folder's round records, each checked for the fields `coordinator report` reads."""
    path = run_dir / LOG
    if not path.exists():
        raise ReportError(f"no {LOG} in {run_dir}: is it a run folder?")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{i}: not JSON ({exc.msg})") from exc
        try:
            records.append(RoundRecord.from_json(record))
        except ValueError as exc:
            raise ReportError(f"{path}:{i}: not a round record ({exc})") from exc
    if not records:
        raise ReportError(f"{path} is empty: no round has completed yet")
    return records


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _record_problem(record: object) -> str:
    """What keeps `record` from being plotted ("" if nothing): the fields write_report reads."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key in ("round", "duration_seconds", "elapsed_seconds"):
        if not _is_number(record.get(key)):
            return f"{key} missing or not a number"
    if "accuracy" in record and not _is_number(record["accuracy"]):
        return "accuracy is not a number"
    missing = record.get("missing", [])
    if not isinstance(missing, list) or not all(isinstance(n, str) for n in missing):
        return "missing is not a list of node names"
    nodes = record.get("nodes")
    if not isinstance(nodes, dict):
        return "nodes missing or not an object"
    for name, stats in nodes.items():
        if not isinstance(stats, dict):
            return f"nodes.{name} is not an object"
        for key in ("accuracy", "compute_seconds", "communication_seconds"):
            if not _is_number(stats.get(key)):
                return f"nodes.{name}.{key} missing or not a number"
    return ""


def trim_log(path: Path, completed: int) -> None:
    """Keep the log's records of rounds before `completed` (the checkpoint's), atomically.

    A coordinator killed after logging round r but before checkpointing it runs round r again on resume;
    without this the log would hold r twice (or a torn last line).
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] < completed:
            kept.append(line + "\n")
    checkpoint.atomic_write_text(path, "".join(kept))
