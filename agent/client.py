"""The agent's gRPC client: Join, long-poll GetRound, streamed SubmitUpdate, Leave; deadlines on every call."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from edgetrain import grpc_options
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc

JOIN_DEADLINE_S = 15.0
LONG_POLL_S = 20.0  # the server holds GetRound this long before answering WAIT
GET_ROUND_SLACK_S = 60.0  # beyond the long-poll and the weights' transfer time
# Waiting for an upload slot, and slack, beyond the update's transfer time; longer when the round's deadline is
# further off (the coordinator lets an upload wait for a slot until then).
SUBMIT_DEADLINE_S = 300.0
LEAVE_DEADLINE_S = 5.0
# Calls that move tensors get time for their bytes on a link this slow (1 Mbit/s): a fixed deadline cut the
# round's weights off mid-stream on slow edge links (20 MB in 80 s needs 2 Mbit/s), and a call that fails at the
# same byte every time is retried forever.
MIN_LINK_BYTES_PER_S = 125_000


def transfer_seconds(nbytes: int) -> float:
    """The time `nbytes` of tensors take on the slowest link the deadlines allow for."""
    return nbytes / MIN_LINK_BYTES_PER_S


log = logging.getLogger("edgetrain.agent")


@dataclass(frozen=True)
class TLSFiles:
    ca: bytes | None = None  # root certificate(s) to trust; None = the system's
    cert: bytes | None = None  # client certificate, for mutual TLS
    key: bytes | None = None


def backoff_delays(initial: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> Iterator[float]:
    """Exponential backoff with full jitter: 0.5, 1, 2, ... capped, each scaled by U(0.5, 1)."""
    rng = rng or random.Random()
    delay = initial
    while True:
        yield delay * rng.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)


POLL_AGAIN_CAP_S = 60.0


def poll_again_delay(header: pb.RoundHeader, rng: random.Random | None = None) -> float:
    """How long to wait before the next GetRound after `header`: 0, or the coordinator's `poll_again_ms`.

    Scaled by U(0.5, 1.5) so agents told to come back together do not, and capped at a minute.
    """
    if header.status != pb.WAIT or header.poll_again_ms <= 0:
        return 0.0
    return min(POLL_AGAIN_CAP_S, header.poll_again_ms / 1000) * (rng or random).uniform(0.5, 1.5)


class CoordinatorClient:
    """One channel to the coordinator, with the session token once joined."""

    def __init__(self, address: str, *, token: str | None = None, tls: TLSFiles | None = None) -> None:
        if tls is not None:
            creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            self._channel = grpc.secure_channel(address, creds, options=grpc_options.CLIENT)
        else:
            self._channel = grpc.insecure_channel(address, options=grpc_options.CLIENT)
        self._stub = pb_grpc.CoordinatorStub(self._channel)  # type: ignore[no-untyped-call]
        self._token = token
        self.agent_id = ""
        self.session = ""
        self._inflight: grpc.Call | None = None
        self._round_stream: Iterator[pb.RoundMessage] | None = None  # see get_round
        self.paced_uploads = False  # the coordinator says when to send an update's parts (JoinReply)
        self.address = address

    def _metadata(self) -> list[tuple[str, str]]:
        md = []
        if self._token:
            md.append((grpc_options.TOKEN_METADATA, f"Bearer {self._token}"))
        if self.session:
            md.append((grpc_options.SESSION_METADATA, self.session))
        return md

    def join(self, request: pb.JoinRequest, stop: threading.Event | None = None,
             give_up_after: float | None = None) -> pb.JoinReply:
        """Join, retrying with backoff while the coordinator is not (yet) there or asks to wait (too many Joins)."""
        start = time.monotonic()
        for delay in backoff_delays():
            try:
                self.session = ""
                reply: pb.JoinReply = self._stub.Join(request, timeout=JOIN_DEADLINE_S, metadata=self._metadata())
                self.agent_id, self.session = reply.agent_id, reply.session_token
                self.paced_uploads = reply.paced_uploads
                return reply
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
                if give_up_after is not None and time.monotonic() - start + delay > give_up_after:
                    raise
                if stop is not None and stop.wait(delay):
                    raise
                if stop is None:
                    time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def round_stream(self, after_round: int, shared_memory: bool, nbytes: int) -> Iterator[pb.RoundMessage]:
        """Long-poll for the next round: its messages (`agent.route` reads them), with time for `nbytes` of weights.

        `shared_memory`: offer to take the weights as a same-host file.
        """
        self._end_round_stream()
        stream: Iterator[pb.RoundMessage] = self._stub.GetRound(
            pb.RoundRequest(agent_id=self.agent_id, after_round=after_round, shared_memory=shared_memory),
            timeout=LONG_POLL_S + GET_ROUND_SLACK_S + transfer_seconds(nbytes),
            metadata=self._metadata(),
        )
        self._inflight = stream
        return stream

    def keep_round_stream(self, stream: Iterator[pb.RoundMessage]) -> None:
        """The header was the whole answer: take the stream's end later, before the next call."""
        self._round_stream = stream

    def _end_round_stream(self) -> None:
        """Take the end of a round stream left open after its file header (it ended long ago, while training)."""
        stream, self._round_stream = self._round_stream, None
        if stream is None:
            return
        try:
            for _ in stream:
                log.warning("the coordinator sent more after a weights-file header; ignored")
        except grpc.RpcError as err:  # the header was whole; whatever went wrong after it changes nothing
            log.debug("round stream ended with %s", err.code().name)

    def _submit_wait(self, round_deadline: float) -> float:
        """Seconds an update may wait for an upload slot, before any byte moves."""
        return max(SUBMIT_DEADLINE_S, round_deadline - time.time())

    def submit_file(self, header: pb.UpdateHeader, round_deadline: float = 0.0) -> pb.UpdateAck:
        """An update written into the same-host file the round named (`header.layout` says how)."""
        self._end_round_stream()
        ack: pb.UpdateAck = self._stub.SubmitFile(header, timeout=self._submit_wait(round_deadline),
                                                  metadata=self._metadata())
        return ack

    def submit_stream(self, header: pb.UpdateHeader, parts: Iterator[tuple[pb.TensorPart, int]], nbytes: int,
                      round_deadline: float = 0.0) -> tuple[pb.UpdateAck, int]:
        """Stream an update: its header, then its (part, size) pairs; returns (ack, bytes sent).

        Paced (JoinReply.paced_uploads): the parts go once the coordinator has room for them (or the call ended).
        `round_deadline`: the round header's `deadline_unix` (the coordinator's clock: it can only lengthen the
        wait, never cut it).
        """
        self._end_round_stream()
        sent = 0
        call: list[grpc.Future] = []  # the call, once started (the messages are sent from gRPC's own thread)
        started = threading.Event()

        def messages() -> Iterator[pb.UpdateMessage]:
            nonlocal sent
            yield pb.UpdateMessage(header=header)
            if self.paced_uploads:
                started.wait()
                call[0].initial_metadata()
            for part, size in parts:
                sent += size
                yield pb.UpdateMessage(part=part)

        deadline = self._submit_wait(round_deadline) + transfer_seconds(nbytes)
        future = self._stub.SubmitUpdate.future(messages(), timeout=deadline, metadata=self._metadata())
        call.append(future)
        started.set()
        ack: pb.UpdateAck = future.result()
        return ack, sent

    def cancel(self) -> None:
        """Cancel a long-poll in flight (from a signal handler), so the agent can leave at once."""
        call = self._inflight
        if call is not None:
            call.cancel()

    def leave(self) -> None:
        if not self.agent_id:
            return
        try:
            self._stub.Leave(pb.LeaveRequest(agent_id=self.agent_id), timeout=LEAVE_DEADLINE_S,
                             metadata=self._metadata())
        except grpc.RpcError:
            pass  # leaving is a courtesy: the coordinator copes with agents that vanish

    def close(self) -> None:
        self._channel.close()
