"""One round's weights in and its update out, whichever the way: streamed over gRPC, or same-host files.

The runner asks a `Route` for the round (`fetch`) and hands it the update (`send`); the worker reads the weights
file and writes the update file through `read_weights` and `write_update`. Nothing else on the agent's side knows
serde's layouts or how the same-host files are opened:

    runner ── Route.fetch ──▶ (weights decoded here, or the task names the file) ──▶ worker ── read_weights
    runner ◀─ Route.send ◀── (update streamed from here, or the worker's write_update wrote the file)

On the coordinator's host the weights come as a file in /dev/shm the coordinator names in the round's header,
and the update goes back into another file it named (`coordinator/transfer/samehost.py`): a memcpy instead of
5-36 ms of loopback gRPC each way for a 4.8 MB model. A file that cannot be used makes the route stream from
then on (`stream_from_now`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from edgetrain import serde
from edgetrain.errors import WireError
from edgetrain.grpc_options import address_host, is_loopback
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.records import Assignment, NodeStats
from edgetrain.records_pb import assignment_of, stats_message
from edgetrain.samehost import READ, WRITE, open_shared

if TYPE_CHECKING:  # the worker imports this module: no gRPC in its process
    from .client import CoordinatorClient

log = logging.getLogger("edgetrain.agent")


@dataclass
class Round:
    header: pb.RoundHeader
    state: dict[str, torch.Tensor] | None  # None: not WORK, or the worker reads the weights file itself
    download_seconds: float
    bytes_in: int


@dataclass(frozen=True)
class RoundTask:
    """What a worker trains in one round: the coordinator's assignment, and the same-host files it may use."""

    work: Assignment
    weights_file: str = ""  # read the weights from this same-host file instead of the shared tensors
    weights_layout: tuple[Any, ...] = ()  # its serde layout (pb.TensorPart entries without data)
    update_file: str = ""  # write the trained weights into this new file instead of the shared tensors


@dataclass(frozen=True)
class UpdateFile:
    """What a worker wrote into `RoundTask.update_file`: its layout and size, or why it could not."""

    layout: tuple[Any, ...] = ()
    size: int = 0
    error: str = ""


class Route:
    """How this agent's rounds travel: same-host files while the coordinator offers them and they work, else streams.

    Files are offered only over loopback, and dropped for good after the first one that fails.
    """

    def __init__(self, client: CoordinatorClient, same_host: bool | None = None) -> None:
        self.client = client
        self.same_host = is_loopback(address_host(client.address)) if same_host is None else same_host

    def stream_from_now(self, why: str) -> None:
        """A same-host file failed: stream every round from now on."""
        if self.same_host:
            log.warning("%s; streaming from now on", why)
        self.same_host = False

    def fetch(self, after_round: int, expected: dict[str, serde.TensorSpec], *, read_file: bool = True) -> Round:
        """Long-poll for the next round; decodes the weights against `expected`.

        With `read_file` False, weights offered as a same-host file are left to the worker (`state` is None and
        `task` names the file); streamed weights are decoded either way.
        """
        t0 = time.perf_counter()
        stream = self.client.round_stream(after_round, self.same_host, serde.nbytes(expected))
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
                    self.client.keep_round_stream(stream)
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
                self.stream_from_now(f"cannot read the weights file ({err})")
                return self.fetch(after_round, expected)
            return Round(header, state, time.perf_counter() - first_part_at, nbytes)
        state = asm.finish()
        return Round(header, state, time.perf_counter() - first_part_at, asm.received_bytes)

    def task(self, rnd: Round, direct: bool) -> RoundTask:
        """The worker's task for a WORK round; `direct`: a single CPU worker writes the update file itself."""
        h = rnd.header
        in_file = rnd.state is None
        return RoundTask(assignment_of(h),
                         weights_file=h.weights_file if in_file else "",
                         weights_layout=tuple(h.weights_layout) if in_file else (),
                         update_file=h.update_file if direct and self.same_host else "")

    def send(self, round_: int, stats: NodeStats, state: dict[str, torch.Tensor],
             wire_dtype: str = "float32", delta: bool = False, update_file: str = "",
             written: UpdateFile | None = None, round_deadline: float = 0.0) -> tuple[pb.UpdateAck, float, int]:
        """Send one update (weights, or a delta against the round's weights); returns (ack, seconds, bytes).

        `stats.samples` is its weight in the average. Into `update_file` when the coordinator named one (same
        host), else streamed; `written`: the worker wrote the update into `update_file` already, only the header
        goes (its `error`: it could not, and the update is in `state`). `round_deadline`: the round header's
        `deadline_unix` (the coordinator's clock: it can only lengthen the wait, never cut it).
        """
        if written is not None and written.error:
            self.stream_from_now(f"cannot write the update file ({written.error})")
            written = None
        t0 = time.perf_counter()
        header = pb.UpdateHeader(agent_id=self.client.agent_id, round=round_, num_samples=stats.samples,
                                 stats=stats_message(stats), delta=delta)
        layout: tuple[Sequence[pb.TensorPart], int] | None = None
        if written is not None:
            layout = (written.layout, written.size)
        elif update_file and self.same_host:
            try:
                with open_shared(update_file, WRITE) as f:
                    layout = (serde.write_raw(state, f, wire_dtype=wire_dtype), f.tell())
            except OSError as err:
                self.stream_from_now(f"cannot write the update file ({err})")
        if layout is not None:
            header.layout.extend(layout[0])
            ack = self.client.submit_file(header, round_deadline)
            return ack, time.perf_counter() - t0, layout[1]
        ack, sent = self.client.submit_stream(header, serde.encode_sized(state, wire_dtype=wire_dtype),
                                              serde.nbytes(serde.spec_of(state)), round_deadline)
        return ack, time.perf_counter() - t0, sent


def read_weights(task: RoundTask, state: dict[str, torch.Tensor]) -> None:
    """Load the round's weights file into `state` (a model's own tensors), checked as `Route.fetch` checks them.

    Raises OSError or WireError when the file cannot be used (the agent then asks again, streamed).
    """
    with open_shared(task.weights_file, READ) as f:
        serde.decode_file(f, task.weights_layout, serde.spec_of(state), into=serde.into_tensors(state))


def write_update(task: RoundTask, state: dict[str, torch.Tensor]) -> UpdateFile:
    """Write `state` into the round's update file; what went in, or why nothing could."""
    try:
        with open_shared(task.update_file, WRITE) as f:
            layout = serde.write_raw(state, f)
            return UpdateFile(tuple(layout), f.tell())
    except OSError as err:
        return UpdateFile(error=str(err))
