"""Real gRPC servers on loopback (port 0), and emulated hosts in network namespaces: started by fixtures, always
stopped."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from edgetrain.coordinator.admission import Limits
from edgetrain.coordinator.membership import Membership
from edgetrain.coordinator.metrics import CoordinatorMetrics
from edgetrain.coordinator.rounds import RoundEngine
from edgetrain.coordinator.server import start_server
from edgetrain.coordinator.service import ServiceState
from prometheus_client import CollectorRegistry

from edgetrain import grpc_options
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.spec import RunSpec
from tests.integration.netns import Cluster, unavailable
from tests.integration.test_faults import Procs


@dataclass
class Service:
    stub: pb_grpc.CoordinatorStub
    channel: grpc.Channel
    engine: RoundEngine
    membership: Membership
    registry: CollectorRegistry
    port: int
    state: ServiceState

    def join(self, name: str = "a") -> tuple[pb.JoinReply, list[tuple[str, str]]]:
        reply = self.stub.Join(pb.JoinRequest(agent_name=name), timeout=5)
        return reply, [(grpc_options.SESSION_METADATA, reply.session_token)]

    def refused(self, reason: str, node: str = "a") -> float:
        value = self.registry.get_sample_value(
            "edgetrain_updates_refused_total", {"node": node, "reason": reason})
        return value or 0.0


def small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g),
            "bn.num_batches_tracked": torch.tensor(3)}


def make_service(state: dict[str, torch.Tensor], token: str | None = None, staging_dir: Path | None = None,
                 limits: Limits | None = None, upload_slots: int = 2, long_poll: float = 1.0,
                 spec: RunSpec | None = None, **engine_kw: object) -> Iterator[Service]:
    """A real server on loopback over a real engine; membership and metrics wired as `coordinator run` does."""
    registry = CollectorRegistry()
    metrics = CoordinatorMetrics(registry)
    limits = limits or Limits()
    kw: dict[str, object] = {"batch_size": 4, "local_steps": 2, "round_timeout": 30.0, "limits": limits, **engine_kw}
    engine = RoundEngine(state, **kw)  # type: ignore[arg-type]
    membership = Membership(on_leave=lambda agent: metrics.node_left(agent.name), max_agents=limits.max_agents)
    svc = ServiceState(engine, membership, spec or RunSpec(dataset="tweets"), metrics, long_poll=long_poll,
                       staging_dir=staging_dir, limits=limits, upload_slots=upload_slots)
    server, port, _ = start_server(svc, "127.0.0.1", 0, token=token)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options.CLIENT)
    try:
        yield Service(pb_grpc.CoordinatorStub(channel), channel, engine, membership, registry, port, svc)
    finally:
        channel.close()
        engine.finish()
        server.stop(grace=None).wait()
        svc.close()


@pytest.fixture
def service() -> Iterator[Service]:
    yield from make_service(small_state())


@dataclass
class Hosts:
    """Emulated hosts "coord", "a" and "b" (tests/integration/netns.py) and the processes a test starts on them."""

    net: Cluster
    procs: Procs


def need_netns() -> None:
    """Skip the test where network namespaces cannot be made here (root, iproute2, iptables); fail under CI=true."""
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    need_netns()
    (tmp_path / "logs").mkdir()
    procs = Procs(tmp_path / "logs")
    net = Cluster(["coord", "a", "b"])
    try:
        yield Hosts(net, procs)
    finally:
        procs.close()  # the processes first: a namespace lives on as long as a process is in it
        net.close()
        print(procs.logs())  # pytest shows it only when the test failed
