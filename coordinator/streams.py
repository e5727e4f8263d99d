"""The gRPC edge of a call: oversized requests, and update streams' deadlines ended from outside their thread."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from edgetrain import grpc_options
from edgetrain.proto import edgetrain_pb2 as pb

from . import rounds
from .admission import Watchdog

STATUS = {code.name: code for code in grpc.StatusCode}  # a refusal's status name -> gRPC's code


class Oversize:
    """What a request deserializer gives for a message over MAX_MESSAGE_BYTES (server.py): refused and counted."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from outside its handler thread (which may be blocked reading it), with a status.

    gRPC's Python API cancels without a status (the client reads CANCELLED); its call object takes one, and the
    client then reads why. tests/integration/test_hostile.py pins the status, so a gRPC that drops this fails
    there, not silently.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - no such call object in this gRPC: end it without the status
        context.cancel()


class Stream:
    """An update stream's deadline: its watchdog timer ends the call when it runs out, with `error`'s status."""

    def __init__(self, context: grpc.ServicerContext, watchdog: Watchdog, seconds: float, why: str) -> None:
        self.why = why
        self.error: type[rounds.RefusedError] = rounds.StreamTimeoutError
        self.timer = watchdog.arm(seconds, lambda: end_call(context, STATUS[self.error.status], self.why))

    def expect(self, seconds: float, why: str) -> None:
        self.why = why
        self.timer.reset(seconds)

    def end_now(self, why: str, error: type[rounds.RefusedError]) -> None:
        self.error = error
        self.expect(0.0, why)

    def check(self) -> None:
        """Raise the refusal the timer ended the call with, if it did (its reads then ended early)."""
        if self.timer.fired:
            raise self.error(self.why)


def timed_parts(rest: Iterator[pb.UpdateMessage | Oversize], stream: Stream, gap: float,
           ) -> Iterator[pb.UpdateMessage]:
    """The stream's messages after its header, each due within `gap` seconds of the one before."""
    stream.expect(gap, f"no update part for {gap:g} s")
    try:
        for msg in rest:
            if isinstance(msg, Oversize):
                raise rounds.TooLargeError(f"a message of {msg.size} bytes; at most {grpc_options.MAX_MESSAGE_BYTES}")
            stream.expect(gap, f"no update part for {gap:g} s")
            yield msg
    except grpc.RpcError:
        stream.check()
        raise
    stream.check()
