"""What a client may hold: Join fields, rates, call counts, the stream watchdog, and who a round waits for."""

from __future__ import annotations

import gc
import random
import threading
import time
import weakref
from contextlib import ExitStack

import pytest
import torch
from edgetrain.agent.client import poll_again_delay
from edgetrain.coordinator.admission import (
    HANDLER_THREADS,
    CallCounts,
    JoinRate,
    KnownNames,
    Limits,
    PollSlots,
    Watchdog,
    join_problem,
    metrics_address,
    with_newcomers_capped,
)
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.membership import FullError, Membership
from edgetrain.coordinator.rounds import LateUpdateError, NotParticipantError, RoundEngine, StaleRoundError, quorum_of

from edgetrain.errors import ConfigError
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.records import NodeStats
from edgetrain.spec import RunSpec
from tests.conftest import Clock


def test_wildcard_metrics_addresses_are_advertised_as_the_peer() -> None:
    assert metrics_address("0.0.0.0:9101", "ipv4:10.1.2.3:5555") == ("10.1.2.3:9101", None)
    assert metrics_address("[::]:9101", "ipv6:[fd00::7]:5555") == ("[fd00::7]:9101", None)
    assert metrics_address("", "ipv4:10.1.2.3:5555") == ("", None)


def test_a_metrics_address_must_be_the_callers_own_unless_the_operator_allows_others() -> None:
    assert metrics_address("10.1.2.3:9101", "ipv4:10.1.2.3:5555") == ("10.1.2.3:9101", None)
    for claimed in ("169.254.169.254:80", "agent-a:9101", "10.1.2.4:9101"):
        address, problem = metrics_address(claimed, "ipv4:10.1.2.3:5555")
        assert address == "" and problem is not None and "--sd-any-host" in problem
    assert metrics_address("agent-a:9101", "ipv4:10.1.2.3:5555", any_host=True) == ("agent-a:9101", None)


@pytest.mark.parametrize("claimed", ["junk", "host:0", "host:99999", "a\nb:1", "x" * 300 + ":1", ":9101",
                                     "bad host!:1"])
def test_malformed_metrics_addresses_are_refused_even_where_any_host_is_allowed(claimed: str) -> None:
    address, problem = metrics_address(claimed, "ipv4:10.1.2.3:5555", any_host=True)
    assert address == "" and problem is not None and problem.startswith("metrics_address")


def test_join_fields_are_bounded() -> None:
    ok = dict(name="board-7", cores=[0, 1], device="cpu", workers=2, data_fingerprint="")
    assert join_problem(**ok) is None  # type: ignore[arg-type]
    bad = [
        dict(cores=list(range(5000))),  # a million cores cost the probe 42 MB a Join
        dict(cores=[0, 0]),
        dict(cores=[-1]),
        dict(device="x" * 3_000_000),
        dict(device="cpu\nforged log line"),
        dict(device="tpu"),
        dict(workers=3),
        dict(name="a\nb"),
        dict(data_fingerprint="f" * 200),
        dict(data_fingerprint="ab cd"),
    ]
    for change in bad:
        assert join_problem(**{**ok, **change}) is not None, change  # type: ignore[arg-type]
    assert join_problem(**{**ok, "device": "cuda:1"}) is None  # type: ignore[arg-type]


def test_join_rate_is_a_bucket_per_host_that_refills() -> None:
    clock = Clock()
    rate = JoinRate(per_second=2.0, burst=3, clock=clock)
    assert [rate.allow("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("10.0.0.2")  # another host has its own bucket
    clock.t += 0.5  # one token back
    assert rate.allow("10.0.0.1") and not rate.allow("10.0.0.1")


def test_join_rate_keeps_a_bounded_table_of_hosts() -> None:
    rate = JoinRate(per_second=1.0, burst=1, max_hosts=10)
    for i in range(100):
        rate.allow(f"h{i}")
    assert len(rate._buckets) == 10


def test_call_counts_refuse_past_the_limit_and_free_on_exit() -> None:
    counts = CallCounts(limit=2)
    with counts.hold("a") as one, counts.hold("a") as two, counts.hold("a") as three, counts.hold("b") as other:
        assert (one, two, three, other) == (True, True, False, True)
        assert counts.open_calls("a") == 2
    assert counts.open_calls("a") == 0
    with counts.hold("a") as again:
        assert again


def test_poll_slots_keep_room_for_measured_agents_past_the_newcomers_share() -> None:
    slots = PollSlots(total=3, newcomers=1)
    with ExitStack() as stack:
        assert stack.enter_context(slots.hold(measured=False))
        assert not stack.enter_context(slots.hold(measured=False))  # the newcomers' share is taken
        assert stack.enter_context(slots.hold(measured=True))
        assert stack.enter_context(slots.hold(measured=True))
        assert slots.held() == (2, 1)
        assert not stack.enter_context(slots.hold(measured=True))  # all taken
    assert slots.held() == (0, 0)
    with slots.hold(measured=False) as ok:
        assert ok


@pytest.mark.parametrize("name", ["probation_grace_ratio", "min_grace_seconds", "newcomer_grace_ratio"])
def test_limits_refuse_a_negative_grace(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be 0 or more"):
        Limits(**{name: -0.1})  # type: ignore[arg-type]
    assert getattr(Limits(**{name: 0.0}), name) == 0.0  # type: ignore[arg-type]


def test_limits_keep_long_polls_below_the_handler_threads() -> None:
    with pytest.raises(ConfigError, match="held_polls"):
        Limits(held_polls=HANDLER_THREADS)
    with pytest.raises(ConfigError, match="held_polls"):
        Limits(held_polls=4, newcomer_polls=8)


def test_watchdog_fires_once_unless_reset_or_cancelled() -> None:
    dog = Watchdog()
    fired: list[str] = []
    done = threading.Event()
    late = dog.arm(0.05, lambda: (fired.append("late"), done.set()))
    cancelled = dog.arm(0.02, lambda: fired.append("cancelled"))
    cancelled.cancel()
    kept = dog.arm(0.02, lambda: fired.append("kept"))
    kept.reset(10.0)  # moved past the test's end: never fires
    assert done.wait(5)
    time.sleep(0.05)
    assert fired == ["late"] and late.fired and not kept.fired
    late.reset(0.01)  # a fired timer stays fired
    time.sleep(0.05)
    assert fired == ["late"]
    dog.close()


def test_watchdog_holds_one_entry_per_armed_timer_and_nothing_of_a_closed_one() -> None:
    """The soak's leak: each part's reset queued an entry holding the call's context for up to 30 s after."""

    class Context:  # stands for the gRPC context a stream's callback holds
        pass

    dog = Watchdog()
    ctx = Context()
    gone = weakref.ref(ctx)
    timer = dog.arm(30.0, lambda c=ctx: None)
    del ctx
    for i in range(100):  # a part each: the end moves later, the heap keeps its one entry
        timer.reset(30.0 + i)
    assert dog.pending() == 1
    timer.cancel()
    assert dog.pending() == 0
    timer.reset(30.0)  # a cancelled timer may be armed again (an update that gets its upload slot)
    assert dog.pending() == 1
    gc.disable()  # freed by reference counts alone, not by a cyclic collection some time later
    try:
        timer.close()
        assert dog.pending() == 0 and gone() is None
    finally:
        gc.enable()
    timer.reset(0.0)  # closed for good
    assert dog.pending() == 0
    fired = threading.Event()
    early = dog.arm(30.0, fired.set)
    early.reset(0.01)  # an earlier end replaces the later entry
    assert fired.wait(5) and early.fired and dog.pending() == 0
    dog.close()


def test_membership_is_capped_and_a_replacement_does_not_count_twice() -> None:
    members = Membership(max_agents=2)
    members.admit("a")
    members.admit("b")
    with pytest.raises(FullError):
        members.admit("c")
    new, old = members.admit("a")  # a restart under its name
    assert old is not None and members.by_session(new.session_token) is new
    assert members.by_session(old.session_token) is None and len(members) == 2


def test_sweep_evicts_agents_that_never_poll_or_go_quiet_but_not_busy_ones() -> None:
    left: list[str] = []
    members = Membership(on_leave=lambda a: left.append(a.name))
    never, quiet, busy, calling, fresh = (members.admit(n)[0] for n in ("never", "quiet", "busy", "calling", "fresh"))
    for a in (quiet, busy, calling):
        a.polled, a.last_seen = True, 0.0
    fresh.polled, fresh.last_seen = True, 95.0
    never.joined_at = 0.0
    gone = members.sweep(first_poll=50, idle=60, busy={busy.agent_id},
                         open_calls=lambda agent_id: 1 if agent_id == calling.agent_id else 0, now=100.0)
    assert sorted(a.name for a in gone) == ["never", "quiet"] == sorted(left)
    assert {a.name for a in members.live()} == {"busy", "calling", "fresh"}


def _engine(clock: Clock, quorum: int = 1, **limits: float) -> RoundEngine:
    state = {"w": torch.zeros(3)}
    return RoundEngine(state, batch_size=4, local_steps=2, round_timeout=100.0, clock=clock,
                       limits=Limits(**limits), quorum=quorum)  # type: ignore[arg-type]


def test_a_round_does_not_wait_for_a_ghost_that_never_fetches() -> None:
    clock = Clock()
    engine = _engine(clock, fetch_grace_seconds=3.0)
    engine.open_round([("real", 0.0, 1), ("ghost", 0.0, 1)])
    assert engine.get_work("real", -1, 0).status == "WORK"
    engine.submit("real", 0, 8, {"w": torch.ones(3)})
    clock.t += 2.9
    waived, _ = engine._waived(clock.t)
    assert waived == set()  # within its grace it is still waited for
    clock.t += 0.2
    assert engine.wait_for_updates() is False  # returns: nobody left to wait for
    outcome = engine.close_round()
    assert outcome.applied and outcome.missing == ["ghost"]


def test_in_timed_rounds_a_measured_agent_is_waited_for_up_to_slack_times_the_budget() -> None:
    clock = Clock()
    state = {"w": torch.zeros(3)}
    engine = RoundEngine(state, batch_size=4, local_steps=2, round_timeout=100.0, clock=clock, timed=True,
                         limits=Limits(slack=3.0, min_wait_seconds=0.1))
    for _ in range(2):  # each round takes 0.2 s from fetch to update (0.1 s per step), but they say 2 s of compute
        engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
        engine.get_work("a", engine.completed_rounds - 1, 0)
        engine.get_work("b", engine.completed_rounds - 1, 0)
        clock.t += 0.2
        for agent in ("a", "b"):
            engine.submit(agent, engine.completed_rounds, 8, {"w": torch.ones(3)}, NodeStats(compute_seconds=2.0))
        engine.close_round()
    assigned = engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    assert assigned["b"].budget_seconds == 2.0  # K steps x 4 samples x 0.25 s per sample
    engine.get_work("a", 1, 0)
    engine.get_work("b", 1, 0)
    clock.t += 2.0
    engine.submit("a", 2, 8, {"w": torch.ones(3)})
    clock.t += 3.9  # past 3 x b's last 0.2 s round, inside 3 x the round's 2 s budget
    assert engine._waived(clock.t)[0] == set()
    clock.t += 0.2
    assert engine._waived(clock.t)[0] == {"b"}


def test_a_measured_agent_is_waited_for_up_to_slack_times_its_round_time() -> None:
    clock = Clock()
    engine = _engine(clock, slack=3.0, min_wait_seconds=0.1)
    for _ in range(2):  # round 0: nobody measured, both are waited for; it measures them (1 s and 2 s)
        engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
        engine.get_work("a", engine.completed_rounds - 1, 0)
        engine.get_work("b", engine.completed_rounds - 1, 0)
        clock.t += 1.0
        engine.submit("a", engine.completed_rounds, 8, {"w": torch.ones(3)})
        clock.t += 1.0
        engine.submit("b", engine.completed_rounds, 8, {"w": torch.ones(3)})
        engine.close_round()
    engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    engine.get_work("a", 1, 0)
    engine.get_work("b", 1, 0)
    engine.submit("a", 2, 8, {"w": torch.ones(3)})
    clock.t += 5.9  # b's usual 2 s, times 3
    assert engine._waived(clock.t)[0] == set()
    clock.t += 0.2
    assert engine._waived(clock.t)[0] == {"b"}


def test_quorum_is_k_of_the_participants_at_most_all_and_at_least_one() -> None:
    assert [quorum_of(k, 3) for k in (1, 2, 3, 5)] == [1, 2, 3, 3]
    assert quorum_of(0, 3) == 1 and quorum_of(2, 0) == 1


def test_a_quorum_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="--quorum must be at least 1, got 0"):
        CoordinatorConfig(spec=RunSpec(dataset="tweets"), quorum=0)


def test_with_a_quorum_participants_past_their_measured_deadline_are_waited_for_until_k_updates_are_in() -> None:
    clock = Clock()
    engine = _engine(clock, quorum=2, slack=3.0, min_wait_seconds=0.1)
    names = ("a", "b", "c")
    for _ in range(2):  # every agent measured: 1 s a round, 0.5 s a step
        engine.open_round([(n, 0.0, 1) for n in names])
        for n in names:
            engine.get_work(n, engine.completed_rounds - 1, 0)
        clock.t += 1.0
        for n in names:
            engine.submit(n, engine.completed_rounds, 8, {"w": torch.ones(3)})
        engine.close_round()
    engine.open_round([(n, 0.0, 1) for n in names])
    for n in names:
        engine.get_work(n, 1, 0)
    engine.submit("a", 2, 8, {"w": torch.ones(3)})
    clock.t += 10.0  # b and c far past 3 x their 1 s: one update in, the quorum is two
    assert engine._waived(clock.t)[0] == set()
    engine.submit("b", 2, 8, {"w": torch.ones(3)})
    assert engine._waived(clock.t)[0] == {"c"}  # two in: c is given up on
    assert engine.wait_for_updates() is False
    assert engine.close_round().missing == ["c"]


def test_a_newcomer_is_let_go_once_the_measured_are_in_and_its_late_update_measures_it() -> None:
    clock = Clock()
    engine = _engine(clock, newcomer_grace_ratio=0.5, min_grace_seconds=0.25)  # the test's, not the defaults
    engine.open_round([("a", 0.0, 1)])
    engine.get_work("a", -1, 0)
    clock.t += 1.0
    engine.submit("a", 0, 8, {"w": torch.ones(3)})
    engine.close_round()  # a is measured: 0.5 s a step
    engine.open_round([("a", 0.0, 1), ("new", 0.0, 1)])
    engine.get_work("a", 0, 0)
    engine.get_work("new", -1, 0)
    clock.t += 2.0
    engine.submit("a", 1, 8, {"w": torch.ones(3)})  # in after 2 s: the newcomer gets 0.5 x 2 s more, no floor
    assert engine._waived(clock.t + 0.9)[0] == set()
    assert engine._waived(clock.t + 1.1)[0] == {"new"}
    clock.t += 1.1
    engine.close_round()
    clock.t += 3.0
    with pytest.raises(LateUpdateError):  # its update comes late: refused, and it measures it
        engine.awaiting("new")
    assert engine._per_step["new"] == pytest.approx((2.0 + 1.1 + 3.0) / 2)


def test_by_default_a_newcomer_holds_no_round_past_its_measured_participants_fetched_or_not() -> None:
    clock = Clock()
    engine = _engine(clock)  # the defaults: newcomer_grace_ratio 0, fetch_grace 3 s
    engine.open_round([("a", 0.0, 1)])
    engine.get_work("a", -1, 0)
    clock.t += 1.0
    engine.submit("a", 0, 8, {"w": torch.ones(3)})
    engine.close_round()
    engine.open_round([("a", 0.0, 1), ("fetcher", 0.0, 1), ("poller", 0.0, 1)])
    engine.get_work("a", 0, 0)
    engine.get_work("fetcher", -1, 0)  # fetches and never sends; "poller" never even fetches
    clock.t += 0.5
    assert engine._waived(clock.t)[0] == set()  # the measured one is still at work: nobody is let go
    engine.submit("a", 1, 8, {"w": torch.ones(3)})
    assert engine._waived(clock.t)[0] == {"fetcher", "poller"}  # not 3 s for the one that never fetched
    assert engine.wait_for_updates() is False


def test_with_no_measured_participant_an_unfetched_newcomer_still_has_the_fetch_grace() -> None:
    clock = Clock()
    engine = _engine(clock, fetch_grace_seconds=3.0)
    engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])  # a run's first round: nobody measured yet
    engine.get_work("a", -1, 0)
    engine.submit("a", 0, 8, {"w": torch.ones(3)})
    assert engine._waived(clock.t + 2.9)[0] == set()
    assert engine._waived(clock.t + 3.1)[0] == {"b"}


def test_a_newcomer_is_waited_for_while_the_round_needs_its_update_but_no_longer_than_a_slow_measured_one() -> None:
    clock = Clock()
    engine = _engine(clock, slack=3.0, min_wait_seconds=1.0)
    engine.open_round([("a", 0.0, 1)])
    engine.get_work("a", -1, 0)
    clock.t += 1.0
    engine.submit("a", 0, 8, {"w": torch.ones(3)})
    engine.close_round()  # a: 0.5 s a step, 2 steps: a measured agent is waited for 3 x 1 s
    engine.open_round([("a", 0.0, 1), ("new", 0.0, 1)], min_updates=2)  # --min-agents 2
    engine.get_work("a", 0, 0)
    engine.get_work("new", -1, 0)
    fetched = clock.t
    engine.submit("a", 1, 8, {"w": torch.ones(3)})
    assert engine._waived(fetched + 2.9)[0] == set()  # the round would close short and run again without it
    assert engine._waived(fetched + 3.1)[0] == {"new"}  # a ghost holds it no longer than a slow measured agent
    engine.submit("new", 1, 8, {"w": torch.ones(3)})
    assert engine.wait_for_updates() is True and engine.close_round(min_updates=2).applied


def test_a_slow_newcomer_is_measured_by_its_late_update_even_rounds_later() -> None:
    clock = Clock()
    engine = _engine(clock)
    engine.open_round([("a", 0.0, 1)])
    engine.get_work("a", -1, 0)
    clock.t += 0.2
    engine.submit("a", 0, 8, {"w": torch.ones(3)})
    engine.close_round()
    engine.open_round([("a", 0.0, 1), ("slow", 0.0, 1)])
    engine.get_work("a", 0, 0)
    engine.get_work("slow", -1, 0)
    clock.t += 0.2
    engine.submit("a", 1, 8, {"w": torch.ones(3)})
    engine.close_round()  # slow let go at once: it missed round 1
    engine.open_round([("a", 0.0, 1)])  # sat out, and this round closes before slow's update comes
    engine.get_work("a", 1, 0)
    clock.t += 0.2
    engine.submit("a", 2, 8, {"w": torch.ones(3)})
    engine.close_round()
    clock.t += 0.6
    with pytest.raises(LateUpdateError):
        engine.awaiting("slow")
    assert engine._per_step["slow"] == pytest.approx(1.0 / 2)  # fetched 1 s before, 2 steps: no newcomer now
    engine.open_round([("a", 0.0, 1), ("slow", 0.0, 1)])
    engine.get_work("a", 2, 0)
    engine.get_work("slow", 2, 0)
    engine.submit("a", 3, 8, {"w": torch.ones(3)})
    assert engine._waived(clock.t + 1.9)[0] == set()  # waited for as a measured agent (min_wait 2 s)


def test_an_agent_restarted_under_a_known_name_is_no_newcomer() -> None:
    clock = Clock()
    engine = _engine(clock, min_grace_seconds=0.5)
    engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    for agent in ("a", "b"):
        engine.get_work(agent, -1, 0)
        engine.submit(agent, 0, 8, {"w": torch.ones(3)})
    engine.close_round()
    engine.forget("b")  # b left (or crashed) and came back as b2, under a name whose updates were taken
    engine.vouch("b2")
    engine.open_round([("a", 0.0, 1), ("b2", 0.0, 1), ("ghost", 0.0, 1)])
    for agent in ("a", "b2", "ghost"):
        engine.get_work(agent, -1 if agent != "a" else 0, 0)
    engine.submit("a", 1, 8, {"w": torch.ones(3)})
    assert engine._waived(clock.t)[0] == {"ghost"}  # the newcomer at once; b2 has the returning agent's grace
    assert engine._waived(clock.t + 0.6)[0] == {"ghost", "b2"}


def test_known_names_keep_the_latest_cap() -> None:
    known = KnownNames(cap=3)
    for name in ("a", "b", "c", "a", "d"):  # a taken again: the latest
        known.add(name)
    assert [n for n in "abcd" if n in known] == ["a", "c", "d"]


def test_an_agent_that_missed_its_last_round_gets_the_floored_grace_not_the_newcomers() -> None:
    clock = Clock()
    engine = _engine(clock, probation_grace_ratio=0.5, min_grace_seconds=1.5)  # the test's, not the defaults
    engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    for agent in ("a", "b"):
        engine.get_work(agent, -1, 0)
    clock.t += 1.0
    for agent in ("a", "b"):
        engine.submit(agent, 0, 8, {"w": torch.ones(3)})
    engine.close_round()  # both measured
    engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    engine.get_work("a", 0, 0)
    engine.submit("a", 1, 8, {"w": torch.ones(3)})
    clock.t += 200.0
    engine.close_round()  # b missed it: unmeasured again, but it has sent before
    engine.open_round([("a", 0.0, 1), ("b", 0.0, 1)])
    engine.get_work("a", 1, 0)
    engine.get_work("b", 1, 0)
    clock.t += 1.0
    engine.submit("a", 2, 8, {"w": torch.ones(3)})  # in after 1 s: b gets max(1.5, 0.5 x 1 s)
    assert engine._waived(clock.t + 1.4)[0] == set()
    assert engine._waived(clock.t + 1.6)[0] == {"b"}


def test_an_update_stream_is_refused_before_its_header_when_nothing_could_be_taken() -> None:
    clock = Clock()
    engine = _engine(clock)
    with pytest.raises(StaleRoundError):
        engine.awaiting("a")
    engine.open_round([("a", 0.0, 1)])
    engine.awaiting("a")  # a participant the round still lacks: its stream may wait for its header
    with pytest.raises(NotParticipantError):
        engine.awaiting("b")


def test_an_agent_that_missed_the_last_round_counts_as_busy_until_its_hard_deadline() -> None:
    clock = Clock()
    engine = _engine(clock)  # round_timeout 100 s
    engine.open_round([("a", 0.0, 1), ("slow", 0.0, 1)])
    engine.get_work("a", -1, 0)
    engine.get_work("slow", -1, 0)
    assert engine.busy() == {"a", "slow"}
    engine.submit("a", 0, 8, {"w": torch.ones(3)})
    engine.close_round()  # slow missed it, and may still be training it
    assert engine.busy() == {"slow"}
    clock.t += 100.1
    assert engine.busy() == set()


def test_a_round_takes_at_most_max_cap_or_measured_newcomers_earliest_first() -> None:
    measured = {"m1", "m2"}
    agents = ["m1", "n1", "n2", "m2", "n3", "n4"]
    assert with_newcomers_capped(agents, measured.__contains__, 3) == ["m1", "n1", "n2", "m2", "n3"]
    assert with_newcomers_capped(agents, measured.__contains__, 1) == ["m1", "n1", "n2", "m2"]  # 2 measured: room 2
    assert with_newcomers_capped(["n1", "n2"], measured.__contains__, 8) == ["n1", "n2"]


def test_a_round_with_no_update_yet_gives_up_only_on_ghosts() -> None:
    """A measured agent slowed past its allowance (a loaded machine) is not given up on while nothing is in: the
    round would close empty and run again, with that agent benched (seen under the ghost flood of bench/hostile)."""
    clock = Clock()
    engine = _engine(clock, slack=3.0, min_wait_seconds=0.1, fetch_grace_seconds=1.0)
    engine.open_round([("a", 0.0, 1)])
    engine.get_work("a", -1, 0)
    clock.t += 1.0
    engine.submit("a", 0, 8, {"w": torch.ones(3)})
    engine.close_round()  # a: 0.5 s a step, so 3 s for its 2 steps
    engine.open_round([("a", 0.0, 1), ("ghost", 0.0, 1)])
    engine.get_work("a", 0, 0)
    clock.t += 10.0  # far past a's allowance and the ghost's fetch grace
    assert engine._waived(clock.t)[0] == {"ghost"}
    engine.submit("a", 1, 8, {"w": torch.ones(3)})
    assert engine.wait_for_updates() is False and engine.close_round().applied


def test_an_agent_told_to_poll_again_waits_about_that_long_and_never_past_a_minute() -> None:
    rng = random.Random(0)
    assert poll_again_delay(pb.RoundHeader(status=pb.WAIT), rng) == 0.0  # a long-poll that ran out: at once
    assert poll_again_delay(pb.RoundHeader(status=pb.WORK, poll_again_ms=1000), rng) == 0.0
    delays = [poll_again_delay(pb.RoundHeader(status=pb.WAIT, poll_again_ms=1000), rng) for _ in range(200)]
    assert 0.5 <= min(delays) < 0.6 and 1.4 < max(delays) <= 1.5  # spread, so agents told together come apart
    assert poll_again_delay(pb.RoundHeader(status=pb.WAIT, poll_again_ms=10**9), rng) <= 90.0
