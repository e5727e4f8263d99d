"""Paced uploads over real gRPC on loopback: an agent sends an update's parts only once the coordinator takes them.

With every upload slot held, a second upload gets no go-ahead (initial metadata) and so sends nothing that
the coordinator would have to hold; it gets it as soon as the slot frees, and both updates count.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from edgetrain.agent.client import CoordinatorClient
from edgetrain.agent.route import Route
from edgetrain.coordinator.membership import Membership
from edgetrain.coordinator.metrics import CoordinatorMetrics
from edgetrain.coordinator.rounds import RoundEngine
from edgetrain.coordinator.server import start_server
from edgetrain.coordinator.service import ServiceState
from prometheus_client import CollectorRegistry

from edgetrain import grpc_options, serde
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.records import NodeStats
from edgetrain.spec import RunSpec
from tests.integration.conftest import small_state

REGISTRIES: dict[int, CollectorRegistry] = {}


def refused(engine: RoundEngine, port: int, reason: str = "late") -> float:
    value = REGISTRIES[port].get_sample_value("edgetrain_updates_refused_total", {"node": "quitter", "reason": reason})
    return value or 0.0


@pytest.fixture
def one_slot() -> Iterator[tuple[RoundEngine, int]]:
    engine = RoundEngine(small_state(), batch_size=4, local_steps=2, round_timeout=30.0)
    registry = CollectorRegistry()
    svc = ServiceState(engine, Membership(), RunSpec(dataset="tweets"), CoordinatorMetrics(registry),
                       long_poll=1.0, upload_slots=1, shm_root=None)
    server, port, _ = start_server(svc, "127.0.0.1", 0)
    REGISTRIES[port] = registry
    try:
        yield engine, port
    finally:
        engine.finish()
        server.stop(grace=None).wait()
        del REGISTRIES[port]


def test_an_upload_waits_for_the_go_ahead_while_the_slot_is_held_and_sends_when_it_frees(
        one_slot: tuple[RoundEngine, int]) -> None:
    engine, port = one_slot
    holder, waiter = CoordinatorClient(f"127.0.0.1:{port}"), CoordinatorClient(f"127.0.0.1:{port}")
    try:
        for c, name in ((holder, "holder"), (waiter, "waiter")):
            c.join(pb.JoinRequest(agent_name=name))
            assert c.paced_uploads
        engine.open_round([(holder.agent_id, 0.0, 1), (waiter.agent_id, 0.0, 1)])
        state = {k: v * 2 if v.is_floating_point() else v for k, v in small_state().items()}
        # the holder's stream: its header takes the only slot, its parts wait for a signal
        release = threading.Event()
        parts = [pb.UpdateMessage(part=p) for p in serde.encode(state)]

        def holding() -> Iterator[pb.UpdateMessage]:
            yield pb.UpdateMessage(header=pb.UpdateHeader(agent_id=holder.agent_id, round=0, num_samples=8))
            release.wait(10)
            yield from parts

        held = holder._stub.SubmitUpdate.future(
            holding(), metadata=[(grpc_options.SESSION_METADATA, holder.session)], timeout=20)
        held.initial_metadata()  # the holder has the slot
        sent_parts: list[int] = []
        done = threading.Event()
        result: list[object] = []

        def upload() -> None:
            try:
                result.append(Route(waiter).send(0, NodeStats(samples=8), state))
            except grpc.RpcError as err:  # pragma: no cover - reported by the assertion below
                result.append(err)
            done.set()

        original = serde.encode_sized

        def counting(*args: object, **kwargs: object) -> Iterator[tuple[pb.TensorPart, int]]:
            for part, size in original(*args, **kwargs):  # type: ignore[arg-type]
                sent_parts.append(size)
                yield part, size

        serde.encode_sized = counting
        try:
            threading.Thread(target=upload, daemon=True).start()
            assert not done.wait(1.0)  # no go-ahead while the slot is held ...
            assert sent_parts == []  # ... so not one part was made, let alone sent
            release.set()
            assert held.result(timeout=10).detail == "round 0"
            assert done.wait(10)
        finally:
            serde.encode_sized = original
        ack = result[0]
        assert isinstance(ack, tuple) and ack[0].detail == "round 0" and sum(sent_parts) == ack[2] > 0
        assert engine.close_round().applied
        assert all(torch.equal(engine.global_state[k], v) for k, v in state.items())
    finally:
        holder.close()
        waiter.close()


def _handler_waits_for_a_slot() -> bool:
    """Whether a servicer thread is blocked taking an upload slot (read from the live threads' stacks)."""
    for frame in sys._current_frames().values():
        names = set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back  # type: ignore[assignment]
        if "_take_update" in names and "acquire" in names:
            return True
    return False


def test_an_upload_whose_caller_gave_up_while_waiting_is_refused_and_read_nothing(
        one_slot: tuple[RoundEngine, int]) -> None:
    """An agent that cancelled (or timed out) asks for work again and may rewrite its update: the call it left
    behind must not be taken when a slot frees."""
    engine, port = one_slot
    holder, quitter = CoordinatorClient(f"127.0.0.1:{port}"), CoordinatorClient(f"127.0.0.1:{port}")
    try:
        for c, name in ((holder, "holder"), (quitter, "quitter")):
            c.join(pb.JoinRequest(agent_name=name))
        engine.open_round([(holder.agent_id, 0.0, 1), (quitter.agent_id, 0.0, 1)])
        state = {k: v * 2 if v.is_floating_point() else v for k, v in small_state().items()}
        parts = [pb.UpdateMessage(part=p) for p in serde.encode(state)]
        release = threading.Event()

        def stream(agent_id: str, wait: threading.Event | None) -> Iterator[pb.UpdateMessage]:
            yield pb.UpdateMessage(header=pb.UpdateHeader(agent_id=agent_id, round=0, num_samples=8))
            if wait is not None:
                wait.wait(10)
            yield from parts

        held = holder._stub.SubmitUpdate.future(
            stream(holder.agent_id, release), metadata=[(grpc_options.SESSION_METADATA, holder.session)], timeout=20)
        held.initial_metadata()
        left = quitter._stub.SubmitUpdate.future(
            stream(quitter.agent_id, None), metadata=[(grpc_options.SESSION_METADATA, quitter.session)], timeout=20)
        deadline = time.monotonic() + 10
        while not _handler_waits_for_a_slot() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _handler_waits_for_a_slot()  # only now does cancelling test what it should
        left.cancel()
        release.set()
        assert held.result(timeout=10).detail == "round 0"
        deadline = time.monotonic() + 10
        while refused(engine, port) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused(engine, port) == 1  # counted as late
        outcome = engine.close_round()
        assert set(outcome.contributions) == {holder.agent_id}
    finally:
        holder.close()
        quitter.close()
