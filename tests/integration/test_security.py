"""Security over real gRPC on loopback: TLS and mutual TLS with certificates made at test time (openssl CLI),
the operator token, plaintext refused off loopback, health, and robust aggregation against a poisoned agent."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from edgetrain.coordinator.cli import make_app
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.membership import Membership
from edgetrain.coordinator.metrics import CoordinatorMetrics
from edgetrain.coordinator.rounds import RoundEngine
from edgetrain.coordinator.run import Coordinator
from edgetrain.coordinator.server import SERVICE_NAME, start_server
from edgetrain.coordinator.service import ServiceState
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from edgetrain import grpc_options
from edgetrain.cli_util import run_app
from edgetrain.errors import ConfigError
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.spec import RunSpec
from tests.integration.conftest import Service, make_service, small_state
from tests.integration.test_faults import CORES, SPEC, Procs, drive, wait_for
from tests.integration.test_grpc_servicer import open_round, update

TOKEN = "op-s3cret-token"


# ---------------------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # another CA, and a client certificate it signed
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(extensions + "\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out",
             f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command-line tool to make test certificates")
    folder = tmp_path_factory.mktemp("certs")
    ca, rogue = _ca(folder, "test-ca"), _ca(folder, "rogue-ca")
    server = _leaf(folder, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    client = _leaf(folder, "agent-a", ca, "extendedKeyUsage=clientAuth")
    intruder = _leaf(folder, "intruder", rogue, "extendedKeyUsage=clientAuth")
    return Certs(ca[0], *server, *client, rogue[0], *intruder)


@dataclass
class TLSService:
    port: int
    engine: RoundEngine
    registry: CollectorRegistry

    def channel(self, creds: grpc.ChannelCredentials | None) -> grpc.Channel:
        address = f"127.0.0.1:{self.port}"
        if creds is None:
            return grpc.insecure_channel(address, options=grpc_options.CLIENT)
        return grpc.secure_channel(address, creds, options=grpc_options.CLIENT)

    def join(self, creds: grpc.ChannelCredentials | None, token: str | None = TOKEN) -> pb.JoinReply:
        with self.channel(creds) as ch:
            md = [(grpc_options.TOKEN_METADATA, f"Bearer {token}")] if token is not None else []
            reply: pb.JoinReply = pb_grpc.CoordinatorStub(ch).Join(pb.JoinRequest(agent_name="a"), metadata=md,
                                                                  timeout=5)
            return reply

    def refused(self, reason: str, node: str = "unknown") -> float:
        return self.registry.get_sample_value("edgetrain_updates_refused_total", {"node": node, "reason": reason}) or 0


@pytest.fixture
def tls_service(certs: Certs, request: pytest.FixtureRequest) -> Iterator[TLSService]:
    mutual = getattr(request, "param", False)
    registry = CollectorRegistry()
    engine = RoundEngine(small_state(), batch_size=4, local_steps=2, round_timeout=30.0)
    svc = ServiceState(engine, Membership(), RunSpec(dataset="tweets"), CoordinatorMetrics(registry), long_poll=0.1)
    server, port, _ = start_server(svc, "127.0.0.1", 0, token=TOKEN, tls_cert=certs.server_cert,
                                   tls_key=certs.server_key, tls_client_ca=certs.ca if mutual else None)
    try:
        yield TLSService(port, engine, registry)
    finally:
        engine.finish()
        server.stop(grace=None).wait()


def _creds(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    read = (lambda p: p.read_bytes() if p is not None else None)  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Procs]:
    (tmp_path / "logs").mkdir()
    p = Procs(tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()
        print(p.logs())  # shown only when the test failed


# ---------------------------------------------------------------------------------------------- TLS


def test_tls_admits_a_client_that_trusts_the_ca_and_no_other(tls_service: TLSService, certs: Certs) -> None:
    assert tls_service.join(_creds(certs.ca)).agent_id
    for creds, what in [(None, "plaintext"), (_creds(None), "the system's roots"), (_creds(certs.rogue_ca),
                                                                                     "another CA")]:
        with pytest.raises(grpc.RpcError) as err:
            tls_service.join(creds)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what  # the handshake fails: nothing reaches us
    assert tls_service.refused("unauthenticated") == 0


@pytest.mark.parametrize("tls_service", [True], indirect=True, ids=["mutual"])
def test_mutual_tls_refuses_a_client_without_a_certificate_from_the_ca(tls_service: TLSService, certs: Certs) -> None:
    assert tls_service.join(_creds(certs.ca, certs.client_cert, certs.client_key)).agent_id
    for creds, what in [(_creds(certs.ca), "no client certificate"),
                        (_creds(certs.ca, certs.rogue_cert, certs.rogue_key), "a certificate from another CA"),
                        (None, "plaintext")]:
        with pytest.raises(grpc.RpcError) as err:
            tls_service.join(creds)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what


def test_a_wrong_or_missing_token_over_tls_is_unauthenticated_and_counted(tls_service: TLSService,
                                                                          certs: Certs) -> None:
    creds = _creds(certs.ca)
    for token in (None, "wrong", f"{TOKEN}x", ""):
        with pytest.raises(grpc.RpcError) as err:
            tls_service.join(creds, token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = tls_service.join(creds)
    # the streaming calls are guarded too, even with a valid session token
    session = [(grpc_options.SESSION_METADATA, reply.session_token)]
    with tls_service.channel(creds) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        bad = [(grpc_options.TOKEN_METADATA, "Bearer nope"), *session]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GetRound(pb.RoundRequest(agent_id=reply.agent_id), metadata=bad, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        tls_service.engine.open_round([(reply.agent_id, 0.0, 1)])
        before = {k: v.clone() for k, v in tls_service.engine.global_state.items()}
        msgs = update(reply.agent_id, 0, 8, {k: v * 2 for k, v in small_state().items()})
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitUpdate(iter(msgs), metadata=bad, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitFile(msgs[0].header, metadata=bad, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health checks need no token (probes and load balancers have none)
        health = health_pb2_grpc.HealthStub(ch)
        got = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert got.status == health_pb2.HealthCheckResponse.SERVING
    assert tls_service.refused("unauthenticated") == 7
    tls_service.engine.close_round()
    assert all(torch.equal(v, before[k]) for k, v in tls_service.engine.global_state.items())


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_a_real_agent_trains_over_tls_with_the_token_and_health_turns_not_serving_at_the_end(
        certs: Certs, children: Procs, tmp_path: Path, mutual: bool) -> None:
    cfg = CoordinatorConfig(spec=SPEC, port=0, local_steps=4, rounds=3, min_agents=1, round_timeout=30,
                            eval_every=3, run_dir=tmp_path / "run", progress=False, join_timeout=120, token=TOKEN,
                            tls_cert=certs.server_cert, tls_key=certs.server_key,
                            tls_client_ca=certs.ca if mutual else None)
    with drive(cfg) as d:
        client = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)] if mutual else []
        agent = children.agent("a", d.coord.port, CORES[0], "--tls-ca", str(certs.ca), *client,
                            env={"EDGETRAIN_TOKEN": TOKEN})
        creds = _creds(certs.ca, certs.client_cert, certs.client_key) if mutual else _creds(certs.ca)
        with grpc.secure_channel(f"127.0.0.1:{d.coord.port}", creds, options=grpc_options.CLIENT) as ch:
            got = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert got.status == health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: d.ready() == 1, 120, "the agent to be ready")
        result = d.start().join(120)
        assert agent.wait(30) == 0
    assert result.completed_rounds == 3 and set(result.nodes) == {"a"}
    assert d.value("edgetrain_updates_refused_total", node="unknown", reason="unauthenticated") == 0
    # over: NOT_SERVING (probes stop sending agents here), for every service name
    for service in ("", SERVICE_NAME):
        status = d.coord.health.Check(health_pb2.HealthCheckRequest(service=service), None).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_an_agent_with_a_wrong_token_is_refused_and_exits(certs: Certs, children: Procs) -> None:
    cfg = CoordinatorConfig(spec=SPEC, port=0, rounds=1, progress=False, token=TOKEN, tls_cert=certs.server_cert,
                            tls_key=certs.server_key)
    coord = Coordinator(cfg)
    coord.start()
    try:
        agent = children.agent("a", coord.port, CORES[0], "--tls-ca", str(certs.ca), env={"EDGETRAIN_TOKEN": "guess"})
        assert agent.wait(60) == 1
    finally:
        coord.close()
    assert "coordinator refused: UNAUTHENTICATED" in children.log("a")
    assert coord.registry.get_sample_value("edgetrain_updates_refused_total",
                                           {"node": "unknown", "reason": "unauthenticated"}) == 1


# ---------------------------------------------------------------------------------------------- plaintext


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_plaintext_off_loopback_is_refused_unless_insecure(host: str, certs: Certs) -> None:
    with pytest.raises(ConfigError, match="without TLS"):
        CoordinatorConfig(host=host, rounds=1)
    CoordinatorConfig(host=host, rounds=1, insecure=True)
    CoordinatorConfig(host=host, rounds=1, tls_cert=certs.server_cert, tls_key=certs.server_key)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.5.5.5"])
def test_plaintext_on_loopback_is_allowed(host: str) -> None:
    assert CoordinatorConfig(host=host, rounds=1).host == host


def test_the_cli_refuses_plaintext_off_loopback_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_app(make_app(), "coordinator", ["run", "--host", "0.0.0.0", "--rounds", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "without TLS" in err and "--insecure" in err


# ---------------------------------------------------------------------------------------------- poisoning


def _send(svc: Service, agent: tuple[str, list[tuple[str, str]]], state: dict[str, torch.Tensor]) -> None:
    ack = svc.stub.SubmitUpdate(iter(update(agent[0], svc.engine.current_round, 8, state)), metadata=agent[1],
                                timeout=5)
    assert ack.detail == f"round {svc.engine.current_round}"  # taken for the open round


@pytest.mark.parametrize(("aggregator", "honest", "poisoned"), [("median", 2, 1), ("trimmed-mean", 4, 1),
                                                                 ("median", 3, 2)])
def test_a_poisoned_update_cannot_move_a_robust_aggregate_out_of_the_honest_range(
        aggregator: str, honest: int, poisoned: int) -> None:
    g = torch.Generator().manual_seed(1)
    base = small_state()
    honest_states = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                      for k, v in base.items()} for _ in range(honest)]
    huge = {k: (torch.full_like(v, 1e30) if v.is_floating_point() else v) for k, v in base.items()}  # valid, finite
    for svc in make_service(base, aggregator=aggregator, trim=0.2):
        names = [f"h{i}" for i in range(honest)] + [f"p{i}" for i in range(poisoned)]
        joined = open_round(svc, *names)
        for name, state in zip(names, honest_states + [huge] * poisoned, strict=True):
            _send(svc, joined[name], state)
        out = svc.engine.close_round()
        assert out.applied and not out.overflow
        for k, v in svc.engine.global_state.items():
            if not v.is_floating_point():
                continue
            stacked = torch.stack([s[k] for s in honest_states])
            assert bool((v >= stacked.min(0).values).all() and (v <= stacked.max(0).values).all()), k
    # the plain mean has no such defence: one poisoned agent takes the model wherever it likes
    for svc in make_service(base, aggregator="mean"):
        names = [f"h{i}" for i in range(honest)] + ["p"]
        joined = open_round(svc, *names)
        for name, state in zip(names, [*honest_states, huge], strict=True):
            _send(svc, joined[name], state)
        svc.engine.close_round()
        assert float(svc.engine.global_state["fc.weight"].abs().min()) > 1e28


def test_no_agent_can_join_as_the_refusals_node(service: Service) -> None:
    """'unknown' counts refusals before the caller is known: an agent of that name would hide among them."""
    with pytest.raises(grpc.RpcError) as err:
        service.join("unknown")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in (err.value.details() or "")
    assert len(service.membership) == 0 and service.refused("malformed", "unknown") == 1
    reply, _ = service.join("unknown-2")  # a name that only starts so is anybody's
    assert reply.agent_id
