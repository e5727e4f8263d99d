"""Hostile or broken clients against a real coordinator on loopback: none of them stops a real agent's rounds.

One test per finding of the outside probe (docs/security.md, "Limits"). Each asserts the legitimate agent's
progress structurally (its update taken, the round closed with it) while the attack holds what it can, and what
the attack got: the status, the counted reason, nothing stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import grpc
import pytest
import torch
from edgetrain.coordinator.admission import CONTROL_MESSAGE_BYTES, HANDLER_THREADS, Limits

from edgetrain import grpc_options, serde
from edgetrain.proto import edgetrain_pb2 as pb
from tests.integration.conftest import Service, make_service, small_state

Metadata = list[tuple[str, str]]


def _trained() -> dict[str, torch.Tensor]:
    return {k: (v + 1 if v.is_floating_point() else v) for k, v in small_state().items()}


def _update(agent_id: str, round_: int) -> list[pb.UpdateMessage]:
    header = pb.UpdateHeader(agent_id=agent_id, round=round_, num_samples=8, stats=pb.NodeStats(compute_seconds=0.1))
    return [pb.UpdateMessage(header=header)] + [pb.UpdateMessage(part=p) for p in serde.encode(_trained())]


def _fetch(svc: Service, agent_id: str, md: Metadata, after: int = -1) -> pb.RoundHeader:
    msgs = list(svc.stub.GetRound(pb.RoundRequest(agent_id=agent_id, after_round=after), metadata=md, timeout=10))
    return msgs[0].header


def _counted(svc: Service, reason: str, node: str, n: float, within: float = 10.0) -> bool:
    """The refusal count reaches `n` (the handler counts once the client has already heard the status)."""
    end = time.monotonic() + within
    while svc.refused(reason, node) < n and time.monotonic() < end:
        time.sleep(0.01)
    return svc.refused(reason, node) == n


def _real_round(svc: Service, agent_id: str, md: Metadata) -> None:
    """The legitimate agent's whole round: fetch, send, and the round closes with its update."""
    header = _fetch(svc, agent_id, md, svc.engine.completed_rounds - 1)
    assert header.status == pb.WORK
    ack = svc.stub.SubmitUpdate(iter(_update(agent_id, header.round)), metadata=md, timeout=10)
    assert ack.detail == f"round {header.round}"
    outcome = svc.engine.close_round()
    assert outcome.applied and agent_id in outcome.contributions


class Held:
    """Client streams that send what they are given and then nothing, until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[grpc.Future] = []

    def messages(self, first: list[pb.UpdateMessage]) -> Iterator[pb.UpdateMessage]:
        yield from first
        self.release.wait(60)

    def open(self, svc: Service, md: Metadata, first: list[pb.UpdateMessage] | None = None) -> grpc.Future:
        call = svc.stub.SubmitUpdate.future(self.messages(first or []), metadata=md, timeout=60)
        self.calls.append(call)
        return call

    def codes(self) -> list[grpc.StatusCode]:
        return [c.exception().code() for c in self.calls]  # type: ignore[union-attr]

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


@pytest.fixture
def held() -> Iterator[Held]:
    h = Held()
    yield h
    h.close()


def _svc(**limits: object) -> Iterator[Service]:
    return make_service(small_state(), limits=Limits(**limits))  # type: ignore[arg-type]


@pytest.mark.parametrize("session", ["none", "joined-not-in-round"])
def test_streams_that_never_send_hold_no_thread(held: Held, session: str) -> None:
    """Finding 1: 70 streams that open and send nothing (more than the server's 64 threads) stop nothing."""
    for svc in _svc(first_message_seconds=30.0):
        real, real_md = svc.join("real")
        real_id = real.agent_id
        md: Metadata = [] if session == "none" else svc.join("intruder")[1]
        for _ in range(70):
            held.open(svc, md)
        svc.engine.open_round([(real_id, 0.0, 1)])
        _real_round(svc, real_id, real_md)
        expected = grpc.StatusCode.UNAUTHENTICATED if session == "none" else grpc.StatusCode.FAILED_PRECONDITION
        assert set(held.codes()) == {expected}  # each refused before it could block
        if session == "none":
            assert svc.refused("unauthenticated", "unknown") == 70
        else:  # before the round opened no round is open; after, the intruder is no participant of it
            assert svc.refused("stale_round", "intruder") + svc.refused("not_participant", "intruder") == 70


def test_a_participant_stream_without_a_header_ends_at_its_first_message_deadline(held: Held) -> None:
    for svc in _svc(first_message_seconds=0.5):
        reply, md = svc.join("a")
        svc.engine.open_round([(reply.agent_id, 0.0, 1)])
        call = held.open(svc, md)
        err = call.exception(timeout=10)
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no update header" in (err.details() or "")
        assert _counted(svc, "stream_timeout", "a", 1)
        _real_round(svc, reply.agent_id, md)  # its thread and call count are free again


def test_a_slow_uploader_cannot_keep_the_upload_slot(held: Held) -> None:
    """Finding 2: a joined participant that takes the only upload slot and then sends nothing more."""
    for svc in make_service(small_state(), limits=Limits(part_gap_seconds=0.5), upload_slots=1):
        slow, slow_md = svc.join("slow")
        real, real_md = svc.join("real")
        svc.engine.open_round([(slow.agent_id, 0.0, 1), (real.agent_id, 0.0, 1)])
        assert _fetch(svc, slow.agent_id, slow_md).status == pb.WORK
        first = held.open(svc, slow_md, _update(slow.agent_id, 0)[:2])  # its header and one part, then nothing
        second = held.open(svc, slow_md, _update(slow.agent_id, 0)[:1])  # a second upload of its own
        assert second.exception(timeout=10).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
        assert svc.refused("too_many_calls", "slow") == 1
        _real_round(svc, real.agent_id, real_md)  # the slot came free when the slow part was overdue
        err = first.exception(timeout=10)
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _counted(svc, "stream_timeout", "slow", 1)


def test_a_closing_round_ends_the_uploads_still_arriving_for_it(held: Held) -> None:
    for svc in make_service(small_state(), limits=Limits(part_gap_seconds=60.0), upload_slots=2):
        slow, slow_md = svc.join("slow")
        real, real_md = svc.join("real")
        svc.engine.open_round([(slow.agent_id, 0.0, 1), (real.agent_id, 0.0, 1)])
        _fetch(svc, slow.agent_id, slow_md)
        trickle = held.open(svc, slow_md, _update(slow.agent_id, 0)[:2])
        _real_round(svc, real.agent_id, real_md)  # the round closes without the slow update...
        err = trickle.exception(timeout=10)  # ...and ends it, long before its 60 s gap
        assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "round 0 closed" in (err.details() or "")
        assert _counted(svc, "stale_round", "slow", 1)


def test_agents_are_capped_and_joins_rate_limited_per_peer() -> None:
    """Finding 3, the flood: distinct names from one host are cut to the join rate and the cap, each counted."""
    for svc in _svc(joins_per_second=0.001, join_burst=30, max_agents=20):
        codes = []
        for i in range(40):
            try:
                svc.stub.Join(pb.JoinRequest(agent_name=f"flood-{i}"), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        assert codes.count(grpc.StatusCode.OK) == 20 and len(svc.membership) == 20
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 20
        assert svc.refused("too_many_agents", "unknown") == 10
        assert svc.refused("rate_limited", "unknown") == 10


def _node_series(svc: Service, node: str) -> int:
    return sum(1 for family in svc.registry.collect() for s in family.samples if s.labels.get("node") == node)


def test_agents_that_never_poll_are_evicted_with_their_series() -> None:
    """Finding 3: agents that Join and never poll were kept forever, with ~26 series each. A Join alone now adds
    no series (a node's counters start at its first taken update); what such an agent was refused is removed with
    it."""
    for svc in _svc(first_poll_seconds=0.2):
        for i in range(5):
            svc.join(f"idle-{i}")
        assert sum(_node_series(svc, f"idle-{i}") for i in range(5)) == 0
        svc.state.metrics.refused_update("idle-0", "late")  # as the servicer counts a refusal under its name
        assert _node_series(svc, "idle-0") > 0
        poller, md = svc.join("poller")
        _fetch(svc, poller.agent_id, md)  # polls: stays
        threading.Event().wait(0.3)
        svc.state.sweep(every=0.0)
        assert [a.name for a in svc.membership.live()] == ["poller"]
        assert sum(_node_series(svc, f"idle-{i}") for i in range(5)) == 0


def test_join_and_leave_cycles_leave_no_series() -> None:
    for svc in _svc():
        for i in range(30):
            reply, md = svc.join(f"cycle-{i}")
            _fetch(svc, reply.agent_id, md)
            svc.state.metrics.refused_update(f"cycle-{i}", "late")  # as the servicer counts a refusal under its name
            assert _node_series(svc, f"cycle-{i}") > 0
            svc.stub.Leave(pb.LeaveRequest(agent_id=reply.agent_id), metadata=md, timeout=5)
        assert len(svc.membership) == 0
        assert sum(_node_series(svc, f"cycle-{i}") for i in range(30)) == 0


@pytest.mark.parametrize(("field", "value"), [
    ("cores", list(range(5_000))),
    ("cores", list(range(1_000_000))),
    ("device", "x" * 10_000),
    ("device", "x" * 3_000_000),
    ("device", "cpu\n2026-12-07 edgetrain.coordinator INFO forged"),
    ("metrics_address", "169.254.169.254:80"),
    ("metrics_address", "y" * 10_000),
    ("metrics_address", "y" * 1_000_000),
])
def test_join_fields_are_validated_and_nothing_is_stored(field: str, value: object) -> None:
    """Finding 4: huge or forged Join fields were stored as they came (42 MB a Join, a forged log line, any /sd
    target). Past CONTROL_MESSAGE_BYTES a Join is refused before it is parsed; below, field by field."""
    for svc in _svc():
        request = pb.JoinRequest(agent_name="a")
        if isinstance(value, list):
            request.cores.extend(value)
        else:
            setattr(request, field, value)
        with pytest.raises(grpc.RpcError) as err:
            svc.stub.Join(request, timeout=10)
        if request.ByteSize() > CONTROL_MESSAGE_BYTES:
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert svc.refused("too_large", "unknown") == 1
        else:
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (err.value.details() or "")
            assert svc.refused("malformed", "unknown") == 1
        assert len(svc.membership) == 0


def test_a_round_does_not_wait_for_agents_that_polled_once_and_vanished() -> None:
    """Finding 5: 100 agents that polled once made the next round wait for its whole deadline."""
    # A fetch grace near the 30 s deadline: a round that returns well before it let the ghosts go as newcomers.
    for svc in _svc(fetch_grace_seconds=25.0):
        real, real_md = svc.join("real")
        svc.engine.open_round([(real.agent_id, 0.0, 1)])
        _real_round(svc, real.agent_id, real_md)  # training runs (before it, every agent that asked counts)
        ghosts = [svc.join(f"ghost-{i}") for i in range(100)]
        polls = [svc.stub.GetRound(pb.RoundRequest(agent_id=reply.agent_id), metadata=md, timeout=10)
                 for reply, md in ghosts[:50]]  # these poll and hang up mid-poll (the server holds a poll 1 s)
        time.sleep(0.2)
        for poll in polls:
            poll.cancel()
        deadline = time.monotonic() + 10
        while any(a.ready for a in svc.membership.live() if a.name in {f"ghost-{i}" for i in range(50)}) and (
                time.monotonic() < deadline):
            time.sleep(0.01)
        for reply, md in ghosts[50:]:  # these poll to the end (WAIT) and never again
            assert _fetch(svc, reply.agent_id, md).status == pb.WAIT
        _fetch(svc, real.agent_id, real_md)
        # the hung-up ones are not in the next round at all; the others are, as newcomers
        ready = [a for a in svc.membership.live(ready_only=True)]
        assert {a.name for a in ready} == {"real"} | {f"ghost-{i}" for i in range(50, 100)}
        svc.engine.open_round([(a.agent_id, 0.0, 1) for a in ready])
        for reply, md in ghosts[50:60]:  # ten fetch the round's weights and are never heard of again
            assert _fetch(svc, reply.agent_id, md, after=0).status == pb.WORK
        header = _fetch(svc, real.agent_id, real_md)
        svc.stub.SubmitUpdate(iter(_update(real.agent_id, header.round)), metadata=real_md, timeout=10)
        svc.engine.wait_for_updates()
        # once the measured agent is in, no newcomer holds the round: not the fetch grace, not the deadline
        assert svc.engine.seconds_left() > 20
        outcome = svc.engine.close_round()
        assert outcome.applied and list(outcome.contributions) == [real.agent_id] and len(outcome.missing) == 50


def test_an_agent_back_under_a_name_whose_updates_were_taken_is_no_newcomer() -> None:
    """Ghosts are newcomers, each first round a trial; a real agent restarted (after a clean Leave) is not."""
    for svc in _svc():
        real, real_md = svc.join("real")
        never, never_md = svc.join("never-sent")
        svc.engine.open_round([(real.agent_id, 0.0, 1)])
        _real_round(svc, real.agent_id, real_md)
        for reply, md in ((real, real_md), (never, never_md)):
            svc.stub.Leave(pb.LeaveRequest(agent_id=reply.agent_id), metadata=md, timeout=5)
        again, _ = svc.join("real")
        never_again, _ = svc.join("never-sent")
        svc.engine.open_round([(again.agent_id, 0.0, 1), (never_again.agent_id, 0.0, 1)])
        assert svc.engine._contributed == {again.agent_id}  # noqa: SLF001


def _deferred(svc: Service) -> float:
    return svc.registry.get_sample_value("edgetrain_polls_deferred_total") or 0.0


def test_agents_that_only_poll_cannot_take_the_threads_that_serve_training() -> None:
    """Finding 5, held: 200 joined ghosts each holding a 20 s long-poll took every handler thread (0 rounds/s)."""
    n = HANDLER_THREADS + 16
    for svc in make_service(small_state(), long_poll=30.0):
        real, real_md = svc.join("real")
        svc.engine.open_round([(real.agent_id, 0.0, 1)])
        _real_round(svc, real.agent_id, real_md)  # its update measured it
        ghosts = {f"ghost-{i}": svc.join(f"ghost-{i}") for i in range(n)}
        calls = {name: svc.stub.GetRound(pb.RoundRequest(agent_id=reply.agent_id, after_round=0), metadata=md,
                                         timeout=60) for name, (reply, md) in ghosts.items()}
        pool = ThreadPoolExecutor(n)  # gRPC reads a stream's status only once its messages are read
        try:
            quick = n - svc.state.limits.newcomer_polls
            deadline = time.monotonic() + 20
            while _deferred(svc) < quick and time.monotonic() < deadline:
                time.sleep(0.02)
            assert svc.state.polls.held() == (0, svc.state.limits.newcomer_polls)
            first = {name: pool.submit(next, call) for name, call in calls.items()}
            done, _ = wait(first.values(), timeout=5)
            answered = {name for name, f in first.items() if f in done}
            assert len(answered) == quick
            for name in answered:
                header = first[name].result().header
                assert header.status == pb.WAIT and header.poll_again_ms == 1000
            # answered at once, they sit out the next rounds; those still holding a poll are in them
            ready = {a.name for a in svc.membership.live(ready_only=True)}
            assert ready == {"real"} | (set(ghosts) - answered)
            svc.engine.open_round([(real.agent_id, 0.0, 1)])
            _real_round(svc, real.agent_id, real_md)  # a thread served it
        finally:
            for call in calls.values():
                call.cancel()
            pool.shutdown()


def test_before_anyone_is_measured_agents_past_the_poll_cap_still_count_towards_the_start() -> None:
    """A fleet larger than newcomer_polls that starts together (--min-agents 16) must be able to start."""
    for svc in make_service(small_state(), long_poll=30.0):
        extra = 4
        agents = {f"a{i}": svc.join(f"a{i}") for i in range(svc.state.limits.newcomer_polls + extra)}
        calls = [svc.stub.GetRound(pb.RoundRequest(agent_id=reply.agent_id), metadata=md, timeout=60)
                 for reply, md in agents.values()]
        try:
            deadline = time.monotonic() + 20
            while _deferred(svc) < extra and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _deferred(svc) == extra
            assert {a.name for a in svc.membership.live(ready_only=True)} == set(agents)
        finally:
            for call in calls:
                call.cancel()


def test_messages_over_the_limit_are_refused_and_counted() -> None:
    """Finding 6: gRPC refused them itself (RESOURCE_EXHAUSTED) and nothing counted them as too_large."""
    big = "z" * (grpc_options.MAX_MESSAGE_BYTES + 1024)
    for svc in _svc():
        channel = grpc.insecure_channel(f"127.0.0.1:{svc.port}",
                                        options=[("grpc.max_send_message_length", 4 * grpc_options.MAX_MESSAGE_BYTES)])
        stub = type(svc.stub)(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(agent_name="a", device=big), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert svc.refused("too_large", "unknown") == 1
        fat = pb.JoinRequest(agent_name="fat")  # a control message past its own, smaller cap: refused unparsed
        fat.cores.extend(range(30_000))
        assert CONTROL_MESSAGE_BYTES < fat.ByteSize() < grpc_options.MAX_MESSAGE_BYTES
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(fat, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert svc.refused("too_large", "unknown") == 2
        reply, md = svc.join("a")
        svc.engine.open_round([(reply.agent_id, 0.0, 1)])
        msgs = _update(reply.agent_id, 0)
        msgs[1].part.data = big.encode()
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitUpdate(iter(msgs), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert svc.refused("too_large", "a") == 1
        channel.close()
