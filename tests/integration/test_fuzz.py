"""Fuzzing the real servicer over real gRPC on loopback: random and mutated update streams, round and join requests.

Properties, for every stream: the server answers (no crash, no hang); a refusal carries a proper status code
(never UNKNOWN or INTERNAL) and is counted; an update is taken exactly when it is fully valid (an oracle
written from the protocol's rules decides); and after the round closes the global model is byte-identical
unless a valid update was taken, in which case it is exactly the weighted mean of those taken. Hypothesis
runs derandomized, so CI sees the same ~1,500 streams every time.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch
from edgetrain.coordinator.membership import Membership
from edgetrain.coordinator.metrics import CoordinatorMetrics
from edgetrain.coordinator.rounds import RoundEngine
from edgetrain.coordinator.server import start_server
from edgetrain.coordinator.service import MAX_THROUGHPUT, ServiceState
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from edgetrain import aggregation, grpc_options, serde
from edgetrain.compression import apply_delta
from edgetrain.errors import WireError
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.spec import RunSpec
from tests.integration.conftest import small_state

EXAMPLES = 700  # each sends 1-3 update streams and up to 2 other requests: > 1,000 streams in all
REFUSAL_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
AGENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
INT64 = st.integers(-(2**63), 2**63 - 1)
F32 = st.floats(width=32)  # any float32: NaN, +-Inf, subnormals, the largest finite
F32_MAX = float(torch.finfo(torch.float32).max)
EDGE_VALUES = [math.nan, math.inf, -math.inf, F32_MAX, -F32_MAX, 1e30, 1e-45]  # 1e30 * 8 samples still fits


@dataclass
class Fuzz:
    stub: pb_grpc.CoordinatorStub
    channel: grpc.Channel
    engine: RoundEngine
    registry: CollectorRegistry
    agents: dict[str, tuple[str, str]]  # name -> (agent_id, session token)
    counts: dict[str, int] = field(default_factory=lambda: {"streams": 0, "accepted": 0, "refused": 0,
                                                            "rounds": 0, "joins": 0, "polls": 0})

    def refused_total(self) -> float:
        return sum(s.value for m in self.registry.collect() if m.name == "edgetrain_updates_refused"
                   for s in m.samples if s.name.endswith("_total"))


@pytest.fixture
def fuzz() -> Iterator[Fuzz]:
    registry = CollectorRegistry()
    engine = RoundEngine(small_state(), batch_size=4, local_steps=2, round_timeout=300.0)
    svc = ServiceState(engine, Membership(), RunSpec(dataset="tweets"), CoordinatorMetrics(registry), long_poll=0.01)
    server, port, _ = start_server(svc, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options.CLIENT)
    stub = pb_grpc.CoordinatorStub(channel)
    agents = {}
    for name in ("a", "b"):
        reply = stub.Join(pb.JoinRequest(agent_name=name), timeout=5)
        agents[name] = (reply.agent_id, reply.session_token)
    try:
        yield Fuzz(stub, channel, engine, registry, agents)
    finally:
        channel.close()
        engine.finish()
        server.stop(grace=None).wait()


# ---------------------------------------------------------------------------------------------- strategies


@st.composite
def update_stream(draw: Any, fz: Fuzz) -> tuple[list[pb.UpdateMessage], str]:
    """A valid update from a or b, then 0-4 mutations; or, sometimes, messages from scratch. Returns (messages,
    whose session goes in the metadata)."""
    sender = draw(st.sampled_from(["a", "b"]))
    session = draw(st.sampled_from([sender] * 5 + ["a" if sender == "b" else "b", "none", "garbage"]))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.lists(random_message(fz), max_size=5)), session
    g = fz.engine.global_state
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    trained = {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
               for k, v in g.items()}
    if draw(st.booleans()):  # poke one value: NaN, Inf, huge, tiny
        t = trained[draw(st.sampled_from(["fc.weight", "fc.bias"]))].view(-1)
        t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(EDGE_VALUES) | F32)
    delta = draw(st.integers(0, 4)) == 0
    if delta:
        trained = {k: (v - g[k] if v.is_floating_point() else v) for k, v in trained.items()}
    wire = draw(st.sampled_from(["float32", "float32", "float16", "bfloat16", "int8"]))
    part_bytes = draw(st.sampled_from([4, 8, 16, 64, serde.PART_BYTES]))
    agent_id = fz.agents[sender][0]
    header = pb.UpdateHeader(agent_id=agent_id, round=fz.engine.current_round, num_samples=draw(st.integers(1, 8)),
                             stats=pb.NodeStats(compute_seconds=draw(st.floats()), loss=draw(st.floats()),
                                                samples_per_second=draw(st.floats())),
                             delta=delta)
    msgs = [pb.UpdateMessage(header=header)]
    msgs += [pb.UpdateMessage(part=p) for p in serde.encode(trained, wire_dtype=wire, part_bytes=part_bytes)]
    for _ in range(draw(st.integers(0, 4))):
        msgs = draw(mutation(msgs, fz))
    return msgs, session


@st.composite
def random_message(draw: Any, fz: Fuzz) -> pb.UpdateMessage:
    kind = draw(st.sampled_from(["header", "part", "empty"]))
    if kind == "empty":
        return pb.UpdateMessage()
    if kind == "header":
        return pb.UpdateMessage(header=pb.UpdateHeader(
            agent_id=draw(st.sampled_from([fz.agents["a"][0], fz.agents["b"][0], "", "x" * 40])),
            round=draw(st.sampled_from([fz.engine.current_round, -1, 2**63 - 1])), num_samples=draw(INT64),
            delta=draw(st.booleans())))
    return pb.UpdateMessage(part=draw(random_part()))


@st.composite
def random_part(draw: Any) -> pb.TensorPart:
    return pb.TensorPart(
        name=draw(st.sampled_from(["fc.weight", "fc.bias", "bn.num_batches_tracked", "", "evil"])
                  | st.text(max_size=8)),
        dtype=draw(st.integers(-1, 9)),
        shape=draw(st.sampled_from([[4, 3], [4], [], [3, 4], [12], [0], [-1], [2**40, 2**40]])
                   | st.lists(INT64, max_size=3)),
        offset=draw(st.sampled_from([0, 4, 8, 16]) | st.integers(0, 2**64 - 1)),
        data=draw(st.binary(max_size=64)),
        scale=draw(F32),
    )


@st.composite
def mutation(draw: Any, msgs: list[pb.UpdateMessage], fz: Fuzz) -> list[pb.UpdateMessage]:
    msgs = [_copy(m) for m in msgs]
    op = draw(st.sampled_from(["drop", "dup", "swap", "insert", "header", "header"] + ["part"] * 5))
    if not msgs:
        return [draw(random_message(fz))]
    # mostly among the parts, sometimes the header itself
    i = draw(st.integers(0, len(msgs) - 1) if len(msgs) < 2 or draw(st.integers(0, 4)) == 0
             else st.integers(1, len(msgs) - 1))
    if op == "drop":
        del msgs[i]
    elif op == "dup":
        msgs.insert(i, _copy(msgs[i]))
    elif op == "swap":
        j = draw(st.integers(0, len(msgs) - 1))
        msgs[i], msgs[j] = msgs[j], msgs[i]
    elif op == "insert":
        msgs.insert(i, draw(random_message(fz)))
    elif op == "header":
        h = msgs[0].header if msgs[0].HasField("header") else pb.UpdateHeader()
        what = draw(st.sampled_from(["agent_id", "round", "num_samples", "delta"]))
        if what == "agent_id":
            h.agent_id = draw(st.sampled_from([fz.agents["a"][0], fz.agents["b"][0], "", "nobody"]) | st.text())
        elif what == "round":
            h.round = draw(st.sampled_from([fz.engine.current_round + d for d in (-1, 1, 2)]) | INT64)
        elif what == "num_samples":
            h.num_samples = draw(st.sampled_from([0, 1, 8, 9, -1, 2**31, 2**63 - 1, -(2**63)]) | INT64)
        else:
            h.delta = not h.delta
        msgs[0] = pb.UpdateMessage(header=h)
    else:
        parts = [k for k, m in enumerate(msgs) if m.HasField("part")]
        if not parts:
            return msgs
        p = msgs[draw(st.sampled_from(parts))].part
        what = draw(st.sampled_from(["name", "dtype", "shape", "offset", "data", "data", "scale"]))
        if what == "name":
            p.name = draw(st.sampled_from(["fc.weight", "fc.bias", "bn.num_batches_tracked", "evil"]) | st.text())
        elif what == "dtype":
            p.dtype = draw(st.integers(-1, 9))
        elif what == "shape":
            del p.shape[:]
            p.shape.extend(draw(st.sampled_from([[4, 3], [3, 4], [12], [4], [], [2**62, 2**62]])
                                | st.lists(INT64, max_size=3)))
        elif what == "offset":
            p.offset = draw(st.sampled_from([0, 1, 4, p.offset + 4, max(0, p.offset - 4)]) | st.integers(0, 2**64 - 1))
        elif what == "data":
            how = draw(st.sampled_from(["truncate", "extend", "flip", "random", "float"]))
            if how == "truncate":
                p.data = p.data[: draw(st.integers(0, max(0, len(p.data) - 1)))]
            elif how == "extend":
                p.data = p.data + draw(st.binary(min_size=1, max_size=16))
            elif how == "flip" and p.data:
                k = draw(st.integers(0, len(p.data) - 1))
                p.data = p.data[:k] + bytes([p.data[k] ^ draw(st.integers(1, 255))]) + p.data[k + 1:]
            elif how == "float" and len(p.data) >= 4:
                p.data = struct.pack("<f", draw(F32)) + p.data[4:]
            else:
                p.data = draw(st.binary(max_size=64))
        else:
            p.scale = draw(F32)
    return msgs


def _copy(m: pb.UpdateMessage) -> pb.UpdateMessage:
    c = pb.UpdateMessage()
    c.CopyFrom(m)
    return c


# ---------------------------------------------------------------------------------------------- the oracle


def oracle(fz: Fuzz, msgs: list[pb.UpdateMessage], session: str, taken: set[str]) -> tuple[str, Any] | None:
    """(agent name, decoded weights) if the protocol's rules say this stream is a valid update, else None."""
    if not msgs or not msgs[0].HasField("header"):
        return None
    h = msgs[0].header
    name = next((n for n, (aid, _) in fz.agents.items() if aid == h.agent_id), None)
    if name is None or session != name:  # unknown agent, or not its session token
        return None
    if h.round != fz.engine.current_round or name in taken or not 0 < h.num_samples <= 8:
        return None
    rest = msgs[1:]
    if any(not m.HasField("part") or len(m.part.data) > serde.MAX_PART_BYTES for m in rest):
        return None
    try:
        tensors = serde.decode([m.part for m in rest], serde.spec_of(fz.engine.global_state))
    except WireError:
        return None
    if h.delta:
        tensors = apply_delta(fz.engine.global_state, tensors)
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
        return None
    return name, tensors


def metadata(fz: Fuzz, session: str) -> list[tuple[str, str]]:
    if session in fz.agents:
        return [(grpc_options.SESSION_METADATA, fz.agents[session][1])]
    if session == "garbage":
        return [(grpc_options.SESSION_METADATA, "forged-token")]
    return []


def snapshot(engine: RoundEngine) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in engine.global_state.items()}


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------- the test


def test_random_and_mutated_requests_never_crash_always_get_a_status_and_only_valid_updates_move_the_model(
        fuzz: Fuzz) -> None:
    fz = fuzz

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def one_round(data: st.DataObject) -> None:
        engine = fz.engine
        engine.open_round([(fz.agents["a"][0], 0.0, 1), (fz.agents["b"][0], 0.0, 1)])
        before, refused_before = snapshot(engine), fz.refused_total()
        g = dict(engine.global_state)
        taken: set[str] = set()
        accepted: list[tuple[dict[str, torch.Tensor], int]] = []
        refusals = 0
        for _ in range(data.draw(st.integers(1, 3), label="streams")):
            msgs, session = data.draw(update_stream(fz), label="stream")
            expect = oracle(fz, msgs, session, taken)
            fz.counts["streams"] += 1
            try:
                ack = fz.stub.SubmitUpdate(iter(msgs), metadata=metadata(fz, session), timeout=10)
            except grpc.RpcError as err:
                assert err.code() in REFUSAL_CODES, (err.code(), err.details())
                assert expect is None, f"a valid update was refused: {err.code()} {err.details()}"
                refusals += 1
                continue
            assert expect is not None, "an invalid update was taken"
            assert ack.detail == f"round {engine.current_round}"
            taken.add(expect[0])
            accepted.append((expect[1], msgs[0].header.num_samples))
        for _ in range(data.draw(st.integers(0, 2), label="requests")):
            refusals += other_request(fz, data)
        fz.counts["accepted"] += len(accepted)
        fz.counts["refused"] += refusals
        assert fz.refused_total() - refused_before == refusals  # every refusal counted, once
        out = engine.close_round(min_updates=1)
        fz.counts["rounds"] += out.applied
        assert _finite(engine.global_state)
        if not accepted:
            assert not out.applied and snapshot(engine) == before
            return
        want = aggregation.RunningWeightedMean()
        for tensors, samples in accepted:
            want.add(tensors, samples)
        expected = want.result(g)
        if not _finite(expected):  # finite updates whose weighted sum overflows: the round is not applied
            assert out.overflow and not out.applied and snapshot(engine) == before
            return
        assert out.applied
        assert {k: torch.equal(v, expected[k]) for k, v in engine.global_state.items()} == dict.fromkeys(g, True)

    one_round()
    assert fz.counts["streams"] >= 1000, fz.counts
    assert fz.counts["accepted"] >= 50 and fz.counts["refused"] >= 500, fz.counts  # both sides were exercised
    # the server still serves: health, and a whole good round
    health = health_pb2_grpc.HealthStub(fz.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    reply = fz.stub.Join(pb.JoinRequest(agent_name="good"), timeout=5)
    md = [(grpc_options.SESSION_METADATA, reply.session_token)]
    fz.engine.open_round([(reply.agent_id, 0.0, 1)])
    msgs = list(fz.stub.GetRound(pb.RoundRequest(agent_id=reply.agent_id, after_round=-1), metadata=md, timeout=5))
    assert msgs[0].header.status == pb.WORK
    weights = serde.decode([m.part for m in msgs[1:]], serde.spec_of(fz.engine.global_state))
    ones = {k: (torch.ones_like(v) if v.is_floating_point() else v) for k, v in weights.items()}
    update = [pb.UpdateMessage(header=pb.UpdateHeader(agent_id=reply.agent_id, round=msgs[0].header.round,
                                                      num_samples=8))]
    update += [pb.UpdateMessage(part=p) for p in serde.encode(ones)]
    assert fz.stub.SubmitUpdate(iter(update), metadata=md, timeout=5).detail == f"round {msgs[0].header.round}"
    fz.engine.close_round()
    assert torch.equal(fz.engine.global_state["fc.weight"], torch.ones(4, 3))


def other_request(fz: Fuzz, data: st.DataObject) -> int:
    """A random JoinRequest or RoundRequest; returns 1 if it was refused (and checks it should have been)."""
    if data.draw(st.booleans(), label="join?"):
        name = data.draw(st.sampled_from(["ok-1", "x" * 128, "x" * 129, "", "a b", "é", "n\n", "j:1.2_3-4"])
                         | st.text(max_size=20), label="name")
        if name in fz.agents:
            name = f"z{name}"
        throughput = data.draw(st.floats(), label="throughput")
        workers = data.draw(st.integers(-(2**31), 2**31 - 1), label="workers")
        cores = data.draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4), label="cores")
        valid = (bool(AGENT_NAME.fullmatch(name)) and name != "unknown" and math.isfinite(throughput)
                 and 0 <= throughput <= MAX_THROUGHPUT and 0 <= workers <= max(1, len(cores)))
        fz.counts["joins"] += 1
        try:
            fz.stub.Join(pb.JoinRequest(agent_name=name, throughput=throughput, workers=workers, cores=cores,
                                        metrics_address=data.draw(st.text(max_size=30), label="addr")), timeout=5)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and not valid, (name, err.code(), err.details())
            return 1
        assert valid, f"an invalid join was admitted: {name!r} {throughput} {workers}"
        return 0
    who = data.draw(st.sampled_from(["a", "b", "none", "garbage"]), label="poller")
    agent_id = data.draw(st.sampled_from([fz.agents["a"][0], fz.agents["b"][0], "", "nobody"]) | st.text(max_size=20),
                         label="agent_id")
    after = data.draw(st.sampled_from([-1, fz.engine.current_round, fz.engine.current_round + 1]) | INT64,
                      label="after_round")
    fz.counts["polls"] += 1
    try:
        msgs = list(fz.stub.GetRound(pb.RoundRequest(agent_id=agent_id, after_round=after),
                                     metadata=metadata(fz, who), timeout=10))
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED), (err.code(), err.details())
        valid = who in fz.agents and fz.agents[who][0] == agent_id
        assert not valid
        return 1
    assert who in fz.agents and fz.agents[who][0] == agent_id
    assert msgs and msgs[0].header.status in (pb.WORK, pb.WAIT)
    return 0
