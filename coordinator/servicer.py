"""Thin gRPC servicer: decode, call the round engine, encode; refusals mapped to status codes in one place."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from edgetrain import grpc_options
from edgetrain.errors import WireError
from edgetrain.grpc_options import address_host, is_loopback
from edgetrain.metric_names import UNKNOWN_NODE
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.records_pb import stats_of, work_header

from . import rounds
from .membership import Agent
from .service import JoinAsk, ServiceState, refusal_of
from .streams import STATUS, Oversize, Stream, timed_parts
from .transfer import Outgoing, UpdateSource

_STATUS = {"FINISHED": pb.FINISHED, "FAILED": pb.FAILED}  # Work.status other than WORK; the rest is WAIT


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    @contextmanager
    def _refusals(self, context: grpc.ServicerContext, node: list[str]) -> Iterator[None]:
        """Turn a refusal into its status code and count it under the caller's node name."""
        try:
            yield
        except WireError as err:
            refusal = refusal_of(err)
            self.s.metrics.refused_update(node[0], refusal.reason)
            context.abort(STATUS[refusal.status], str(refusal))
        except rounds.RefusedError as err:
            self.s.metrics.refused_update(node[0], err.reason)
            context.abort(STATUS[err.status], str(err))

    @staticmethod
    def _token(context: grpc.ServicerContext) -> str:
        """The session token the call carries ("" without one)."""
        return str(dict(context.invocation_metadata()).get(grpc_options.SESSION_METADATA, ""))

    def _agent(self, agent_id: str, context: grpc.ServicerContext) -> Agent:
        return self.s.agent(agent_id, self._token(context))

    def Join(self, request: pb.JoinRequest | Oversize, context: grpc.ServicerContext) -> pb.JoinReply:  # noqa: N802
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            if isinstance(request, Oversize):
                raise rounds.TooLargeError(f"a Join of {request.size} bytes")
            agent = self.s.join(JoinAsk(
                request.agent_name, tuple(request.cores), request.device or "cpu", request.workers,
                request.throughput, request.data_fingerprint, request.metrics_address, context.peer()))
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
            call = self.s.call(agent)
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
                self.s.went_away(agent)

        context.add_callback(ended)
        remaining = context.time_remaining()
        hold = self.s.long_poll if remaining is None else max(0.0, min(self.s.long_poll, remaining - 5.0))
        work, waited = self.s.poll(agent, request.after_round, hold, gone.is_set)
        if work.status != "WORK":
            header = pb.RoundHeader(status=_STATUS.get(work.status, pb.WAIT), round=work.round, detail=work.detail)
            if header.status == pb.WAIT and not waited:  # asked to come back (PollSlots)
                header.poll_again_ms = round(self.s.limits.poll_again_seconds * 1000)
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
            agent = self.s.session(self._token(context))
            node[0] = agent.name
            with self.s.call(agent):
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
            with self.s.call(agent):
                return self._take_update(agent, request, iter(()), context, None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_update(self, agent: Agent, h: pb.UpdateHeader, rest: Iterator[pb.UpdateMessage | Oversize],
                     context: grpc.ServicerContext, stream: Stream | None) -> pb.UpdateAck:
        """Check, read and aggregate one update of `agent` (checked against `h` and the session by the caller)."""
        with (self.s.taking(agent, h.round, h.num_samples),
              self.s.transfer.upload(h.round, stream, context.is_active, context.time_remaining())):
            if not h.layout:  # a paced agent waits for this before it sends its parts
                context.send_initial_metadata(())
            parts = iter(()) if stream is None else timed_parts(rest, stream, self.s.limits.part_gap_seconds)
            with self.s.transfer.receive(agent.agent_id, h, UpdateSource(parts, h.layout), stream) as update:
                stats = stats_of(h.stats, samples=h.num_samples, received_bytes=float(update.received))
                self.s.engine.submit(agent.agent_id, h.round, h.num_samples, update.tensors, stats,
                                     checked_finite=update.checked_finite)
        self.s.accepted(agent, stats)
        return pb.UpdateAck(detail=f"round {h.round}")

    def Leave(self, request: pb.LeaveRequest | Oversize, context: grpc.ServicerContext) -> pb.LeaveReply:  # noqa: N802
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            if isinstance(request, Oversize):
                raise rounds.TooLargeError(f"a Leave of {request.size} bytes")
            self.s.leave(self._agent(request.agent_id, context))
        return pb.LeaveReply()
