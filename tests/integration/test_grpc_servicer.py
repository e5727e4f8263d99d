"""The servicer over real gRPC on loopback: the happy path, every refusal, big models, the operator token."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from edgetrain.agent import client as client_module
from edgetrain.agent.client import CoordinatorClient
from edgetrain.agent.route import Route
from edgetrain.coordinator.rounds import RoundEngine
from edgetrain.coordinator.service import ServiceState
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgetrain import grpc_options, serde
from edgetrain import metric_names as m
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.spec import RunSpec
from tests.integration.conftest import Service, make_service, small_state
from tests.integration.relay import Relay

Messages = list[pb.UpdateMessage]


def update(agent_id: str, round_: int, samples: int, state: dict[str, torch.Tensor], wire: str = "float32",
           part_bytes: int = serde.PART_BYTES) -> Messages:
    msgs = [pb.UpdateMessage(header=pb.UpdateHeader(agent_id=agent_id, round=round_, num_samples=samples,
                                                    stats=pb.NodeStats(compute_seconds=0.5, loss=1.0)))]
    msgs += [pb.UpdateMessage(part=p) for p in serde.encode(state, wire_dtype=wire, part_bytes=part_bytes)]
    return msgs


def open_round(svc: Service, *names: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    joined = {}
    for name in names:
        reply, md = svc.join(name)
        joined[name] = (reply.agent_id, md)
    svc.engine.open_round([(a.agent_id, 0.0, 1) for a in svc.membership.live()])
    return joined


def snapshot(svc: Service) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in svc.engine.global_state.items()}


def test_join_get_round_submit_and_close(service: Service) -> None:
    joined = open_round(service, "a")
    agent_id, md = joined["a"]
    msgs = list(service.stub.GetRound(pb.RoundRequest(agent_id=agent_id, after_round=-1), metadata=md, timeout=5))
    header = msgs[0].header
    assert header.status == pb.WORK and header.round == 0 and header.local_steps == 2 and header.world == 1
    got = serde.decode([m.part for m in msgs[1:]], serde.spec_of(small_state()))
    assert all(torch.equal(got[k], v) for k, v in small_state().items())
    trained = {k: (v + 1 if v.is_floating_point() else v) for k, v in got.items()}
    ack = service.stub.SubmitUpdate(iter(update(agent_id, 0, 8, trained)), metadata=md, timeout=5)
    assert ack.detail == "round 0"
    out = service.engine.close_round()
    assert out.applied
    assert torch.allclose(service.engine.global_state["fc.weight"], trained["fc.weight"])
    assert service.registry.get_sample_value("edgetrain_updates_accepted_total", {"node": "a"}) == 1.0
    assert service.registry.get_sample_value("edgetrain_node_compute_seconds", {"node": "a"}) == 0.5


def _rename(msgs: Messages) -> Messages:
    msgs[1].part.name = "evil"
    return msgs


def _reshape(msgs: Messages) -> Messages:
    del msgs[1].part.shape[:]
    msgs[1].part.shape.extend([3, 4])
    return msgs


def _retype(msgs: Messages) -> Messages:
    msgs[1].part.dtype = pb.INT64
    return msgs


def _short(msgs: Messages) -> Messages:
    msgs[1].part.data = msgs[1].part.data[:-4]
    return msgs


def _values(value: float) -> Callable[[Messages], Messages]:
    def mutate(msgs: Messages) -> Messages:
        n = len(msgs[1].part.data) // 4
        msgs[1].part.data = torch.full((n,), value).numpy().tobytes()
        return msgs

    return mutate


def _truncate(msgs: Messages) -> Messages:
    return msgs[:-1]


def _reorder(msgs: Messages) -> Messages:
    assert msgs[1].part.name == msgs[2].part.name  # two parts of one tensor, swapped
    return [msgs[0], msgs[2], msgs[1], *msgs[3:]]


def _headerless(msgs: Messages) -> Messages:
    return msgs[1:]


def _two_headers(msgs: Messages) -> Messages:
    return [msgs[0], msgs[1], msgs[0], *msgs[2:]]


def _oversized(msgs: Messages) -> Messages:
    msgs[1].part.data = b"\x00" * (serde.MAX_PART_BYTES + 4)
    return msgs


CASES = [
    ("rename", _rename, grpc.StatusCode.INVALID_ARGUMENT, "bad_tensor"),
    ("reshape", _reshape, grpc.StatusCode.INVALID_ARGUMENT, "bad_tensor"),
    ("retype", _retype, grpc.StatusCode.INVALID_ARGUMENT, "bad_tensor"),
    ("short-bytes", _short, grpc.StatusCode.INVALID_ARGUMENT, "bad_tensor"),
    ("nan", _values(float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
    ("inf", _values(float("-inf")), grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
    ("truncated-stream", _truncate, grpc.StatusCode.INVALID_ARGUMENT, "bad_tensor"),
    ("out-of-order", _reorder, grpc.StatusCode.INVALID_ARGUMENT, "bad_tensor"),
    ("no-header", _headerless, grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    ("two-headers", _two_headers, grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    ("oversized-part", _oversized, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
]


@pytest.mark.parametrize(("case", "mutate", "code", "reason"), CASES, ids=[c[0] for c in CASES])
def test_bad_updates_are_refused_counted_and_change_nothing(
    service: Service, case: str, mutate: Callable[[Messages], Messages], code: grpc.StatusCode, reason: str
) -> None:
    agent_id, md = open_round(service, "a")["a"]
    before = snapshot(service)
    trained = {k: (v * 2 if v.is_floating_point() else v) for k, v in small_state().items()}
    msgs = update(agent_id, 0, 8, trained, part_bytes=16)  # several parts per tensor
    with pytest.raises(grpc.RpcError) as err:
        service.stub.SubmitUpdate(iter(mutate(msgs)), metadata=md, timeout=5)
    assert err.value.code() == code, err.value.details()
    assert service.refused(reason, "a") == 1.0  # the session says who sent it, before its header
    assert snapshot(service) == before
    # the same agent can still send a good update for this round, and only that one counts
    service.stub.SubmitUpdate(iter(update(agent_id, 0, 8, trained)), metadata=md, timeout=5)
    service.engine.close_round()
    assert torch.allclose(service.engine.global_state["fc.weight"], trained["fc.weight"])



def _open_files() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return targets


def _staged_in(directory: Path) -> int:
    """Files this process holds open in `directory` (staging files have no name: "#inode (deleted)")."""
    return sum(os.path.dirname(target) == str(directory) for target in _open_files())


def test_an_update_refused_at_its_last_part_adds_nothing_to_the_round(tmp_path: Path) -> None:
    """A streamed update waits whole in a staging file: a NaN in its very last part leaves no trace in the sum."""
    for svc in make_service(small_state(), staging_dir=tmp_path):
        joined = open_round(svc, "a", "b")
        (a_id, a_md), (b_id, b_md) = joined["a"], joined["b"]
        trained = {k: (v * 2 if v.is_floating_point() else v) for k, v in small_state().items()}
        assert svc.stub.SubmitUpdate(iter(update(a_id, 0, 8, trained, part_bytes=16)), metadata=a_md,
                                     timeout=5).detail == "round 0"
        bad = update(b_id, 0, 8, {k: (v * 3 if v.is_floating_point() else v) for k, v in small_state().items()},
                     part_bytes=16)
        last = max(i for i, m in enumerate(bad) if m.HasField("part") and m.part.name == "fc.bias")
        assert last > 3  # parts of both float tensors went before it
        bad[last].part.data = b"\x00\x00\xc0\x7f" * (len(bad[last].part.data) // 4)  # float32 NaN
        with pytest.raises(grpc.RpcError) as err:
            svc.stub.SubmitUpdate(iter(bad), metadata=b_md, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert svc.refused("non_finite", "b") == 1.0
        assert any(target.startswith(str(tmp_path)) for target in _open_files()), "staged in the directory given"
        assert list(tmp_path.iterdir()) == []  # ...in files without a name
        svc.engine.close_round()
        assert snapshot(svc) == {k: v.numpy().tobytes() for k, v in trained.items()}  # a's update alone, exactly


def test_an_update_the_coordinator_cannot_stage_is_refused_unavailable_and_counted(tmp_path: Path) -> None:
    """The staging directory is gone: UNAVAILABLE (the agent retries), counted, the model untouched."""
    gone = tmp_path / "gone"
    for svc in make_service(small_state(), staging_dir=gone):
        agent_id, md = open_round(svc, "a")["a"]
        before = snapshot(svc)
        with pytest.raises(grpc.RpcError) as err:
            svc.stub.SubmitUpdate(iter(update(agent_id, 0, 8, small_state())), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "staging" in (err.value.details() or "")
        assert svc.refused("staging") == 1.0
        gone.mkdir()  # back: the same agent's update goes through
        ack = svc.stub.SubmitUpdate(iter(update(agent_id, 0, 8, small_state())), metadata=md, timeout=5)
        assert ack.detail == "round 0"
        svc.engine.close_round()
        assert snapshot(svc) == before  # the one update taken was the model itself


def test_a_staging_directory_that_cannot_take_files_stops_the_start(tmp_path: Path) -> None:
    from edgetrain.coordinator.membership import Membership
    from edgetrain.coordinator.metrics import CoordinatorMetrics
    from prometheus_client import CollectorRegistry

    from edgetrain.errors import ConfigError
    from edgetrain.spec import RunSpec

    engine = RoundEngine(small_state(), batch_size=4, local_steps=1, round_timeout=5)
    svc = ServiceState(engine, Membership(), RunSpec(dataset="tweets"), CoordinatorMetrics(CollectorRegistry()),
                       staging_dir=tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot make staging files in .*missing"):
        svc.transfer.prepare_staging()
    svc.close()
    svc = ServiceState(engine, Membership(), RunSpec(dataset="tweets"), CoordinatorMetrics(CollectorRegistry()),
                       staging_dir=tmp_path)
    svc.transfer.prepare_staging()
    # the start goes on with one staging file made in the directory given, without a name there...
    assert _staged_in(tmp_path) == 1 and list(tmp_path.iterdir()) == []
    with svc.transfer.stage():  # ...and kept: the first upload takes it instead of making another
        assert _staged_in(tmp_path) == 1
    svc.close()
    assert _staged_in(tmp_path) == 0  # closed with the service

@pytest.mark.parametrize(
    ("round_", "samples", "code", "reason"),
    [
        (1, 8, grpc.StatusCode.FAILED_PRECONDITION, "stale_round"),
        (-1, 8, grpc.StatusCode.FAILED_PRECONDITION, "stale_round"),
        (0, -5, grpc.StatusCode.INVALID_ARGUMENT, "bad_sample_count"),
        (0, 0, grpc.StatusCode.INVALID_ARGUMENT, "bad_sample_count"),
        (0, 9, grpc.StatusCode.INVALID_ARGUMENT, "bad_sample_count"),
        (0, 2**62, grpc.StatusCode.INVALID_ARGUMENT, "bad_sample_count"),
    ],
)
def test_wrong_round_and_sample_counts_are_refused(service: Service, round_: int, samples: int,
                                                   code: grpc.StatusCode, reason: str) -> None:
    agent_id, md = open_round(service, "a")["a"]
    before = snapshot(service)
    with pytest.raises(grpc.RpcError) as err:
        service.stub.SubmitUpdate(iter(update(agent_id, round_, samples, small_state())), metadata=md, timeout=5)
    assert err.value.code() == code
    assert service.refused(reason) == 1.0
    assert snapshot(service) == before


def test_duplicate_update_counts_once(service: Service) -> None:
    joined = open_round(service, "a", "b")
    (a_id, a_md), (b_id, b_md) = joined["a"], joined["b"]
    ones = {k: (torch.ones_like(v) if v.is_floating_point() else v) for k, v in small_state().items()}
    service.stub.SubmitUpdate(iter(update(a_id, 0, 8, ones)), metadata=a_md, timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        service.stub.SubmitUpdate(iter(update(a_id, 0, 8, ones)), metadata=a_md, timeout=5)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert service.refused("duplicate") == 1.0
    zeros = {k: (torch.zeros_like(v) if v.is_floating_point() else v) for k, v in small_state().items()}
    service.stub.SubmitUpdate(iter(update(b_id, 0, 8, zeros)), metadata=b_md, timeout=5)
    service.engine.close_round()
    assert torch.allclose(service.engine.global_state["fc.bias"], torch.full((4,), 0.5))


def test_unknown_agent_and_bad_session_are_refused(service: Service) -> None:
    agent_id, md = open_round(service, "a")["a"]
    with pytest.raises(grpc.RpcError) as err:
        list(service.stub.GetRound(pb.RoundRequest(agent_id="nobody"), metadata=md, timeout=5))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert service.refused("unknown_agent", "unknown") == 1.0  # the caller's claim is no label
    assert service.refused("unknown_agent", "nobody") == 0.0
    bad = [(grpc_options.SESSION_METADATA, "forged")]
    with pytest.raises(grpc.RpcError) as err:
        service.stub.SubmitUpdate(iter(update(agent_id, 0, 8, small_state())), metadata=bad, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert service.refused("unauthenticated", "unknown") == 1.0
    # a restart under the same name replaces the session: the old token stops working. An update stream is
    # checked by its session before its header is read (a stream that never sends must hold no thread), so it
    # is UNAUTHENTICATED (the agent joins again on it as on NOT_FOUND); a unary call names its id: NOT_FOUND
    service.join("a")
    with pytest.raises(grpc.RpcError) as err:
        service.stub.SubmitUpdate(iter(update(agent_id, 0, 8, small_state())), metadata=md, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert service.refused("unauthenticated", "unknown") == 2.0
    with pytest.raises(grpc.RpcError) as err:
        list(service.stub.GetRound(pb.RoundRequest(agent_id=agent_id), metadata=md, timeout=5))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert service.refused("unknown_agent", "unknown") == 2.0


def test_an_agent_that_joined_after_the_round_opened_is_refused_for_it(service: Service) -> None:
    a_id, a_md = open_round(service, "a")["a"]
    b_reply, b_md = service.join("b")  # round 0 is open already: b takes part from round 1
    before = snapshot(service)
    doubled = {k: (v * 2 if v.is_floating_point() else v) for k, v in small_state().items()}
    with pytest.raises(grpc.RpcError) as err:
        service.stub.SubmitUpdate(iter(update(b_reply.agent_id, 0, 8, doubled)), metadata=b_md, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert service.refused("not_participant", "b") == 1.0
    assert service.refused("stale_round", "b") == 0.0
    assert snapshot(service) == before
    # a's update alone makes the round: b's left nothing in it
    ack = service.stub.SubmitUpdate(iter(update(a_id, 0, 8, small_state())), metadata=a_md, timeout=5)
    assert ack.detail == "round 0"
    assert service.engine.close_round().applied
    assert snapshot(service) == before


def test_a_model_over_20_mb_goes_both_ways() -> None:
    big = {"w": torch.randn(6_000_000), "b": torch.randn(10)}  # 24 MB, 6x gRPC's default cap
    for svc in make_service(big):
        agent_id, md = open_round(svc, "a")["a"]
        msgs = list(svc.stub.GetRound(pb.RoundRequest(agent_id=agent_id, after_round=-1), metadata=md, timeout=30))
        got = serde.decode([m.part for m in msgs[1:]], serde.spec_of(big))
        assert torch.equal(got["w"], big["w"])
        doubled = {k: v * 2 for k, v in got.items()}
        assert svc.stub.SubmitUpdate(iter(update(agent_id, 0, 8, doubled)), metadata=md, timeout=30).detail == "round 0"
        svc.engine.close_round()
        assert torch.equal(svc.engine.global_state["w"], big["w"] * 2)


def test_a_slow_download_gets_time_for_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's GetRound deadline grows with the model: a fixed one cut slow links off mid-download."""
    big = {"w": torch.randn(2_000_000)}  # 8 MB
    nbytes = serde.nbytes(serde.spec_of(big))
    rate = nbytes / 2  # the link takes 2 s for the weights
    monkeypatch.setattr(client_module, "LONG_POLL_S", 0.0)
    monkeypatch.setattr(client_module, "GET_ROUND_SLACK_S", 1.0)  # less than the download takes
    for svc in make_service(big):
        with Relay(svc.port, down_bytes_per_s=rate) as link:
            client = CoordinatorClient(f"127.0.0.1:{link.port}")
            route = Route(client, same_host=False)
            try:
                client.join(pb.JoinRequest(agent_name="a"))
                svc.engine.open_round([(client.agent_id, 0.0, 1)])
                monkeypatch.setattr(client_module, "MIN_LINK_BYTES_PER_S", 10**12)  # no time for the bytes
                with pytest.raises(grpc.RpcError) as err:
                    route.fetch(-1, serde.spec_of(big))
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert link.down_bytes < nbytes  # cut off mid-download: the link was what took the time
                # time for the bytes on a link 8x slower than this one (what the cut-off stream left queued goes
                # first): 16 s more
                monkeypatch.setattr(client_module, "MIN_LINK_BYTES_PER_S", rate / 8)
                rnd = route.fetch(-1, serde.spec_of(big))
                assert rnd.state is not None and torch.equal(rnd.state["w"], big["w"])
            finally:
                client.close()


def test_a_join_naming_other_data_is_refused_and_counted_once() -> None:
    """A Join whose data_fingerprint is not the run's: FAILED_PRECONDITION, one data_mismatch, nobody admitted."""
    run = "ab12" * 16
    for svc in make_service(small_state(), spec=RunSpec(dataset="tweets", data_fingerprint=run)):
        before = snapshot(svc)
        with pytest.raises(grpc.RpcError) as err:
            svc.stub.Join(pb.JoinRequest(agent_name="other", data_fingerprint="cd34" * 16), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "fingerprint cd34cd34cd34, the run's is ab12ab12ab12" in (err.value.details() or "")
        refused = {(s.labels[m.NODE], s.labels[m.REASON]): s.value for f in svc.registry.collect()
                   if f.name + "_total" == m.UPDATES_REFUSED for s in f.samples if s.name == m.UPDATES_REFUSED}
        assert refused == {("unknown", "data_mismatch"): 1.0}  # counted once, under the one reason
        assert svc.membership.live() == []  # not admitted
        assert svc.registry.get_sample_value(m.UPDATES_ACCEPTED, {m.NODE: "other"}) is None
        # the same name with the run's data, and with none said (the agent checks its data itself): admitted
        reply = svc.stub.Join(pb.JoinRequest(agent_name="other", data_fingerprint=run), timeout=5)
        assert reply.agent_id and reply.spec.data_fingerprint == run
        assert svc.stub.Join(pb.JoinRequest(agent_name="b"), timeout=5).agent_id
        assert sorted(a.name for a in svc.membership.live()) == ["b", "other"]
        assert svc.refused("data_mismatch", "unknown") == 1.0
        assert snapshot(svc) == before  # the global model untouched


def test_operator_token_is_required_but_health_checks_pass() -> None:
    for svc in make_service(small_state(), token="s3cret"):
        with pytest.raises(grpc.RpcError) as err:
            svc.stub.Join(pb.JoinRequest(agent_name="a"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            svc.stub.Join(pb.JoinRequest(agent_name="a"), metadata=[("authorization", "Bearer wrong")], timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert svc.refused("unauthenticated", "unknown") == 2.0
        reply = svc.stub.Join(pb.JoinRequest(agent_name="a"), metadata=[("authorization", "Bearer s3cret")],
                              timeout=5)
        assert reply.agent_id
        health = health_pb2_grpc.HealthStub(svc.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="edgetrain.v1.Coordinator"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
