"""The agent's gRPC client: Join, long-poll GetRound, streamed SubmitUpdate, Leave; deadlines on every call."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch

from edgetrain import grpc_options, serde
from edgetrain.errors import WireError
from edgetrain.grpc_options import address_host, is_loopback
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.samehost import READ, WRITE, open_shared

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


@dataclass
class Round:
    header: pb.RoundHeader
    state: dict[str, torch.Tensor] | None
    download_seconds: float
    bytes_in: int


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
        # Offer the same-host file path only over loopback; dropped for good after the first file that fails.
        self.shared_memory = is_loopback(address_host(address))

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

    def get_round(self, after_round: int, expected: dict[str, serde.TensorSpec], *,
                  read_file: bool = True) -> Round:
        """Long-poll for the next round; decodes the weights against `expected`.

        With `read_file` False, weights offered as a same-host file are left to the caller (`state` is None and
        the header names the file); streamed weights are decoded either way.
        """
        self._end_round_stream()
        t0 = time.perf_counter()
        stream = self._stub.GetRound(
            pb.RoundRequest(agent_id=self.agent_id, after_round=after_round, shared_memory=self.shared_memory),
            timeout=LONG_POLL_S + GET_ROUND_SLACK_S + transfer_seconds(serde.nbytes(expected)),
            metadata=self._metadata(),
        )
        self._inflight = stream
        header: pb.RoundHeader | None = None
        asm = serde.Assembler(expected)
        first_part_at = 0.0
        for msg in stream:
            if msg.HasField("header"):
                header = msg.header
                first_part_at = time.perf_counter()
                if header.weights_file:
                    # The header is the whole answer: act on it now, and take the call's end later (waiting
                    # for the server to close the stream cost the later of two local agents ~3 ms per round).
                    self._round_stream = stream
                    break
            else:
                asm.add(msg.part)
        if header is None:
            raise WireError("the coordinator's round stream had no header")
        if header.status != pb.WORK:
            return Round(header, None, time.perf_counter() - t0, 0)
        if header.weights_file and not read_file:
            return Round(header, None, time.perf_counter() - first_part_at, 0)
        if header.weights_file:
            try:
                with open_shared(header.weights_file, READ) as f:
                    state, nbytes = serde.decode_file(f, header.weights_layout, expected)
            except OSError as err:  # another host's /dev/shm (a tunnel, a container), or no access: stream
                log.warning("cannot read the weights file (%s); streaming from now on", err)
                self.shared_memory = False
                return self.get_round(after_round, expected)
            return Round(header, state, time.perf_counter() - first_part_at, nbytes)
        state = asm.finish()
        return Round(header, state, time.perf_counter() - first_part_at, asm.received_bytes)

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

    def submit(self, round_: int, num_samples: int, stats: pb.NodeStats, state: dict[str, torch.Tensor],
               wire_dtype: str = "float32", delta: bool = False, update_file: str = "",
               written: tuple[Sequence[pb.TensorPart], int] | None = None,
               round_deadline: float = 0.0) -> tuple[pb.UpdateAck, float, int]:
        """Send one update (weights, or a delta against the round's weights); returns (ack, seconds, bytes).

        Into `update_file` when the coordinator named one (same host), else streamed; `written` (layout, size):
        the update is in `update_file` already (the worker wrote it), only the header goes. `round_deadline`: the
        round header's `deadline_unix` (the coordinator's clock: it can only lengthen the wait, never cut it).
        """
        self._end_round_stream()
        t0 = time.perf_counter()
        wait = max(SUBMIT_DEADLINE_S, round_deadline - time.time())  # for a slot, before any byte moves
        header = pb.UpdateHeader(agent_id=self.agent_id, round=round_, num_samples=num_samples, stats=stats,
                                 delta=delta)
        if written is None and update_file and self.shared_memory:
            try:
                with open_shared(update_file, WRITE) as f:
                    written = (serde.write_raw(state, f, wire_dtype=wire_dtype), f.tell())
            except OSError as err:
                log.warning("cannot write the update file (%s); streaming from now on", err)
                self.shared_memory = False
        if written is not None:
            header.layout.extend(written[0])
            ack: pb.UpdateAck = self._stub.SubmitFile(header, timeout=wait, metadata=self._metadata())
            return ack, time.perf_counter() - t0, written[1]
        sent = 0
        call: list[grpc.Future] = []  # the call, once started (the messages are sent from gRPC's own thread)
        started = threading.Event()

        def messages() -> Iterator[pb.UpdateMessage]:
            nonlocal sent
            yield pb.UpdateMessage(header=header)
            if self.paced_uploads:  # the parts go once the coordinator has room for them (or the call ended)
                started.wait()
                call[0].initial_metadata()
            for part, size in serde.encode_sized(state, wire_dtype=wire_dtype):
                sent += size
                yield pb.UpdateMessage(part=part)

        deadline = wait + transfer_seconds(serde.nbytes(serde.spec_of(state)))
        future = self._stub.SubmitUpdate.future(messages(), timeout=deadline, metadata=self._metadata())
        call.append(future)
        started.set()
        ack = future.result()
        return ack, time.perf_counter() - t0, sent

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
