"""A run's log: one JSON round record per line in `LOG` in the run folder, named here once.

`coordinator run` appends a record per round (coordinator/run.py) and trims the log to its checkpoint on
resume; `coordinator report` reads it back, checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgetrain.errors import EdgetrainError

from . import checkpoint

LOG = "rounds.jsonl"


class ReportError(EdgetrainError):
    """The run folder has no readable log."""


def read_log(run_dir: Path) -> list[dict[str, Any]]:
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
        problem = _record_problem(record)
        if problem:  # valid JSON that is not a round record would otherwise end in a KeyError/TypeError
            raise ReportError(f"{path}:{i}: not a round record ({problem})")
        records.append(record)
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
