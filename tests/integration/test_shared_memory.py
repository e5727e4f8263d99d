"""The same-host file path over real gRPC on loopback: same bytes as streaming, same refusals, nothing left behind."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
from edgetrain.coordinator.transfer.samehost import SharedFiles
from prometheus_client import CollectorRegistry

from edgetrain import compression, grpc_options, serde
from edgetrain.grpc_options import address_host, is_loopback
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.records import NodeStats
from edgetrain.samehost import SHM_ROOT
from edgetrain.spec import RunSpec
from tests.integration.conftest import small_state

pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="needs /dev/shm")
STATS = pb.NodeStats(compute_seconds=0.5, loss=1.0)
SENT = NodeStats(samples=8, compute_seconds=0.5, loss=1.0)  # what the route sends as STATS, of 8 samples


@dataclass
class Setup:
    svc: ServiceState
    engine: RoundEngine
    registry: CollectorRegistry
    port: int

    def client(self, name: str, shared_memory: bool = True) -> Route:
        """A joined agent's route (its client: `.client`)."""
        c = CoordinatorClient(f"127.0.0.1:{self.port}")
        c.join(pb.JoinRequest(agent_name=name))
        return Route(c, same_host=shared_memory)

    def refused(self, reason: str, node: str) -> float:
        return self.registry.get_sample_value("edgetrain_updates_refused_total", {"node": node, "reason": reason}) or 0

    def snapshot(self) -> dict[str, bytes]:
        return {k: v.numpy().tobytes() for k, v in self.engine.global_state.items()}


@contextmanager
def serve(shm_root: Path | None = SHM_ROOT) -> Iterator[Setup]:
    registry = CollectorRegistry()
    engine = RoundEngine(small_state(), batch_size=4, local_steps=2, round_timeout=30.0)
    svc = ServiceState(engine, Membership(), RunSpec(dataset="tweets"), CoordinatorMetrics(registry), long_poll=1.0,
                       shm_root=shm_root)
    server, port, _ = start_server(svc, "127.0.0.1", 0)
    try:
        yield Setup(svc, engine, registry, port)
    finally:
        engine.finish()
        server.stop(grace=None).wait()
        svc.close()


def trained(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v * 1.5 + 0.25 if v.is_floating_point() else v + 1) for k, v in state.items()}


def one_round(setup: Setup, shared_memory: bool, wire: str) -> tuple[dict[str, torch.Tensor], pb.RoundHeader]:
    client = setup.client("a", shared_memory)
    try:
        setup.engine.open_round([(client.client.agent_id, 0.0, 1)])
        rnd = client.fetch(-1, serde.spec_of(small_state()))
        assert rnd.state is not None
        delta = wire != "float32"
        feedback = compression.ErrorFeedback(wire)
        new = trained(rnd.state)
        update = feedback.delta(new, rnd.state) if delta else new
        ack, _, sent = client.send(0, SENT, update, wire, delta=delta, update_file=rnd.header.update_file)
        assert ack.detail == "round 0" and sent > 0
        assert setup.engine.close_round().applied
        return rnd.state, rnd.header
    finally:
        client.client.close()


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16", "int8"])
def test_files_give_the_same_bytes_as_streaming(wire: str) -> None:
    with serve() as files_setup, serve() as stream_setup:
        got_files, header = one_round(files_setup, True, wire)
        got_stream, stream_header = one_round(stream_setup, False, wire)
        directory = files_setup.svc.transfer.shared_files(create=False)
        assert directory is not None
        assert header.weights_file.startswith(str(directory.dir)) and header.update_file
        assert not stream_header.weights_file and not stream_header.update_file
        assert stream_setup.svc.transfer.shared_files(create=False) is None  # nobody offered: no directory made
        for k, v in small_state().items():
            assert got_files[k].numpy().tobytes() == got_stream[k].numpy().tobytes() == v.numpy().tobytes()
        assert files_setup.snapshot() == stream_setup.snapshot() != {k: v.numpy().tobytes()
                                                                    for k, v in small_state().items()}
        assert Path(header.update_file).exists()  # kept: the agent rewrites it next round
        assert (files_setup.registry.get_sample_value("edgetrain_updates_accepted_total", {"node": "a"})
                == stream_setup.registry.get_sample_value("edgetrain_updates_accepted_total", {"node": "a"}) == 1)
    assert not directory.dir.exists()


def test_an_agent_that_does_not_offer_gets_streamed_weights_beside_one_that_does() -> None:
    with serve() as setup:
        a, b = setup.client("a", True), setup.client("b", False)
        try:
            setup.engine.open_round([(a.client.agent_id, 0.0, 1), (b.client.agent_id, 0.0, 1)])
            md = [(grpc_options.SESSION_METADATA, b.client.session)]
            msgs = list(b.client._stub.GetRound(pb.RoundRequest(agent_id=b.client.agent_id, after_round=-1),
                                                metadata=md, timeout=5))
            assert not msgs[0].header.weights_file and len(msgs) > 1
            got = serde.decode([m.part for m in msgs[1:]], serde.spec_of(small_state()))
            assert all(torch.equal(got[k], v) for k, v in small_state().items())
            rnd = a.fetch(-1, serde.spec_of(small_state()))
            assert rnd.header.weights_file and len(rnd.header.weights_layout) == len(small_state())
        finally:
            a.client.close()
            b.client.close()


def test_without_a_shared_memory_root_everything_streams(tmp_path: Path) -> None:
    with serve(shm_root=tmp_path / "missing") as setup:
        state, header = one_round(setup, True, "float32")
        assert not header.weights_file and not header.update_file
        assert setup.svc.transfer.shared_files() is None


@contextmanager
def offering_client() -> Iterator[tuple[Setup, Route, SharedFiles]]:
    """A served engine with round 0 open for one client that offers shared memory, and the coordinator's files."""
    with serve() as setup:
        client = setup.client("a", True)
        try:
            setup.engine.open_round([(client.client.agent_id, 0.0, 1)])
            files = setup.svc.transfer.shared_files()
            assert files is not None
            yield setup, client, files
        finally:
            client.client.close()


def test_an_agent_that_cannot_read_the_weights_file_falls_back_to_streaming() -> None:
    with offering_client() as (setup, client, files):
        path, _, _ = files.weights(0, setup.engine.global_state)
        os.remove(path)
        os.mkdir(path)  # unreadable as a file, even for root (as another host's path would be missing)
        rnd = client.fetch(-1, serde.spec_of(small_state()))
        assert rnd.state is not None and not rnd.header.weights_file and not client.same_host
        assert all(torch.equal(rnd.state[k], v) for k, v in small_state().items())


def test_the_next_rounds_weights_file_is_written_when_a_round_closes_before_anyone_fetches() -> None:
    with offering_client() as (setup, client, files):
        agent_id = client.client.agent_id
        files.weights(0, setup.engine.global_state)
        trained = {k: v + 1 if v.is_floating_point() else v for k, v in small_state().items()}
        setup.engine.submit(agent_id, 0, 8, trained, SENT)
        assert setup.engine.close_round().applied
        # round 1's file is there already: asked for with other tensors, it is not written again
        path, layout, _ = files.weights(1, {k: torch.zeros_like(v) for k, v in trained.items()})
        with open(path, "rb") as f:
            held, _ = serde.decode_file(f, layout, serde.spec_of(trained))
        assert all(torch.equal(held[k], setup.engine.global_state[k]) for k in held)
        assert any(not torch.equal(held[k], small_state()[k]) for k in held)  # the new model, not round 0's


Writer = Callable[[Path, dict[str, torch.Tensor]], list[pb.TensorPart]]


def _write(path: Path, state: dict[str, torch.Tensor]) -> list[pb.TensorPart]:
    with open(path, "wb") as f:
        return serde.write_raw(state, f)


def _nan(path: Path, state: dict[str, torch.Tensor]) -> list[pb.TensorPart]:
    return _write(path, {**state, "fc.bias": torch.full((4,), float("nan"))})


def _truncated(path: Path, state: dict[str, torch.Tensor]) -> list[pb.TensorPart]:
    layout = _write(path, state)
    os.truncate(path, path.stat().st_size - 4)
    return layout


def _longer(path: Path, state: dict[str, torch.Tensor]) -> list[pb.TensorPart]:
    layout = _write(path, state)
    with open(path, "ab") as f:
        f.write(b"\0" * 4)
    return layout


def _missing(path: Path, state: dict[str, torch.Tensor]) -> list[pb.TensorPart]:
    layout = _write(path, state)
    path.unlink()
    return layout


def _reshaped(path: Path, state: dict[str, torch.Tensor]) -> list[pb.TensorPart]:
    layout = _write(path, state)
    del layout[0].shape[:]
    layout[0].shape.extend([3, 4])
    return layout


def _symlink(path: Path, state: dict[str, torch.Tensor]) -> list[pb.TensorPart]:
    target = path.with_name("elsewhere")
    layout = _write(target, state)
    path.symlink_to(target)
    return layout


def _directory(path: Path, state: dict[str, torch.Tensor]) -> list[pb.TensorPart]:
    layout = _write(path.with_name("elsewhere"), state)
    path.mkdir()  # opens read-only like a file would; must be refused as one, not crash the call
    return layout


@pytest.mark.parametrize(("write", "round_", "session_ok", "reason", "code"), [
    (_directory, 0, True, "bad_tensor", grpc.StatusCode.INVALID_ARGUMENT),
    (_nan, 0, True, "non_finite", grpc.StatusCode.INVALID_ARGUMENT),
    (_truncated, 0, True, "bad_tensor", grpc.StatusCode.INVALID_ARGUMENT),
    (_longer, 0, True, "bad_tensor", grpc.StatusCode.INVALID_ARGUMENT),
    (_missing, 0, True, "bad_tensor", grpc.StatusCode.INVALID_ARGUMENT),
    (_reshaped, 0, True, "bad_tensor", grpc.StatusCode.INVALID_ARGUMENT),
    (_symlink, 0, True, "bad_tensor", grpc.StatusCode.INVALID_ARGUMENT),
    (_write, 1, True, "stale_round", grpc.StatusCode.FAILED_PRECONDITION),
    (_write, 0, False, "unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
])
@pytest.mark.parametrize("rpc", ["SubmitFile", "SubmitUpdate"])
def test_bad_updates_through_files_are_refused_counted_and_change_nothing(
        write: Writer, round_: int, session_ok: bool, reason: str, code: grpc.StatusCode, rpc: str) -> None:
    with serve() as setup:
        client = setup.client("a", True)
        try:
            setup.engine.open_round([(client.client.agent_id, 0.0, 1)])
            rnd = client.fetch(-1, serde.spec_of(small_state()))
            assert rnd.state is not None and rnd.header.update_file
            before = setup.snapshot()
            layout = write(Path(rnd.header.update_file), trained(rnd.state))
            header = pb.UpdateHeader(agent_id=client.client.agent_id, round=round_, num_samples=8, stats=STATS,
                                     layout=layout)
            md = [(grpc_options.SESSION_METADATA, client.client.session if session_ok else "wrong")]
            with pytest.raises(grpc.RpcError) as info:
                if rpc == "SubmitFile":  # the unary call agents use, and the stream of its header alone
                    client.client._stub.SubmitFile(header, metadata=md, timeout=5)
                else:
                    client.client._stub.SubmitUpdate(iter([pb.UpdateMessage(header=header)]), metadata=md, timeout=5)
            assert info.value.code() == code, info.value.details()
            assert setup.refused(reason, "a" if session_ok else "unknown") == 1  # who it is is unproven
            assert setup.snapshot() == before
            assert not setup.engine.close_round().applied
            assert setup.snapshot() == before
        finally:
            client.client.close()


def test_submit_file_without_a_layout_is_malformed_and_counted() -> None:
    with offering_client() as (setup, client, _files):
        before = setup.snapshot()
        header = pb.UpdateHeader(agent_id=client.client.agent_id, round=0, num_samples=8, stats=STATS)
        with pytest.raises(grpc.RpcError) as info:
            client.client._stub.SubmitFile(header, metadata=[(grpc_options.SESSION_METADATA, client.client.session)],
                                           timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layout" in (info.value.details() or "")
        assert setup.refused("malformed", "unknown") == 1 and setup.snapshot() == before


def test_an_update_file_is_read_only_where_the_coordinator_named_one() -> None:
    with serve() as setup:
        a, b = setup.client("a", True), setup.client("b", False)
        try:
            setup.engine.open_round([(a.client.agent_id, 0.0, 1), (b.client.agent_id, 0.0, 1)])
            rnd_a = a.fetch(-1, serde.spec_of(small_state()))
            rnd_b = b.fetch(-1, serde.spec_of(small_state()))
            assert rnd_a.state is not None and rnd_b.state is not None and not rnd_b.header.update_file
            before = setup.snapshot()
            # b was named no file; it points at a's in its layout-only update: refused, a's file untouched
            layout = _write(Path(rnd_a.header.update_file), trained(rnd_a.state))
            header = pb.UpdateHeader(agent_id=b.client.agent_id, round=0, num_samples=8, stats=STATS, layout=layout)
            md = [(grpc_options.SESSION_METADATA, b.client.session)]
            with pytest.raises(grpc.RpcError) as info:
                b.client._stub.SubmitUpdate(iter([pb.UpdateMessage(header=header)]), metadata=md, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert setup.refused("bad_tensor", "b") == 1 and setup.snapshot() == before
            assert Path(rnd_a.header.update_file).exists()
        finally:
            a.client.close()
            b.client.close()


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:50051", True), ("127.3.0.1:5", True),
    ("::1", True), ("ipv4:127.0.0.1:40000", True), ("ipv6:[::1]:40000", True),  # bare v6 and gRPC peers
    ("10.0.0.7:50051", False), ("coordinator.example:443", False), ("[fd00::7]:50051", False),
    ("ipv4:10.1.2.3:40000", False), ("unix:/tmp/sock", False),
])
def test_only_loopback_addresses_offer_shared_memory(address: str, loopback: bool) -> None:
    assert is_loopback(address_host(address)) is loopback


def test_directories_of_dead_coordinators_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"edgetrain-{dead.pid}-abc"
    live = tmp_path / f"edgetrain-{os.getpid()}-def"
    other = tmp_path / "unrelated-1-x"
    for d in (orphan, live, other):
        d.mkdir()
        (d / "r0-weights").write_bytes(b"x")
    files = SharedFiles(tmp_path)
    try:
        assert not orphan.exists() and live.exists() and other.exists() and files.dir.exists()
        assert files.dir.stat().st_mode & 0o777 == 0o700
    finally:
        files.close()
    assert not files.dir.exists()


def test_weights_stream_when_the_coordinator_cannot_write_its_file() -> None:
    with offering_client() as (_, client, files):
        files.dir.rmdir()  # writing fails as on a full /dev/shm
        rnd = client.fetch(-1, serde.spec_of(small_state()))
        assert rnd.state is not None and not rnd.header.weights_file and not rnd.header.update_file
        assert all(torch.equal(rnd.state[k], v) for k, v in small_state().items())


def test_a_directory_planted_where_an_update_goes_is_removed_and_files_keep_working() -> None:
    with offering_client() as (setup, client, files):
        rnd = client.fetch(-1, serde.spec_of(small_state()))
        assert rnd.state is not None and rnd.header.update_file
        _directory(Path(rnd.header.update_file), trained(rnd.state))
        header = pb.UpdateHeader(agent_id=client.client.agent_id, round=0, num_samples=8, stats=STATS,
                                 layout=serde.write_raw(small_state(), io.BytesIO()))
        with pytest.raises(grpc.RpcError) as info:
            md = [(grpc_options.SESSION_METADATA, client.client.session)]
            client.client._stub.SubmitUpdate(iter([pb.UpdateMessage(header=header)]), metadata=md, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not Path(rnd.header.update_file).exists()
        setup.engine.close_round()
        setup.engine.open_round([(client.client.agent_id, 0.0, 1)])
        again = client.fetch(0, serde.spec_of(small_state()))
        assert again.header.weights_file and client.same_host  # still through files
        with pytest.raises(OSError, match="older"):
            files.weights(again.header.round - 1, setup.engine.global_state)  # never sweeps the current round


@pytest.mark.parametrize("plant", ["outside", "symlink", "hardlink", "foreign-directory", "open-directory"])
def test_the_agent_writes_only_its_own_file_in_a_coordinators_directory(plant: str, tmp_path: Path) -> None:
    with offering_client() as (_, client, files):
        rnd = client.fetch(-1, serde.spec_of(small_state()))
        assert rnd.state is not None
        victim = tmp_path / "victim"
        if plant == "hardlink":  # a hard link needs the same file system: the victim sits in /dev/shm too
            victim = Path(tempfile.mkdtemp(dir=SHM_ROOT)) / "victim"
        victim.write_bytes(b"keep me")
        target = Path(rnd.header.update_file)
        if plant == "outside":  # a rogue listener on the coordinator's port names any path
            target = tmp_path / "update"
        elif plant == "symlink":
            target.symlink_to(victim)
        elif plant == "hardlink":
            os.link(victim, target)
        elif plant == "foreign-directory":  # named like a coordinator's directory, but not in /dev/shm
            target = tmp_path / f"edgetrain-{os.getpid()}-x" / "update"
            target.parent.mkdir(mode=0o700)
            target.write_bytes(b"keep me")
            victim = target
        else:  # a coordinator's directory others can enter is not private
            target = Path(tempfile.mkdtemp(prefix=f"edgetrain-{os.getpid()}-", dir=SHM_ROOT)) / "update"
            target.parent.chmod(0o755)
            target.write_bytes(b"keep me")
            victim = target
        try:
            ack, _, _ = client.send(0, SENT, trained(rnd.state), update_file=str(target))
            assert ack.detail == "round 0"  # taken, streamed instead
            assert not client.same_host
            assert victim.read_bytes() == b"keep me"
            assert plant != "outside" or not target.exists()
        finally:
            if victim.parent.parent == SHM_ROOT:
                shutil.rmtree(victim.parent)


def test_an_update_file_is_rewritten_in_place_round_after_round() -> None:
    """The same file (same inode) each round: no new tmpfs pages; a shorter update cuts it to its size."""
    with offering_client() as (setup, client, _files):
        expected = serde.spec_of(small_state())
        rnd = client.fetch(-1, expected)
        assert rnd.state is not None
        client.send(0, SENT, trained(rnd.state), update_file=rnd.header.update_file)
        path = Path(rnd.header.update_file)
        inode, size = path.stat().st_ino, path.stat().st_size
        path.write_bytes(path.read_bytes() + b"\0" * 64)  # longer than the next update
        assert setup.engine.close_round().applied
        setup.engine.open_round([(client.client.agent_id, 0.0, 1)])
        again = client.fetch(0, expected)
        assert again.state is not None and again.header.update_file == str(path)
        assert all(torch.equal(again.state[k], v) for k, v in trained(rnd.state).items())
        ack, _, _ = client.send(1, SENT, trained(again.state), update_file=again.header.update_file)
        assert ack.detail == "round 1" and client.same_host
        assert path.stat().st_ino == inode and path.stat().st_size == size
        assert setup.engine.close_round().applied
        want = trained(trained(rnd.state))
        assert all(torch.equal(setup.engine.global_state[k], v) for k, v in want.items())
