"""The after-work thread: jobs in submission order, at most `max_states` holding a model, errors in the driver."""

from __future__ import annotations

import threading

import pytest
from edgetrain.coordinator.afterwork import AfterWork


def test_jobs_run_in_order_off_the_calling_thread() -> None:
    after, done, threads = AfterWork(), [], set()

    def job(i: int) -> None:
        threads.add(threading.get_ident())
        done.append(i)

    for i in range(50):
        after.submit(lambda i=i: job(i), holds_state=i % 3 == 0)  # type: ignore[misc]
    after.drain()
    after.close()
    assert done == list(range(50)) and threading.get_ident() not in threads and len(threads) == 1


def test_a_job_holding_a_state_waits_for_the_last_one() -> None:
    """max_states=1: the driver cannot queue a second model while the first is still being evaluated."""
    after, release, started = AfterWork(max_states=1), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        release.wait(10)

    after.submit(slow, holds_state=True)
    started.wait(10)
    after.submit(lambda: None)  # no model held: queued at once
    second = threading.Thread(target=lambda: after.submit(lambda: None, holds_state=True))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # blocked: one model is held already
    release.set()
    second.join(10)
    assert not second.is_alive()
    after.drain()
    after.close()


def test_an_error_reaches_the_driver_and_later_jobs_are_skipped() -> None:
    after, ran = AfterWork(), []

    def fail() -> None:
        raise OSError("disk full")

    after.submit(fail)
    after.submit(lambda: ran.append(1))
    with pytest.raises(OSError, match="disk full"):
        after.drain()
    assert ran == []
    after.close()


def test_init_runs_on_the_thread_first() -> None:
    seen: list[int] = []
    after = AfterWork(init=lambda: seen.append(threading.get_ident()))
    after.submit(lambda: seen.append(threading.get_ident()))
    after.drain()
    after.close()
    assert len(seen) == 2 and seen[0] == seen[1] != threading.get_ident()
