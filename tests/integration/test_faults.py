"""Faults with real processes and real gRPC on loopback: agents killed, the coordinator killed, stragglers.

Agents are `python -m edgetrain.agent start` subprocesses (each in its own session, so a test can kill one and clean
up its workers); the coordinator is in-process (port 0) or, when it is the one killed, a subprocess on a
fixed free port so the agents can reconnect to the same address.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import torch
from edgetrain.agent.client import CoordinatorClient
from edgetrain.agent.route import Route
from edgetrain.coordinator import checkpoint
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.run import Coordinator, RunResult
from edgetrain.coordinator.transfer.staging import StagedTensor

from edgetrain import grpc_options, serde
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.records import NodeStats
from edgetrain.spec import RunSpec
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CORES = sorted(os.sched_getaffinity(0))
# text-bag on 2,000 tweets: 1.7 MB of weights, ~2 ms a step, so 60 local steps make a round of ~0.15 s
SPEC = RunSpec(dataset="tweets", model="text-bag", limit=2000, seed=3)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class Procs:
    """Child processes started by a test, each in its own session; all killed (with their children) at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, key: str, args: list[str], env: dict[str, str] | None = None,
              wrap: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """`python -m ARGS`, after the command prefix `wrap` if any (tests/integration/netns.py: on a host)."""
        log = open(self.folder / f"{key}.log", "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen([*wrap, sys.executable, "-m", f"edgetrain.{args[0]}",
                                 *args[1:]], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.procs[f"{key}#{proc.pid}"] = proc
        return proc

    def agent(self, name: str, port: int, core: int, *extra: str, env: dict[str, str] | None = None,
              host: str = "127.0.0.1", wrap: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        return self.start(name, ["agent", "start", "--coordinator", f"{host}:{port}", "--cores", str(core),
                                 "--name", name, "--give-up-after", "60", "--log-level", "info", *extra], env, wrap)

    def log(self, key: str) -> str:
        path = self.folder / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.folder.glob("*.log"))

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its session: the agent and its spawned workers
                except ProcessLookupError:
                    pass
            proc.wait(10)
            family = [p for p in psutil.process_iter(["pid"]) if _session(p) == proc.pid]
            for p in family:  # orphaned workers of a SIGKILLed agent keep the session id
                p.kill()


def _session(p: psutil.Process) -> int:
    try:
        return os.getsid(p.pid)
    except OSError:
        return -1


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    folder = tmp_path / "logs"
    folder.mkdir()
    p = Procs(folder)
    try:
        yield p
    finally:
        p.close()
        print(p.logs())  # pytest shows it only when the test failed


class Driver:
    """An in-process Coordinator run on a thread, with the result or the error kept."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.coord = Coordinator(cfg)
        self.coord.start()
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="coordinator-run")

    def _run(self) -> None:
        try:
            self.result = self.coord.run()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> Driver:
        self.thread.start()
        return self

    def join(self, timeout: float = 60) -> RunResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the coordinator's run did not end"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def value(self, name: str, **labels: str) -> float:
        return self.coord.registry.get_sample_value(name, labels) or 0.0

    def ready(self) -> int:
        return self.coord.membership.ready_count()


@contextmanager
def drive(cfg: CoordinatorConfig) -> Iterator[Driver]:
    d = Driver(cfg)
    try:
        yield d
    finally:
        d.coord.stop.set()
        if d.thread.is_alive():
            d.thread.join(30)
        elif d.thread.ident is None:
            d.coord.close()


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # the process only: its workers must notice by themselves
    proc.wait(10)


# --------------------------------------------------------------------------------------------- agent killed


def test_agent_killed_mid_round_round_closes_short_world_shrinks_and_restart_rejoins(
        tmp_path: Path, procs: Procs, caplog: pytest.LogCaptureFixture) -> None:
    cfg = CoordinatorConfig(spec=SPEC, port=0, local_steps=60, rounds=10_000, min_agents=1, round_timeout=3.0,
                            eval_every=10_000, run_dir=tmp_path / "run", progress=False, join_timeout=120)
    with drive(cfg) as d:
        a = procs.agent("a", d.coord.port, CORES[0])
        b = procs.agent("b", d.coord.port, CORES[-1])
        wait_for(lambda: d.ready() == 2, 120, "both agents ready")
        d.start()
        engine = d.coord.engine
        assert engine is not None

        def b_is_training() -> bool:  # b fetched the open round's weights and has not sent its update yet
            b_id = next((x.agent_id for x in d.coord.membership.live() if x.name == "b"), "")
            sent = d.value("edgetrain_node_sent_bytes_total", node="b")
            return (engine._open and b_id in engine._assignments and b_id not in engine._received  # noqa: SLF001
                    and sent > 0 and sent // max(1, _model_bytes(engine)) > d.value(
                        "edgetrain_updates_accepted_total", node="b"))

        wait_for(lambda: d.value("edgetrain_updates_accepted_total", node="b") >= 2 and b_is_training(), 60,
                 "b in the middle of a round", poll=0.002)
        killed_in = engine.current_round
        kill(b)
        wait_for(lambda: d.value("edgetrain_rounds_closed_short_total") >= 1, 30, "the round to close short")
        # b's workers saw their pipe close and exited: nothing of b is left running
        wait_for(lambda: not [p for p in psutil.process_iter() if _session(p) == b.pid], 15, "b's workers to exit")
        # the world shrinks to a: rounds go on without waiting for b
        after_kill = engine.current_round
        wait_for(lambda: engine.current_round >= after_kill + 3, 30, "rounds with a alone")
        # b restarts under the same name and rejoins
        accepted_b = d.value("edgetrain_updates_accepted_total", node="b")
        b2 = procs.agent("b", d.coord.port, CORES[-1])
        wait_for(lambda: d.value("edgetrain_updates_accepted_total", node="b") >= accepted_b + 4, 60,
                 "the restarted b's updates to be accepted")
        d.coord.stop.set()
        result = d.join(60)
        assert a.wait(30) == 0 and b2.wait(30) == 0, procs.logs()

    assert d.value("edgetrain_rounds_closed_short_total") == 1
    by_round = {r.round: r for r in result.history}
    assert sorted(by_round) == list(range(result.completed_rounds))  # every round applied once, none lost
    short = [r for r in result.history[:-1] if r.missing]  # the last one was cut short by the stop
    assert [r.missing for r in short] == [("b",)]
    assert short[0].round == killed_in
    assert set(short[0].nodes) == {"a"}
    # b had measured round times: the round waited for it its own slack (at least min_wait), capped by the 3 s
    # deadline (a loaded machine's slow rounds can make the slack the longer; tests/unit/test_admission.py)
    assert cfg.limits.min_wait_seconds - 0.1 <= short[0].duration_seconds <= cfg.round_timeout + 0.5
    assert f"round {killed_in} closed without an update from b" in caplog.text  # the loss is logged
    later = [r for r in result.history[:-1] if r.round > killed_in]  # the last one was cut by the stop
    alone = [r for r in later if set(r.nodes) == {"a"}]
    assert len(alone) >= 3  # the lost shard went to a: world 1
    together = [r for r in later if set(r.nodes) == {"a", "b"}]
    assert len(together) >= 3 and min(r.round for r in together) > max(r.round for r in alone)
    # the restarted agent joined as a new session, trained from the round's global model, and was accepted
    assert "joined as" in procs.log("b") and procs.log("b").count("joined as") == 2
    assert d.value("edgetrain_updates_refused_total", node="b", reason="unknown_agent") == 0


def _model_bytes(engine: Any) -> int:
    return sum(v.numel() * v.element_size() for v in engine.global_state.values())


# --------------------------------------------------------------------------------------------- raw agents


class RawAgent:
    """An agent made of bare gRPC calls, to fake the timing of faults exactly."""

    def __init__(self, port: int, name: str) -> None:
        self.client = CoordinatorClient(f"127.0.0.1:{port}")
        self.route = Route(self.client)
        self.name = name
        self.after = -1
        self.refusals: list[tuple[int, grpc.StatusCode, str]] = []
        self.accepted: list[int] = []

    def join(self) -> None:
        self.client.join(pb.JoinRequest(agent_name=self.name), give_up_after=10)
        self.after = -1

    def fetch(self, expected: dict[str, serde.TensorSpec]) -> tuple[pb.RoundHeader, dict[str, torch.Tensor] | None]:
        while True:
            rnd = self.route.fetch(self.after, expected)
            if rnd.header.status != pb.WAIT:
                return rnd.header, rnd.state

    def send(self, header: pb.RoundHeader, state: dict[str, torch.Tensor]) -> bool:
        try:
            self.route.send(header.round, NodeStats(samples=header.local_steps * header.batch_size), state)
        except grpc.RpcError as err:
            self.refusals.append((header.round, err.code(), err.details() or ""))
            return False
        finally:
            self.after = header.round
        self.accepted.append(header.round)
        return True

    def train_until_finished(self, expected: dict[str, serde.TensorSpec], stop: threading.Event,
                             pace: float = 0.0) -> None:
        """Fetch and send until FINISHED, taking `pace` seconds per round as a real agent's steps would."""
        while not stop.is_set():
            header, state = self.fetch(expected)
            if header.status == pb.FINISHED or state is None:
                return
            stop.wait(pace)
            self.send(header, {k: (v + 0.001 if v.is_floating_point() else v) for k, v in state.items()})

    def close(self) -> None:
        self.client.close()


def _thread(target: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def test_straggler_does_not_stall_training_and_its_late_update_is_refused_as_late() -> None:
    # fast takes 0.2 s a round, as steps would: the straggler's on-time update (sent at once) lands inside its round
    # whether or not its late update measured it. Without a pace, fast's rounds closed within milliseconds, and
    # slow, whose late update had come just past its window (round 0 waits for it up to --round-timeout, which is
    # also the window, RoundEngine._late_fetch), stayed a newcomer and lost the race: a flake on a loaded machine.
    timeout = 3.0
    cfg = CoordinatorConfig(spec=SPEC, port=0, local_steps=1, rounds=10_000, min_agents=1, round_timeout=timeout,
                            eval_every=10_000, progress=False)
    with drive(cfg) as d:
        engine = d.coord.engine
        assert engine is not None
        expected = serde.spec_of(engine.global_state)
        fast, slow = RawAgent(d.coord.port, "fast"), RawAgent(d.coord.port, "slow")
        done = threading.Event()
        try:
            fast.join()
            slow.join()
            slow_work: list[tuple[pb.RoundHeader, dict[str, torch.Tensor] | None]] = []
            poller = _thread(lambda: slow_work.append(slow.fetch(expected)))
            _thread(lambda: fast.train_until_finished(expected, done, pace=0.2))
            wait_for(lambda: d.ready() == 2, 10, "both ready")
            d.start()
            poller.join(10)
            header, state = slow_work[0]
            assert header.status == pb.WORK and header.round == 0 and header.world == 2 and state is not None
            wait_for(lambda: engine.current_round >= 2, 20, "rounds to go on without the straggler")
            assert time.time() > header.deadline_unix
            assert not slow.send(header, state)  # round 0 closed at its deadline without it
            round_, code, details = slow.refusals[0]
            assert (round_, code) == (0, grpc.StatusCode.DEADLINE_EXCEEDED) and "deadline" in details
            assert d.value("edgetrain_updates_refused_total", node="slow", reason="late") == 1
            # still admitted: its next request puts it back in the rounds, and on time it counts again
            header, state = slow.fetch(expected)
            assert header.status == pb.WORK and header.world == 2 and state is not None
            assert slow.send(header, state)
            # that round closes once fast has sent too (stopping before could close it with slow alone)
            wait_for(lambda: engine.current_round > header.round, 10, "the round with both updates to close")
            d.coord.stop.set()
            result = d.join(30)
        finally:
            done.set()
            fast.close()
            slow.close()
    assert d.value("edgetrain_rounds_closed_short_total") == 1
    first = result.history[0]
    assert first.missing == ("slow",) and set(first.nodes) == {"fast"}
    assert first.duration_seconds >= timeout - 0.05  # it waited for the straggler until the deadline
    back = next(i for i, r in enumerate(result.history) if set(r.nodes) == {"fast", "slow"})
    # until slow asked again it was out of the rounds: fast's rounds expected nobody else and closed complete
    alone = result.history[1:back]
    assert alone and all(set(r.nodes) == {"fast"} and r.missing == () for r in alone), alone


def test_with_min_agents_2_a_short_round_is_rerun_with_the_restarted_agent_and_the_survivor() -> None:
    """min_agents=2: one of two dies mid-round, so the round is not applied; it runs again once the dead one
    is back under its name, and the survivor (which already sent for that round number) is handed the re-run."""
    timeout = 1.5
    cfg = CoordinatorConfig(spec=SPEC, port=0, local_steps=1, rounds=4, min_agents=2, round_timeout=timeout,
                            eval_every=10_000, progress=False, join_timeout=30)
    with drive(cfg) as d:
        engine = d.coord.engine
        assert engine is not None
        expected = serde.spec_of(engine.global_state)
        a, b = RawAgent(d.coord.port, "a"), RawAgent(d.coord.port, "b")
        done = threading.Event()
        try:
            a.join()
            b.join()
            a_thread = _thread(lambda: a.train_until_finished(expected, done))
            b_work: list[tuple[pb.RoundHeader, dict[str, torch.Tensor] | None]] = []

            def b_dies_in_round_1() -> None:
                for _ in range(2):
                    header, state = b.fetch(expected)
                    b_work.append((header, state))
                    if header.round == 1:
                        return  # b "dies" with the round's weights in hand
                    assert state is not None
                    b.send(header, state)

            b_thread = _thread(b_dies_in_round_1)
            d.start()
            b_thread.join(10)
            assert b_work[-1][0].round == 1
            wait_for(lambda: d.value("edgetrain_rounds_closed_short_total") == 1, 10, "round 1 to close short")
            assert engine.current_round == 1  # too few updates: not applied
            time.sleep(0.3)
            assert engine.current_round == 1  # and not run again without a second agent
            b.close()
            b2 = RawAgent(d.coord.port, "b")
            b2.join()
            b2_thread = _thread(lambda: b2.train_until_finished(expected, done))
            result = d.join(30)
            a_thread.join(10)
            b2_thread.join(10)
        finally:
            done.set()
            a.close()
    assert result.completed_rounds == 4
    assert [r.round for r in result.history] == [0, 1, 2, 3]
    assert d.value("edgetrain_rounds_closed_short_total") == 1  # the re-run did not wait for a deadline
    assert a.accepted == [0, 1, 1, 2, 3]  # round 1 twice: the first copy was dropped with the short round
    assert b2.accepted == [1, 2, 3]
    assert all(set(r.nodes) == {"a", "b"} for r in result.history)



def test_a_round_spoiled_by_an_update_that_fails_to_read_back_runs_again_and_benches_nobody(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed update's staging file fails (an I/O error) while the coordinator adds it to the round's sum: the
    round closes at once without being applied and runs again with the same agents. Nobody is taken out of the
    rounds nor counted short for it (it was nobody's fault), and the failed update is refused as "staging"."""
    original = StagedTensor.slices
    failures: list[int] = []

    def slices(self: StagedTensor) -> Any:
        seen = self.__dict__.setdefault("_reads", [0])
        seen[0] += 1
        if seen[0] == 2 and not failures:  # its first read checked it whole; the second adds it
            failures.append(1)
            raise OSError(errno.EIO, "Input/output error")
        return original(self)

    monkeypatch.setattr(StagedTensor, "slices", slices)
    cfg = CoordinatorConfig(spec=SPEC, port=0, local_steps=1, rounds=3, min_agents=2, round_timeout=30,
                            eval_every=10_000, progress=False, join_timeout=30)
    with drive(cfg) as d:
        engine = d.coord.engine
        assert engine is not None
        expected = serde.spec_of(engine.global_state)
        agents = [RawAgent(d.coord.port, name) for name in ("a", "b")]
        done = threading.Event()
        try:
            threads = []
            for agent in agents:
                agent.route.same_host = False  # streamed: staged before it is added
                agent.join()
                threads.append(_thread(lambda agent=agent: agent.train_until_finished(expected, done)))
            d.start()
            result = d.join(30)
            for t in threads:
                t.join(10)
        finally:
            done.set()
            for agent in agents:
                agent.close()
    assert failures  # the fault did happen
    assert result.completed_rounds == 3 and [r.round for r in result.history] == [0, 1, 2]
    assert all(set(r.nodes) == {"a", "b"} for r in result.history)
    stale = grpc.StatusCode.FAILED_PRECONDITION  # the other agent's update, if it came after the close
    refused = [(agent.name, code) for agent in agents for _, code, _ in agent.refusals if code != stale]
    assert refused and refused[0][1] == grpc.StatusCode.UNAVAILABLE
    assert d.value("edgetrain_updates_refused_total", node=refused[0][0], reason="staging") >= 1
    assert d.value("edgetrain_rounds_closed_short_total") == 0  # not benched: a short round would count


# --------------------------------------------------------------------------------------------- coordinator killed


def _rounds(path: Path) -> list[int]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["round"])
        except (json.JSONDecodeError, KeyError):
            pass
    return out


def test_coordinator_killed_resumes_from_its_checkpoint_and_agents_carry_on(tmp_path: Path, procs: Procs) -> None:
    port, run_dir, rounds = free_port(), tmp_path / "run", 14
    coordinator = ["coordinator", "run", "--dataset", "tweets", "--model", "text-bag", "--limit", "2000", "--seed",
                   "3", "--local-steps", "60", "--rounds", str(rounds), "--min-agents", "2", "--port", str(port),
                   "--run-dir", str(run_dir), "--round-timeout", "20", "--eval-every", "5", "--join-timeout", "120",
                   "--checkpoint-every", "1", "--no-progress"]  # every round: a kill loses at most the one it was in
    first = procs.start("coordinator-1", coordinator)
    agents = [procs.agent(name, port, core) for name, core in (("a", CORES[0]), ("b", CORES[-1]))]
    log = run_dir / "rounds.jsonl"
    wait_for(lambda: len(_rounds(log)) >= 4 or first.poll() is not None, 120, "4 rounds")
    kill(first)
    logged = _rounds(log)
    assert len(logged) < rounds, "the run ended before it could be killed"
    time.sleep(1.0)  # the agents lose the coordinator and back off; they must not exit
    assert all(p.poll() is None for p in agents), procs.logs()

    second = procs.start("coordinator-2", [*coordinator, "--resume"])
    assert second.wait(120) == 0, procs.logs()
    assert [p.wait(30) for p in agents] == [0, 0], procs.logs()

    out = procs.log("coordinator-2")
    resumed = int(out.split("resuming from round ")[1].split()[0])
    # killed after logging round r but before its checkpoint, it runs r again; never a round further back
    assert len(logged) - 1 <= resumed <= len(logged)
    assert _rounds(log) == list(range(rounds))  # each round exactly once: none lost, none twice
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(set(r["nodes"]) == {"a", "b"} for r in records[resumed:])  # both agents came back
    assert checkpoint.load(run_dir).completed_rounds == rounds
    assert (run_dir / checkpoint.MODEL).exists()
    assert not list(run_dir.glob(".*.tmp"))
    for name in ("a", "b"):
        assert procs.log(name).count("joined again as") == 1  # rejoined the restarted coordinator


def test_agent_gives_up_when_the_coordinator_stays_gone(procs: Procs) -> None:
    cfg = CoordinatorConfig(spec=SPEC, port=0, rounds=1, progress=False)
    coord = Coordinator(cfg)
    coord.start()
    try:
        agent = procs.agent("lonely", coord.port, CORES[0], "--give-up-after", "2")
        wait_for(lambda: coord.membership.ready_count() == 1, 60, "the agent to be ready")
    finally:
        coord.engine = None  # go away without telling the agents the run is over
        coord.close()
    assert agent.wait(30) == 1  # without --give-up-after it would retry for ever
    assert "UNAVAILABLE" in procs.log("lonely")


# --------------------------------------------------------------------------------------------- deadlines


class _Recorder(pb_grpc.CoordinatorServicer):
    """Answers every call and writes down the deadline it came with."""

    def __init__(self) -> None:
        self.deadlines: dict[str, float | None] = {}

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:  # noqa: N802
        self.deadlines["Join"] = context.time_remaining()
        return pb.JoinReply(agent_id="x", session_token="t")

    def GetRound(self, request: pb.RoundRequest, context: grpc.ServicerContext) -> Iterator[pb.RoundMessage]:  # noqa: N802
        self.deadlines["GetRound"] = context.time_remaining()
        yield pb.RoundMessage(header=pb.RoundHeader(status=pb.FINISHED))

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdateMessage],  # noqa: N802
                     context: grpc.ServicerContext) -> pb.UpdateAck:
        self.deadlines["SubmitUpdate"] = context.time_remaining()
        for _ in request_iterator:
            pass
        return pb.UpdateAck(detail="round 0")

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:  # noqa: N802
        self.deadlines["Leave"] = context.time_remaining()
        return pb.LeaveReply()


def test_every_rpc_the_agent_makes_has_a_deadline() -> None:
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=grpc_options.SERVER)
    pb_grpc.add_CoordinatorServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = CoordinatorClient(f"127.0.0.1:{port}")
    big = {"w": torch.zeros(5_000_000)}  # 20 MB: 160 s at the 1 Mbit/s the deadlines allow for
    submits = []
    try:
        client.join(pb.JoinRequest(agent_name="a"))
        route = Route(client)
        route.fetch(-1, serde.spec_of(big))
        route.send(0, NodeStats(samples=1), big)
        submits.append(recorder.deadlines["SubmitUpdate"])
        route.send(0, NodeStats(samples=1), big, round_deadline=time.time() + 1000)  # the round ends later
        submits.append(recorder.deadlines["SubmitUpdate"])
        client.leave()
    finally:
        client.close()
        server.stop(None).wait()
    d = recorder.deadlines
    assert set(d) == {"Join", "GetRound", "SubmitUpdate", "Leave"}
    assert all(v is not None and v > 0 for v in d.values()), d

    def about(got: float | None, want: float) -> bool:  # the wire rounds a timeout up to its unit (<= ~1%)
        return got is not None and want - 10 < got <= want * 1.01 + 0.1

    from edgetrain.agent import client as c

    transfer = 4 * big["w"].numel() / c.MIN_LINK_BYTES_PER_S  # 20 MB on the slowest link allowed for: 160 s
    assert transfer == 160
    assert about(d["Join"], c.JOIN_DEADLINE_S) and about(d["Leave"], c.LEAVE_DEADLINE_S), d
    assert about(d["GetRound"], c.LONG_POLL_S + c.GET_ROUND_SLACK_S + transfer), d
    # an upload may wait for a slot until its round's deadline, when that is further off than the default
    assert about(submits[0], c.SUBMIT_DEADLINE_S + transfer) and about(submits[1], 1000 + transfer), submits
