"""When a recurring cost of the run (evaluating the global model, writing a checkpoint) is due.

Every N rounds, as the user asked, or by default (`every=None`, the CLI's `auto`) by its own measured cost: it
is due again once its last run's seconds are at most `budget` of the wall time since that run began, so it
takes about that share of the run whatever the model, data or machine (a cheap evaluation runs every round,
one that takes a round's time runs every ~20 rounds). A job not finished yet is never due again: they do not
pile up on the after-work thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

AUTO_BUDGET = 0.05  # the share of the wall time an `auto` job may take


class Cadence:
    def __init__(self, every: int | None, budget: float = AUTO_BUDGET,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if every is not None and every < 1:
            raise ValueError(f"every must be at least 1 or None, got {every}")
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.every, self.budget, self._clock = every, budget, clock
        self._lock = threading.Lock()
        self._began: float | None = None  # when the last run began
        self._cost = 0.0  # its seconds
        self._running = False

    def due(self, completed_rounds: int) -> bool:
        """Whether to run it after `completed_rounds` rounds (the run's last round is the caller's to force)."""
        if self.every is not None:
            return completed_rounds % self.every == 0
        with self._lock:
            if self._running:
                return False
            return self._began is None or (self._clock() - self._began) * self.budget >= self._cost

    def begin(self) -> None:
        """A run is scheduled now (it may start later, on another thread): no other is due until it ends."""
        with self._lock:
            self._running = True
            self._began = self._clock()

    def end(self, seconds: float) -> None:
        """The scheduled run took `seconds`."""
        with self._lock:
            self._running = False
            self._cost = max(0.0, seconds)

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Run the scheduled job in this block, and tell `end` its seconds (not if it raised: the run stops)."""
        began = self._clock()
        yield
        self.end(self._clock() - began)
