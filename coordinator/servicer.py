"""Thin gRPC servicer: decode, call the round engine, encode; refusals mapped to status codes in one place."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from edgetrain import grpc_options
from edgetrain.cores import format_cores
from edgetrain.errors import NonFiniteError, WireError
from edgetrain.grpc_options import address_host, is_loopback
from edgetrain.metric_names import UNKNOWN_NODE
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.records_pb import stats_of, work_header
from edgetrain.samehost import SHM_ROOT
from edgetrain.spec import RunSpec

from . import rounds
from .admission import CallCounts, JoinRate, KnownNames, Limits, PollSlots, Watchdog, join_problem, metrics_address
from .config import UPLOAD_SLOTS
from .membership import Agent, FullError, Membership
from .metrics import CoordinatorMetrics
from .streams import STATUS, Oversize, Stream, timed_parts
from .transfer import SEND_SLOTS, SEND_WAIT, Outgoing, Transfer, UpdateSource

log = logging.getLogger("edgetrain.coordinator")

MAX_THROUGHPUT = 1e9  # samples/s: far above any real node, and small enough that sums of them stay finite


@dataclass
class ServiceState:
    """What the servicer needs: the engine, who is in, the spec, the metrics, the transfer and the limits."""

    engine: rounds.RoundEngine
    membership: Membership
    spec: RunSpec
    metrics: CoordinatorMetrics
    long_poll: float = 20.0
    # how tensors move (coordinator/transfer): slots, staging, same-host files
    upload_slots: int = UPLOAD_SLOTS
    send_slots: int = SEND_SLOTS
    send_wait: float | None = SEND_WAIT
    shm_root: Path | None = SHM_ROOT
    staging_dir: Path | None = None
    min_agents: int = 1  # the run's --min-agents: newcomers past the poll cap stay ready while fewer are
    limits: Limits = field(default_factory=Limits)  # what one client may hold (coordinator/admission.py)

    def __post_init__(self) -> None:
        self.transfer = Transfer(self.engine, upload_slots=self.upload_slots, send_slots=self.send_slots,
                                 send_wait=self.send_wait, shm_root=self.shm_root, staging_dir=self.staging_dir)
        self.calls = CallCounts(self.limits.calls_per_agent)
        self.upload_calls = CallCounts(1)  # one upload per agent at a time: two would hold two upload slots
        self.joins = JoinRate(self.limits.joins_per_second, self.limits.join_burst)
        self.polls = PollSlots(self.limits.held_polls, self.limits.newcomer_polls)
        self.known = KnownNames()  # names whose updates were taken: restarted under one, no newcomer
        self.watchdog = Watchdog()
        self._swept_at = 0.0

    def sweep(self, every: float = 1.0) -> None:
        """Evict agents that never polled or went quiet (Limits); at most once per `every` seconds."""
        now = time.monotonic()
        if now - self._swept_at < every:
            return
        self._swept_at = now
        lim = self.limits
        for agent in self.membership.sweep(first_poll=lim.first_poll_seconds, idle=lim.idle_seconds,
                                           busy=self.engine.busy(), open_calls=self.calls.open_calls, now=now):
            self.engine.forget(agent.agent_id)
            log.warning("agent %s evicted: %s", agent.name, "it never asked for a round" if not agent.polled
                        else f"no call for {lim.idle_seconds:g} s")

    def close(self) -> None:
        """Stop the watchdog; remove the same-host files and close the staging files (also at interpreter exit)."""
        self.watchdog.close()
        self.transfer.close()


def _wire_reason(err: WireError) -> rounds.RefusedError:
    if isinstance(err, NonFiniteError):
        return rounds.NonFiniteError(str(err))
    return rounds.BadTensorError(str(err))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    @contextmanager
    def _refusals(self, context: grpc.ServicerContext, node: list[str]) -> Iterator[None]:
        """Turn a refusal into its status code and count it under the caller's node name."""
        try:
            yield
        except WireError as err:
            refusal = _wire_reason(err)
            self.s.metrics.refused_update(node[0], refusal.reason)
            context.abort(STATUS[refusal.status], str(refusal))
        except rounds.RefusedError as err:
            self.s.metrics.refused_update(node[0], err.reason)
            context.abort(STATUS[err.status], str(err))

    def _agent(self, agent_id: str, context: grpc.ServicerContext) -> Agent:
        md = dict(context.invocation_metadata())
        token = md.get(grpc_options.SESSION_METADATA, "")
        agent = self.s.membership.get(agent_id)
        if agent is None:
            raise rounds.UnknownAgentError(f"agent id {agent_id!r} is not registered: join first")
        if self.s.membership.check_session(agent_id, str(token)) is None:
            raise rounds.UnauthenticatedError("missing or wrong session token for this agent")
        return agent

    def _session(self, context: grpc.ServicerContext) -> Agent:
        """The agent whose session the call carries, before anything blocks (a stream's header may never come)."""
        token = dict(context.invocation_metadata()).get(grpc_options.SESSION_METADATA, "")
        agent = self.s.membership.by_session(str(token))
        if agent is None:
            raise rounds.UnauthenticatedError("an update stream needs the session of a joined agent: join first")
        return agent

    @contextmanager
    def _call(self, agent: Agent) -> Iterator[None]:
        """Count a call against its agent's limit (Limits.calls_per_agent): past it, refuse rather than wait."""
        with self.s.calls.hold(agent.agent_id) as ok:
            if not ok:
                raise rounds.TooManyCallsError(f"this agent has {self.s.calls.limit} calls open already")
            yield

    def Join(self, request: pb.JoinRequest | Oversize, context: grpc.ServicerContext) -> pb.JoinReply:  # noqa: N802
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            if isinstance(request, Oversize):
                raise rounds.TooLargeError(f"a Join of {request.size} bytes")
            if not self.s.joins.allow(address_host(context.peer())):
                raise rounds.RateLimitedError(f"more than {self.s.limits.joins_per_second:g} Joins a second from "
                                              "this address: try again shortly")
            name, cores, device = request.agent_name, list(request.cores), request.device or "cpu"
            problem = join_problem(name, cores, device, request.workers, request.data_fingerprint)
            if problem is not None:  # every field becomes a label, a log line or a scrape target
                raise rounds.MalformedError(problem)
            if not (math.isfinite(request.throughput) and 0 <= request.throughput <= MAX_THROUGHPUT):
                raise rounds.MalformedError(f"throughput must be a number in 0..{MAX_THROUGHPUT:g} samples/s")
            address, problem = metrics_address(request.metrics_address, context.peer(),
                                               self.s.limits.any_metrics_host)
            if problem is not None:
                raise rounds.MalformedError(problem)
            if request.data_fingerprint and request.data_fingerprint != self.s.spec.data_fingerprint:
                raise rounds.DataMismatchError(
                    f"this agent's data has fingerprint {request.data_fingerprint[:12]}, the run's is "
                    f"{self.s.spec.data_fingerprint[:12] or '(none)'}: different files, version or preprocessing")
            self.s.sweep()
            try:
                agent, replaced = self.s.membership.admit(
                    name, cores=tuple(cores), device=device, workers=max(1, request.workers),
                    throughput=request.throughput, metrics_address=address,
                    local=is_loopback(address_host(context.peer())))
            except FullError as err:
                raise rounds.TooManyAgentsError(str(err)) from err
            if replaced is not None:
                self.s.engine.forget(replaced.agent_id)
            if name in self.s.known:
                self.s.engine.vouch(agent.agent_id)
            log.info("agent %s joined (%s, cores %s)", name, agent.device, format_cores(sorted(agent.cores)))
            return pb.JoinReply(agent_id=agent.agent_id, session_token=agent.session_token,
                                spec=self.s.spec.to_proto(), paced_uploads=True)
        raise AssertionError("unreachable")  # pragma: no cover - abort raised

    def GetRound(self, request: pb.RoundRequest | Oversize,  # noqa: N802
                 context: grpc.ServicerContext) -> Iterator[pb.RoundMessage | Outgoing]:
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            if isinstance(request, Oversize):
                raise rounds.TooLargeError(f"a round request of {request.size} bytes")
            agent = self._agent(request.agent_id, context)
            node[0] = agent.name
            call = self._call(agent)
            call.__enter__()
        try:
            yield from self._round(agent, request, context)
        finally:
            call.__exit__(None, None, None)

    def _round(self, agent: Agent, request: pb.RoundRequest,
               context: grpc.ServicerContext) -> Iterator[pb.RoundMessage | Outgoing]:
        answered = threading.Event()
        gone = threading.Event()

        def ended() -> None:  # the call ended: unanswered, its caller went away (a ghost, or an agent leaving)
            if not answered.is_set():
                gone.set()
                agent.ready = False  # not in the next rounds until it asks again
                self.s.engine.wake()

        context.add_callback(ended)
        agent.polled = True
        remaining = context.time_remaining()
        hold = self.s.long_poll if remaining is None else max(0.0, min(self.s.long_poll, remaining - 5.0))
        engine = self.s.engine
        measured = engine.measured(agent.agent_id)
        with self.s.polls.hold(measured) as may_wait:
            # No long-poll slot: only work that is there now, else WAIT at once (poll_again_ms). Such a newcomer
            # sits out the rounds until it holds a poll (a ghost that never asks again is in none of them), unless
            # the run needs it to start or go on: before anyone is measured, or while fewer than --min-agents are
            # ready (it comes back within poll_again, well inside the fetch grace).
            agent.ready = (may_wait or measured or not engine.measured_any()
                           or self.s.membership.ready_count() < self.s.min_agents)
            work = engine.get_work(agent.agent_id, request.after_round, hold if may_wait else 0.0, gone=gone.is_set)
        if work.status != "WORK":
            status = {"FINISHED": pb.FINISHED, "FAILED": pb.FAILED}.get(work.status, pb.WAIT)
            header = pb.RoundHeader(status=status, round=work.round, detail=work.detail)
            if status == pb.WAIT and not may_wait:
                header.poll_again_ms = round(self.s.limits.poll_again_seconds * 1000)
                self.s.metrics.polls_deferred.inc()
            answered.set()
            yield pb.RoundMessage(header=header)
            return
        answered.set()
        assert work.assignment is not None and work.state is not None
        header = work_header(work.assignment, work.deadline)
        same_host = request.shared_memory and is_loopback(address_host(context.peer()))
        yield from self.s.transfer.round_messages(header, work.state, agent.agent_id, same_host,
                                                  sent=self.s.metrics.bytes_out.labels(agent.name).inc)

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdateMessage | Oversize],  # noqa: N802
                     context: grpc.ServicerContext) -> pb.UpdateAck:
        node = [UNKNOWN_NODE]
        lim = self.s.limits
        with self._refusals(context, node):
            # Who it is, whether it may hold a thread at all, before anything blocks: only a participant whose
            # update the open round still lacks, once at a time, and its header must come within the deadline.
            agent = self._session(context)
            node[0] = agent.name
            with self._call(agent):
                self.s.engine.awaiting(agent.agent_id)
                stream = Stream(context, self.s.watchdog, lim.first_message_seconds,
                                 f"no update header within {lim.first_message_seconds:g} s")
                try:
                    try:
                        first = next(request_iterator, None)
                    except grpc.RpcError:  # the call ended while it was read: by the watchdog, or by the client
                        stream.check()
                        raise
                    stream.timer.cancel()  # the parts are timed once the update holds an upload slot
                    stream.check()
                    if isinstance(first, Oversize):
                        raise rounds.TooLargeError(f"a message of {first.size} bytes")
                    if first is None or not first.HasField("header"):
                        raise rounds.MalformedError("an update stream starts with its header")
                    h = first.header
                    agent = self._agent(h.agent_id, context)  # the header names the session's own agent
                    node[0] = agent.name
                    return self._take_update(agent, h, request_iterator, context, stream)
                finally:
                    stream.timer.close()  # and lets go of the context: the timer's callback holds it
        raise AssertionError("unreachable")  # pragma: no cover

    def SubmitFile(self, request: pb.UpdateHeader | Oversize, context: grpc.ServicerContext,  # noqa: N802
                   ) -> pb.UpdateAck:
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            if isinstance(request, Oversize):
                raise rounds.TooLargeError(f"an update header of {request.size} bytes")
            if not request.layout:
                raise rounds.MalformedError("SubmitFile takes the layout of the update file the round named")
            agent = self._agent(request.agent_id, context)
            node[0] = agent.name
            with self._call(agent):
                return self._take_update(agent, request, iter(()), context, None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_update(self, agent: Agent, h: pb.UpdateHeader, rest: Iterator[pb.UpdateMessage | Oversize],
                     context: grpc.ServicerContext, stream: Stream | None) -> pb.UpdateAck:
        """Check, read and aggregate one update of `agent` (checked against `h` and the session by the caller)."""
        self.s.engine.precheck(agent.agent_id, h.round, h.num_samples)
        with self.s.upload_calls.hold(agent.agent_id) as ok:
            if not ok:
                raise rounds.TooManyCallsError("an update from this agent is being taken already")
            return self._take_slot_and_update(agent, h, rest, context, stream)

    def _take_slot_and_update(self, agent: Agent, h: pb.UpdateHeader, rest: Iterator[pb.UpdateMessage | Oversize],
                              context: grpc.ServicerContext, stream: Stream | None) -> pb.UpdateAck:
        with self.s.transfer.upload(h.round, stream, context.is_active, context.time_remaining()):
            if not h.layout:  # a paced agent waits for this before it sends its parts
                context.send_initial_metadata(())
            parts = iter(()) if stream is None else timed_parts(rest, stream, self.s.limits.part_gap_seconds)
            with self.s.transfer.receive(agent.agent_id, h, UpdateSource(parts, h.layout), stream) as update:
                stats = stats_of(h.stats, samples=h.num_samples, received_bytes=float(update.received))
                self.s.engine.submit(agent.agent_id, h.round, h.num_samples, update.tensors, stats,
                                     checked_finite=update.checked_finite)
        if math.isfinite(stats.samples_per_second) and 0 < stats.samples_per_second <= MAX_THROUGHPUT:
            agent.throughput = stats.samples_per_second
        self.s.known.add(agent.name)
        self.s.metrics.accepted_update(agent.name, stats)
        return pb.UpdateAck(detail=f"round {h.round}")

    def Leave(self, request: pb.LeaveRequest | Oversize, context: grpc.ServicerContext) -> pb.LeaveReply:  # noqa: N802
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            if isinstance(request, Oversize):
                raise rounds.TooLargeError(f"a Leave of {request.size} bytes")
            agent = self._agent(request.agent_id, context)
            self.s.membership.remove(agent.agent_id)
            self.s.engine.forget(agent.agent_id)
            log.info("agent %s left", agent.name)
        return pb.LeaveReply()
