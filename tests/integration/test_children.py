"""Pinned runs with real spawned children: one that finishes before the one awaited has not died; one that dies has.

`run_pinned` reads its children's results in rank order. Under load a later rank can finish (send its result and
exit) while rank 0 still works: bench/core_perf.py's lock-step pair stopped on that with "pinned child 1 exited
unexpectedly (exit code 0)".
"""

from __future__ import annotations

import os
import time

import pytest

from edgetrain.cores import allowed_cores
from edgetrain.pinned import ChildSetup, PinnedError, run_pinned


def _one_rank_late(setup: ChildSetup, late: int, delay: float) -> int:
    if setup.rank == late:
        time.sleep(delay)
    return setup.rank * 10


def _rank_one_dies(setup: ChildSetup, how: str) -> int:
    if setup.rank == 1:
        if how == "exit":
            os._exit(3)  # no message, no cleanup
        raise ValueError("rank 1 gave up")
    time.sleep(30.0)  # rank 0 would answer long after: the failure must be heard before
    return 0


@pytest.mark.parametrize("late", [0, 1])
def test_a_child_that_finished_cleanly_is_not_dead(late: int) -> None:
    """Rank 1 first: its result waits for its turn. Rank 0 first: read, it exits while rank 1 is awaited."""
    core = allowed_cores()[:1]  # both on one core: the test needs no second core
    assert run_pinned(_one_rank_late, [core, core], late, 2.0) == [0, 10]


@pytest.mark.parametrize(("how", "said"), [
    ("exit", r"pinned child 1 \(cores \d+\) exited unexpectedly \(exit code 3\)"),
    ("raise", r"pinned child 1 \(cores \d+\): ValueError: rank 1 gave up"),  # its own words, not "exited"
])
def test_a_child_that_dies_while_another_is_awaited_stops_the_run_at_once(how: str, said: str) -> None:
    core = allowed_cores()[:1]
    t0 = time.monotonic()
    with pytest.raises(PinnedError, match=said):
        run_pinned(_rank_one_dies, [core, core], how)
    assert time.monotonic() - t0 < 25.0  # not rank 0's 30 s


def _says_hello_then_ends(index: int, conn: object) -> None:
    conn.send("hello")  # type: ignore[attr-defined]
    if index == 1:
        return  # ends cleanly, exit code 0, as a one-shot child would
    time.sleep(30.0)  # child 0 is awaited and never answers in time


def test_a_long_lived_child_that_ends_even_cleanly_has_died() -> None:
    """Without one_shot (the agent's training workers, which run until told to stop) any child that ended has died."""
    from edgetrain.procs import ChildError, Children

    children = Children(_says_hello_then_ends, [(0,), (1,)], name="test-child", describe=lambda i: f"child {i}")
    try:
        assert children.recv(0, 10.0) == "hello"
        assert children.recv(1, 10.0) == "hello"
        t0 = time.monotonic()
        with pytest.raises(ChildError, match=r"child 1 exited unexpectedly \(exit code 0\)"):
            children.recv(0, 20.0)  # child 1 has ended meanwhile
        assert time.monotonic() - t0 < 15.0
        with pytest.raises(ChildError, match=r"child 1 exited unexpectedly"):
            for _ in range(100):  # the pipe may take a write or two before it reports the other end gone
                children.send(1, "more")
    finally:
        children.stop(0.5)
