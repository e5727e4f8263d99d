"""A closed round's after-work (evaluation, its log record, the checkpoint) off the rounds' critical path.

The driver opened the next round only once the global model had been evaluated on test and val, logged and
checkpointed, and the agents waited meanwhile. Here one thread does that work, in the order the rounds closed,
while the agents train the next round. The global model is replaced at each round, never changed in place
(coordinator/rounds.py), so the state a job was given stays that round's.

Memory stays O(model): at most `max_states` jobs that hold a global model wait or run; the driver blocks before
handing over another (in practice never: an evaluation takes a fraction of a round).
An error in a job (a full disk under a checkpoint) is raised in the driver at its next `submit` or at `drain`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

Job = Callable[[], None]


class AfterWork:
    """One worker thread running jobs in submission order."""

    def __init__(self, max_states: int = 1, init: Callable[[], None] | None = None) -> None:
        """`init` runs first on the thread (e.g. torch.set_num_threads, which holds for the whole process)."""
        self._init = init
        self._jobs: queue.Queue[tuple[Job, bool] | None] = queue.Queue()
        self._states = threading.BoundedSemaphore(max_states)
        self._error: BaseException | None = None
        self._failed = False  # stays set once a job failed: later jobs are skipped (the run stops)
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="edgetrain-afterwork", daemon=True)
        self._thread.start()

    def submit(self, job: Job, *, holds_state: bool = False) -> None:
        """Queue `job`; with `holds_state` (it keeps a global model alive) wait while `max_states` such jobs are in."""
        self.raise_error()
        if holds_state:
            self._states.acquire()
        with self._idle:
            self._pending += 1
        self._jobs.put((job, holds_state))

    def drain(self) -> None:
        """Wait until every queued job ran; raise the first error one of them raised."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        self.raise_error()

    def raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Stop the thread once the queued jobs ran (their errors are dropped: the run is ending anyway)."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            if self._init is not None:
                self._init()
        except BaseException as exc:
            self._error, self._failed = exc, True
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, holds_state = item
            try:
                if not self._failed:  # after a failure the run stops: later jobs would only add to it
                    job()
            except BaseException as exc:  # handed to the driver, raised there
                self._error, self._failed = exc, True
            finally:
                if holds_state:
                    self._states.release()
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
