"""When evaluation and checkpoints are due: every N rounds, or by their own measured cost (auto)."""

from __future__ import annotations

import pytest
from edgetrain.coordinator.cadence import AUTO_BUDGET, Cadence

from tests.conftest import Clock


def test_every_n_rounds_is_a_plain_modulo() -> None:
    cadence = Cadence(3)
    assert [r for r in range(1, 11) if cadence.due(r)] == [3, 6, 9]


def test_auto_runs_at_once_then_keeps_its_cost_within_the_budget_of_the_wall_time() -> None:
    clock = Clock()
    cadence = Cadence(None, budget=0.1, clock=clock)
    assert cadence.due(1)  # never run: due
    cadence.begin()
    assert not cadence.due(2)  # scheduled and not finished: never due twice
    clock.t += 0.5
    cadence.end(0.5)  # it took 0.5 s: due again 5 s after it began
    clock.t += 4.4
    assert not cadence.due(3)
    clock.t += 0.2
    assert cadence.due(4)
    cadence.begin()
    cadence.end(0.0)  # free: due at every round
    assert cadence.due(5)


def test_timed_tells_end_the_seconds_of_its_block() -> None:
    clock = Clock()
    cadence = Cadence(None, budget=0.5, clock=clock)
    cadence.begin()
    with cadence.timed():
        clock.t += 2.0  # the job takes 2 s: due again 4 s after it began
    assert not cadence.due(1)
    clock.t += 2.1
    assert cadence.due(2)


def test_a_cheap_job_runs_every_round_and_a_costly_one_about_once_in_twenty() -> None:
    clock = Clock()
    for cost, expected in ((0.001, 100), (0.1, 5)):
        cadence = Cadence(None, clock=clock)
        runs = 0
        for r in range(1, 101):  # rounds of 0.1 s, the job on another thread
            clock.t += 0.1
            if cadence.due(r):
                cadence.begin()
                cadence.end(cost)
                runs += 1
        assert runs == expected, (cost, runs, AUTO_BUDGET)


@pytest.mark.parametrize(("every", "budget"), [(0, 0.05), (-1, 0.05), (None, 0.0), (None, 1.5)])
def test_bad_settings_are_refused(every: int | None, budget: float) -> None:
    with pytest.raises(ValueError):
        Cadence(every, budget)
