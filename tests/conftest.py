"""Shared by every test module: the one `free_port` of the tests (product code has its own: edgetrain.procs)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgetrain.coordinator.runlog import RoundRecord


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a race is possible: whoever binds it later retries or fails)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Clock:
    """A clock the test moves by hand (`clock.t += 1.0`), for code that takes a `clock` callable."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def round_record(**fields: Any) -> RoundRecord:
    """A run log's round record with the fields a test names, zeros (no nodes, not evaluated) for the rest."""
    from edgetrain.coordinator.runlog import RoundRecord

    base: dict[str, Any] = {"round": 0, "duration_seconds": 0.0, "sync_overhead_seconds": 0.0, "samples": 0,
                            "samples_per_second": 0.0, "missing": (), "nodes": {}, "elapsed_seconds": 0.0,
                            "training_share": 0.0}
    return RoundRecord(**(base | fields))
