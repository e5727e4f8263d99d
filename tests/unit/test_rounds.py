import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from edgetrain.coordinator import rounds
from edgetrain.coordinator.rounds import RoundEngine, balanced_steps, timed_budget

from edgetrain.records import Assignment, NodeStats
from tests.conftest import Clock


def _engine(clock: Clock | None = None, **kw: object) -> RoundEngine:
    state = {"w": torch.zeros(3), "n": torch.tensor(0)}
    return RoundEngine(state, batch_size=4, local_steps=2, round_timeout=10.0, clock=clock or Clock(), **kw)  # type: ignore[arg-type]


def _update(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), v), "n": torch.tensor(1)}


def test_a_round_averages_by_samples_and_replaces_the_model() -> None:
    eng = _engine()
    before = eng.global_state
    assign = eng.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    assert [assign["a"].rank, assign["b"].rank] == [0, 1]
    with pytest.raises(rounds.BadSampleCountError, match=r"outside 1\.\.8 "):  # K * batch size * 1 worker
        eng.submit("a", 0, 9, _update(1.0))
    eng.submit("a", 0, 2, _update(1.0))
    eng.submit("b", 0, 6, _update(5.0))
    assert eng.wait_for_updates()
    out = eng.close_round()
    assert out.applied and out.samples == 8
    assert torch.allclose(eng.global_state["w"], torch.full((3,), (2 * 1 + 6 * 5) / 8))
    assert torch.equal(before["w"], torch.zeros(3))  # the old snapshot was never mutated
    assert eng.completed_rounds == 1
    assert eng.cursors == {"2/0": 2, "2/1": 6}


@pytest.mark.parametrize(
    ("round_", "samples", "agent", "error"),
    [
        (1, 4, "a", rounds.StaleRoundError),
        (0, 0, "a", rounds.BadSampleCountError),
        (0, -3, "a", rounds.BadSampleCountError),
        (0, 9, "a", rounds.BadSampleCountError),
        (0, 4, "z", rounds.NotParticipantError),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(round_: int, samples: int, agent: str,
                                                    error: type[Exception]) -> None:
    eng = _engine()
    eng.open_round([("a", 0.0, 1)])
    with pytest.raises(error):
        eng.submit(agent, round_, samples, _update(100.0))
    eng.submit("a", 0, 4, _update(1.0))
    eng.close_round()
    assert torch.allclose(eng.global_state["w"], torch.ones(3))


def test_duplicate_and_late_updates_are_refused() -> None:
    clock = Clock()
    eng = _engine(clock)
    eng.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    eng.submit("a", 0, 4, _update(1.0))
    with pytest.raises(rounds.DuplicateUpdateError):
        eng.submit("a", 0, 4, _update(7.0))
    clock.t += 11
    with pytest.raises(rounds.LateUpdateError):
        eng.submit("b", 0, 4, _update(9.0))
    assert not eng.wait_for_updates()  # deadline passed without b
    out = eng.close_round(min_updates=1)
    assert out.missing == ["b"] and out.applied
    assert torch.allclose(eng.global_state["w"], torch.ones(3))


def test_too_few_updates_keep_the_model_and_rerun_the_round() -> None:
    clock = Clock()
    eng = _engine(clock)
    eng.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    eng.submit("a", 0, 4, _update(1.0))
    clock.t += 11
    out = eng.close_round(min_updates=2)
    assert not out.applied and eng.completed_rounds == 0
    assert torch.equal(eng.global_state["w"], torch.zeros(3))


def test_get_work_long_polls_until_a_round_opens_and_then_finishes() -> None:
    eng = _engine()
    assert eng.get_work("a", -1, timeout=0.05).status == "WAIT"
    got: list[rounds.Work] = []
    t = threading.Thread(target=lambda: got.append(eng.get_work("a", -1, timeout=5)))
    t.start()
    eng.open_round([("a", 0.0, 1)])
    t.join(5)
    assert got[0].status == "WORK" and got[0].round == 0 and got[0].assignment is not None
    eng.submit("a", 0, 4, _update(1.0))
    assert eng.get_work("a", 0, timeout=0.05).status == "WAIT"  # already sent for round 0
    eng.close_round()
    eng.finish()
    assert eng.get_work("a", 0, timeout=1).status == "FINISHED"


def test_a_run_that_failed_tells_every_agent_failed_with_why_never_finished() -> None:
    eng = _engine()
    waiting: list[rounds.Work] = []
    t = threading.Thread(target=lambda: waiting.append(eng.get_work("a", -1, timeout=5)))
    t.start()
    eng.finish("cannot write ckpt: No space left on device (ENOSPC)")
    t.join(5)
    eng.finish()  # the driver's close() finishing again keeps the first reason
    for work in (waiting[0], eng.get_work("b", 3, timeout=1)):
        assert (work.status, work.detail) == ("FAILED", "cannot write ckpt: No space left on device (ENOSPC)")
    assert eng.told_finished == {"a", "b"}  # the driver's grace wait counts them as told


def test_agent_joining_mid_round_waits_for_the_next_and_forget_unblocks() -> None:
    eng = _engine()
    eng.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    assert eng.get_work("late", -1, timeout=0.05).status == "WAIT"
    eng.submit("a", 0, 4, _update(1.0))
    eng.forget("b")
    assert eng.wait_for_updates()


def test_balanced_steps_follow_throughput() -> None:
    assert balanced_steps([100.0, 300.0], 8) == [4, 12]
    assert balanced_steps([0.0, 0.0], 8) == [8, 8]
    assert balanced_steps([100.0, 0.0], 8) == [8, 8]  # unknown counts as the known mean
    assert min(balanced_steps([1.0, 1000.0], 1)) == 1
    eng = _engine(balance=True)
    a = eng.open_round([("slow", 100.0, 1), ("fast", 300.0, 1)])
    assert (a["slow"].local_steps, a["fast"].local_steps) == (1, 3)


def test_balanced_steps_survive_absurd_throughputs() -> None:
    assert balanced_steps([1e308, 1.0], 4) == [8, 1]  # the slow node still gets its one step
    assert balanced_steps([1e308, 1e308], 4) == [4, 4]
    assert balanced_steps([float("inf"), float("nan"), 2.0], 2) == [2, 2, 2]


def _timed_round(eng: RoundEngine, agents: list[tuple[str, float, int]], compute: dict[str, float],
                 samples: dict[str, int]) -> dict[str, Assignment]:
    """One round in which each agent reports `compute` seconds for `samples` samples; its assignments."""
    assigned = eng.open_round(agents)
    for agent_id, _, _ in agents:
        eng.submit(agent_id, eng.completed_rounds, samples[agent_id], _update(1.0),
                   NodeStats(compute_seconds=compute[agent_id]))
    assert eng.close_round().applied
    return assigned


def test_a_timed_round_gives_everyone_the_median_agents_time_for_k_steps() -> None:
    eng = _engine(timed=True)  # K = 2, batch 4
    agents = [("slow", 0.0, 1), ("mid", 0.0, 1), ("fast", 0.0, 2)]
    # seconds per sample: slow 0.04, mid 0.02, fast 0.005 (its two workers: 8 samples a step)
    first = _timed_round(eng, agents, {"slow": 0.32, "mid": 0.16, "fast": 0.08}, {"slow": 8, "mid": 8, "fast": 16})
    assert {a.budget_seconds for a in first.values()} == {0.0}  # nobody measured: K steps each
    assert {a.max_steps for a in first.values()} == {0}
    a = eng.open_round(agents)
    # K steps take slow 2*4*0.04 = 0.32 s, mid 0.16 s, fast 2*8*0.005 = 0.08 s: the median is mid's
    assert [round(a[n].budget_seconds, 6) for n in ("slow", "mid", "fast")] == [0.16] * 3
    assert {x.local_steps for x in a.values()} == {2} and {x.max_steps for x in a.values()} == {4}
    with pytest.raises(rounds.BadSampleCountError, match=r"outside 1\.\.16 "):  # 2K steps * batch 4 * 1 worker
        eng.submit("mid", 1, 17, _update(1.0))
    eng.submit("fast", 1, 32, _update(1.0))  # 2K steps * batch 4 * 2 workers


def test_a_timed_round_is_robust_to_one_agent_claiming_absurd_speed() -> None:
    eng = _engine(timed=True)
    agents = [("a", 0.0, 1), ("b", 0.0, 1), ("liar", 0.0, 1)]
    for _ in range(3):
        _timed_round(eng, agents, {"a": 0.1, "b": 0.12, "liar": 1e-9}, {"a": 8, "b": 8, "liar": 8})
    budget = eng.open_round(agents)["a"].budget_seconds
    assert 0.1 <= budget <= 0.12  # the median of the three, not dragged to nothing


def test_timed_rounds_are_off_for_k_steps_of_one_balanced_work_or_when_not_asked() -> None:
    for kw in ({"timed": False}, {"timed": True, "balance": True}, {"timed": True, "local_steps": 1}):
        state = {"w": torch.zeros(3), "n": torch.tensor(0)}
        eng = RoundEngine(state, batch_size=4, round_timeout=10.0, clock=Clock(), **{"local_steps": 2, **kw})  # type: ignore[arg-type]
        agents = [("a", 1.0, 1), ("b", 1.0, 1)]
        _timed_round(eng, agents, {"a": 0.1, "b": 0.2}, {"a": 4, "b": 4})
        assert {x.budget_seconds for x in eng.open_round(agents).values()} == {0.0}, kw


def test_timed_rounds_by_default_only_with_an_auto_k_on_iid_shards_without_balance() -> None:
    from edgetrain.coordinator.config import CoordinatorConfig

    from edgetrain.spec import RunSpec

    def timed(**kw: object) -> bool:
        return CoordinatorConfig(**{"spec": RunSpec(dataset="tweets"), "local_steps_auto": True, **kw}).times_rounds  # type: ignore[arg-type]

    assert timed()
    assert not timed(local_steps_auto=False)  # an explicit --local-steps: exactly K steps
    assert not timed(spec=RunSpec(dataset="tweets", shard_scheme="dirichlet"))  # a fast node would pull to its classes
    assert not timed(balance=True)
    assert timed(local_steps_auto=False, timed_rounds=True) and not timed(timed_rounds=False)


def test_an_agent_never_plans_more_than_twice_k_steps_whatever_the_header_says() -> None:
    a = Assignment(round=0, rank=0, world=1, local_steps=4, batch_size=8, sample_offset=0,
                   budget_seconds=1.0, max_steps=10**9)
    assert a.steps_and_budget() == (8, 1.0)
    assert a.steps_and_budget(can_stop_early=False) == (4, 0.0)  # workers in lock-step: K steps
    assert Assignment(0, 0, 1, 4, 8, 0).steps_and_budget() == (4, 0.0)  # no budget: K steps


def test_timed_budget_ignores_what_is_not_a_time() -> None:
    assert timed_budget([]) == 0.0
    assert timed_budget([float("nan"), -1.0, 0.0]) == 0.0
    assert timed_budget([3.0, float("inf"), 1.0, 2.0]) == 2.0


class _FailsAfter:
    """An update read back slice by slice (serde.Sliced) whose storage fails after `good` slices."""

    def __init__(self, values: torch.Tensor, good: int) -> None:
        self.shape, self._flat, self._good = values.shape, values.reshape(-1).numpy(), good

    def slices(self) -> Iterator[tuple[int, np.ndarray[Any, np.dtype[np.float32]]]]:
        for i in range(self._flat.size):
            if i == self._good:
                raise OSError(5, "Input/output error")
            yield i, self._flat[i : i + 1]


def test_an_update_that_fails_while_it_is_added_spoils_the_round_which_runs_again() -> None:
    eng = _engine()
    eng.open_round([("a", 0.0, 1), ("b", 0.0, 1), ("c", 0.0, 1)])
    eng.submit("a", 0, 4, _update(1.0))
    failing = {"w": _FailsAfter(torch.full((3,), 5.0), good=1), "n": torch.tensor(1)}
    with pytest.raises(rounds.StagingError):  # checking it reads it too: refused, nothing added
        eng.submit("b", 0, 4, failing)
    assert eng.global_state["w"].sum() == 0
    with pytest.raises(rounds.StagingError):  # checked before (as the servicer does): one value went in, then it failed
        eng.submit("b", 0, 4, failing, checked_finite=True)
    with pytest.raises(rounds.StagingError):  # nothing more goes into a spoiled sum
        eng.submit("c", 0, 4, _update(2.0))
    assert eng.wait_for_updates() is False  # at once: the round will not be applied, whoever sends now
    assert eng.get_work("c", -1, timeout=0).status == "WAIT"  # nor is it handed out any more
    out = eng.close_round(min_updates=1)
    assert not out.applied and out.spoiled and eng.completed_rounds == 0
    assert torch.equal(eng.global_state["w"], torch.zeros(3))
    eng.open_round([("a", 0.0, 1), ("b", 0.0, 1)])  # run again: a fresh sum, nothing of b's half update
    eng.submit("a", 0, 4, _update(1.0))
    eng.submit("b", 0, 4, _update(3.0))  # not "late": a round that closed spoiled missed nobody
    out = eng.close_round()
    assert out.applied and torch.equal(eng.global_state["w"], torch.full((3,), 2.0))


def test_a_running_mean_whose_add_failed_gives_no_result() -> None:
    from edgetrain.aggregation import RunningWeightedMean

    acc = RunningWeightedMean()
    acc.add({"w": torch.ones(3)}, 1)
    with pytest.raises(OSError):
        acc.add({"w": _FailsAfter(torch.full((3,), 5.0), good=2)}, 1)
    assert acc.spoiled and acc.count == 1
    with pytest.raises(RuntimeError, match="failed while it was added"):
        acc.result({"w": torch.zeros(3)})


def test_every_refusal_reason_has_its_error_and_every_error_a_status_code() -> None:
    import grpc
    from edgetrain.coordinator import rounds

    from edgetrain.metric_names import REFUSAL_REASONS

    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in {s, *subclasses(s)}}

    errors = subclasses(rounds.RefusedError)
    assert {e.reason for e in errors} == set(REFUSAL_REASONS)  # one error per label, no label without one
    assert all(e.status in grpc.StatusCode.__members__ for e in errors)
