"""Thin gRPC servicer: decode, call the round engine, encode; refusals mapped to status codes in one place."""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc
import torch

from coordinator import rounds
from coordinator.config import UPLOAD_SLOTS
from coordinator.membership import Agent, Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.shm import SharedFiles
from edgetrain import grpc_options, serde
from edgetrain.compression import apply_delta
from edgetrain.errors import ConfigError, NonFiniteError, WireError
from edgetrain.grpc_options import address_host, is_loopback
from edgetrain.memory import in_memory_fs
from edgetrain.metric_names import UNKNOWN_NODE, agent_name_problem
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.proto import edgetrain_pb2_grpc as pb_grpc
from edgetrain.samehost import SHM_ROOT
from edgetrain.spec import RunSpec

log = logging.getLogger("edgetrain.coordinator")

_STATUS = {code.name: code for code in grpc.StatusCode}
MAX_THROUGHPUT = 1e9  # samples/s: far above any real node, and small enough that sums of them stay finite
SEND_WAIT = 0.5  # seconds a weight part waits for a send slot before it goes anyway


@dataclass
class ServiceState:
    """What the servicer needs: the engine, who is in, the spec, the metrics and a lock for uploads."""

    engine: rounds.RoundEngine
    membership: Membership
    spec: RunSpec
    metrics: CoordinatorMetrics
    long_poll: float = 20.0
    # Uploads taken at once (the others wait, and send nothing until told: paced uploads); each holds one update
    # in a staging file (streamed) or a model-sized buffer (same-host file), so coordinator memory stays O(model)
    # however many agents upload together.
    upload_slots: int = UPLOAD_SLOTS
    # Weight parts being handed to gRPC at once, over all agents' downloads: each costs ~2 part-sized copies
    # (serialised message, transport buffer) until its send completes. Unbounded, 16 agents starting a round
    # together held ~30 MB of them in the coordinator (bench/core_perf.py, memory part).
    send_slots: int = 4
    send_wait: float | None = SEND_WAIT  # how long a part waits for a send slot before it goes anyway; None: no limit
    shm_root: Path | None = SHM_ROOT  # where to make the same-host files' directory; None = always stream
    staging_dir: Path | None = None  # where streamed updates wait until whole (serde.Stage); None: the temp dir

    def __post_init__(self) -> None:
        self.uploads = threading.BoundedSemaphore(self.upload_slots)
        self.sends = threading.BoundedSemaphore(self.send_slots)
        # at most upload_slots of each at once: reused upload after upload
        self._arenas = _Pool(lambda: serde.Arena(serde.spec_of(self.engine.global_state)))
        self._stages = _Pool(lambda: serde.Stage(self.staging_dir), lambda stage: stage.close())
        self._files_lock = threading.Lock()
        self._files: SharedFiles | None = None
        self._files_tried = False

    def shared_files(self, create: bool = True) -> SharedFiles | None:
        """The same-host files' directory, made when an agent first offers shared memory (None: unavailable)."""
        with self._files_lock:
            if create and not self._files_tried and self.shm_root is not None:
                self._files_tried = True
                self._files = SharedFiles.create(self.shm_root)
                if self._files is None:
                    log.warning("no usable %s: local agents get their weights streamed", self.shm_root)
            return self._files

    def close(self) -> None:
        """Remove the same-host files' directory and close the staging files (also at interpreter exit)."""
        with self._files_lock:
            self._files_tried = True  # none is made after this
            files, self._files = self._files, None
        if files is not None:
            files.close()
        self._stages.close()

    @contextmanager
    def arena(self) -> Iterator[serde.Arena | None]:
        """A reusable update-sized buffer for an upload slot's holder, or None where updates must keep their memory.

        The sample-weighted mean copies each update into its running sum, so the buffer is free again once
        `submit` returns; the robust aggregators keep every update, which then needs its own memory.
        """
        if self.engine.aggregator != "mean":
            yield None
            return
        with self._arenas.take() as arena:
            yield arena

    @contextmanager
    def stage(self) -> Iterator[serde.Stage]:
        """A reusable staging file for a streamed update (`arena`'s terms), emptied again when the block ends."""
        with ExitStack() as stack:
            try:
                stage = stack.enter_context(self._stages.take())
            except OSError as err:
                log.warning("cannot make a staging file in %s: %s", self.staging_dir or tempfile.gettempdir(), err)
                raise rounds.StagingError(f"the coordinator could not make a staging file ({err})") from err
            try:
                yield stage.begin()
            finally:
                try:
                    stage.end()
                except OSError as err:  # whatever the block did stands; this file is not used again
                    log.warning("cannot empty a staging file: %s", err)
                    self._stages.drop(stage)

    def prepare_staging(self) -> None:
        """Make the first staging file now: a directory that cannot take one stops the start, not every upload."""
        where = str(self.staging_dir or tempfile.gettempdir())
        try:
            with self._stages.take():
                pass
        except OSError as err:
            raise ConfigError(f"cannot make staging files in {where}: {err.strerror or err}") from err
        if in_memory_fs(where):
            log.warning("staging directory %s is in memory (tmpfs): each upload being taken holds ~1 model of "
                        "RAM there; --staging-dir on a disk keeps it out", where)

    def staged_bytes(self) -> int:
        """Bytes of streamed updates in the staging files now (page cache or disk: outside this process's RSS)."""
        return sum(stage.staged_bytes() for stage in self._stages.made())

    def weight_slices(self, state: Mapping[str, torch.Tensor]) -> Iterator[serde.Slice]:
        """What a download of the round's weights sends, part by part (views of `state`: nothing copied).

        Each stream makes a part's message only once it holds a send slot: a copy of the encoded weights kept
        for every stream cost the coordinator one model's size (bench/core_perf.py).
        """
        return serde.slices(state)


_T = TypeVar("_T")


class _Pool(Generic[_T]):
    """Objects reused by whoever holds an upload slot: one is made when none is free and kept for the next."""

    def __init__(self, make: Callable[[], _T], discard: Callable[[_T], object] = lambda _: None) -> None:
        self._make, self._discard = make, discard
        self._lock = threading.Lock()
        self._free: list[_T] = []
        self._made: list[_T] = []
        self._dropped: list[_T] = []
        self._closed = False

    @contextmanager
    def take(self) -> Iterator[_T]:
        with self._lock:
            item = self._free.pop() if self._free else None
        if item is None:
            item = self._make()
            with self._lock:
                self._made.append(item)
        try:
            yield item
        finally:
            with self._lock:
                keep = not self._closed and all(d is not item for d in self._dropped)
                if keep:
                    self._free.append(item)
                else:  # given back after close, or dropped: nobody takes it again
                    self._made = [m for m in self._made if m is not item]
                    self._dropped = [d for d in self._dropped if d is not item]
            if not keep:
                self._discard(item)

    def drop(self, item: _T) -> None:
        """Discard `item` (taken now) when it is given back instead of keeping it."""
        with self._lock:
            self._dropped.append(item)

    def made(self) -> list[_T]:
        with self._lock:
            return list(self._made)

    def close(self) -> None:
        """Discard the free ones now, the others as they come back."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            self._made = [m for m in self._made if all(m is not f for f in free)]
        for item in free:
            self._discard(item)


class Outgoing:
    """A serialised RoundMessage that gives its bytes up once, to gRPC (`serialize_round`)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def take(self) -> bytes:
        data, self._data = self._data, b""
        return data


def serialize_round(message: pb.RoundMessage | Outgoing) -> bytes:
    """GetRound's response serializer: weight parts come serialised already, and keep nothing once taken."""
    return message.take() if isinstance(message, Outgoing) else message.SerializeToString()


def _read_parts(asm: serde.Assembler, rest: Iterator[pb.UpdateMessage]) -> None:
    for msg in rest:
        if not msg.HasField("part"):
            raise rounds.MalformedError("a second header in one update stream")
        data = msg.part.data  # each read of a bytes field makes a new copy: read it once
        if len(data) > serde.MAX_PART_BYTES:
            raise rounds.TooLargeError(f"a part of {len(data)} bytes; at most {serde.MAX_PART_BYTES}")
        asm.add(msg.part, data)
        del msg, data  # not kept while the next part is awaited


_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def advertised_address(metrics_address: str, peer: str) -> str:
    """An agent bound to a wildcard address is scraped at the address its gRPC calls come from.

    `peer` is gRPC's form: "ipv4:10.0.0.7:51234" or "ipv6:[fd00::7]:51234".
    """
    if not metrics_address or ":" not in metrics_address:
        return metrics_address
    host, _, port = metrics_address.rpartition(":")
    if host not in _WILDCARDS:
        return metrics_address
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{rest.rpartition(':')[0]}:{port}"
    return metrics_address


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
            context.abort(_STATUS[refusal.status], str(refusal))
        except rounds.RefusedError as err:
            self.s.metrics.refused_update(node[0], err.reason)
            context.abort(_STATUS[err.status], str(err))

    def _agent(self, agent_id: str, context: grpc.ServicerContext) -> Agent:
        md = dict(context.invocation_metadata())
        token = md.get(grpc_options.SESSION_METADATA, "")
        agent = self.s.membership.get(agent_id)
        if agent is None:
            raise rounds.UnknownAgentError(f"agent id {agent_id!r} is not registered: join first")
        if self.s.membership.check_session(agent_id, str(token)) is None:
            raise rounds.UnauthenticatedError("missing or wrong session token for this agent")
        return agent

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:  # noqa: N802
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            name = request.agent_name
            problem = agent_name_problem(name)
            if problem is not None:  # it becomes a metric label and goes into logs
                raise rounds.MalformedError(f"agent_name: {problem}")
            if not (math.isfinite(request.throughput) and 0 <= request.throughput <= MAX_THROUGHPUT):
                raise rounds.MalformedError(f"throughput must be a number in 0..{MAX_THROUGHPUT:g} samples/s")
            if not 0 <= request.workers <= max(1, len(request.cores)):
                # workers scale the most samples an update may claim: more than its cores would let one agent
                # outweigh everyone in the average
                raise rounds.MalformedError("workers must be between 1 and the number of cores the agent declares")
            agent, replaced = self.s.membership.admit(
                name,
                cores=tuple(request.cores),
                device=request.device or "cpu",
                workers=max(1, request.workers),
                throughput=request.throughput,
                metrics_address=advertised_address(request.metrics_address, context.peer()),
            )
            self.s.metrics.node_admitted(name)
            if replaced is not None:
                self.s.engine.forget(replaced.agent_id)
            log.info("agent %s joined (%s, cores %s)", name, agent.device, list(agent.cores))
            return pb.JoinReply(agent_id=agent.agent_id, session_token=agent.session_token,
                                spec=self.s.spec.to_proto(), paced_uploads=True)
        raise AssertionError("unreachable")  # pragma: no cover - abort raised

    def GetRound(self, request: pb.RoundRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> Iterator[pb.RoundMessage | Outgoing]:
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            agent = self._agent(request.agent_id, context)
            node[0] = agent.name
        agent.ready = True
        remaining = context.time_remaining()
        hold = self.s.long_poll if remaining is None else max(0.0, min(self.s.long_poll, remaining - 5.0))
        work = self.s.engine.get_work(agent.agent_id, request.after_round, hold)
        if work.status != "WORK":
            status = {"FINISHED": pb.FINISHED, "FAILED": pb.FAILED}.get(work.status, pb.WAIT)
            yield pb.RoundMessage(header=pb.RoundHeader(status=status, round=work.round, detail=work.detail))
            return
        a = work.assignment
        assert a is not None and work.state is not None
        header = pb.RoundHeader(
            status=pb.WORK, round=work.round, rank=a.rank, world=a.world, local_steps=a.local_steps,
            sample_offset=a.sample_offset, deadline_unix=work.deadline, batch_size=a.batch_size)
        # Files only for a caller on this machine: a remote agent can't read them, and needn't learn their paths.
        same_host = request.shared_memory and is_loopback(address_host(context.peer()))
        files = self.s.shared_files() if same_host else None
        if files is not None:
            try:
                path, layout, size = files.weights(work.round, work.state)
            except OSError as err:  # e.g. a full /dev/shm (containers default to 64 MB): stream this round
                log.warning("cannot write the round's weights file (%s): streaming them", err)
            else:
                header.weights_file = path
                header.weights_layout.extend(layout)
                header.update_file = files.update_file(agent.agent_id, work.round)
                yield pb.RoundMessage(header=header)
                self.s.metrics.bytes_out.labels(agent.name).inc(size)
                return
        yield pb.RoundMessage(header=header)
        sent = 0
        for layout, chunk, offset in self.s.weight_slices(work.state):
            # The sync server resumes this generator once gRPC has sent the part (or the call ended). Agents
            # that read slowly must not hold up everyone's download: past send_wait a part goes without a slot.
            # Parts in memory: one per send slot, serialised (gRPC's sync server keeps the last object yielded on
            # each stream until this generator gives the next: an Outgoing, emptied as gRPC took its bytes).
            slot = self.s.sends.acquire(timeout=self.s.send_wait)
            try:
                msg = pb.RoundMessage()
                serde.fill(msg.part, layout, chunk, offset)
                out = Outgoing(msg.SerializeToString())
                del msg
                yield out
                del out
            finally:
                if slot:
                    self.s.sends.release()
            sent += len(chunk)
        self.s.metrics.bytes_out.labels(agent.name).inc(sent)

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdateMessage],  # noqa: N802
                     context: grpc.ServicerContext) -> pb.UpdateAck:
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise rounds.MalformedError("an update stream starts with its header")
            return self._take_update(first.header, request_iterator, context, node)
        raise AssertionError("unreachable")  # pragma: no cover

    def SubmitFile(self, request: pb.UpdateHeader, context: grpc.ServicerContext) -> pb.UpdateAck:  # noqa: N802
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            if not request.layout:
                raise rounds.MalformedError("SubmitFile takes the layout of the update file the round named")
            return self._take_update(request, iter(()), context, node)
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_update(self, h: pb.UpdateHeader, rest: Iterator[pb.UpdateMessage], context: grpc.ServicerContext,
                     node: list[str]) -> pb.UpdateAck:
        """Check, read and aggregate one update (its tensors streamed in `rest`, or in its file)."""
        agent = self._agent(h.agent_id, context)
        node[0] = agent.name
        self.s.engine.precheck(agent.agent_id, h.round, h.num_samples)
        # a slow uploader holds a slot at most until the deadline: it cannot block the others past it
        remaining = context.time_remaining()
        wait = self.s.engine.seconds_left() if remaining is None else min(self.s.engine.seconds_left(), remaining)
        if not self.s.uploads.acquire(timeout=wait):
            raise rounds.LateUpdateError(f"round {h.round} closed for updates while this one waited its turn")
        try:
            # An agent whose call ended while it waited asks for work again, may be handed this round again and
            # rewrites its (reused) update file: this call must not read it then.
            if not context.is_active():
                raise rounds.LateUpdateError(f"the call for round {h.round} ended while it waited its turn")
            if not h.layout:  # a paced agent waits for this before it sends its parts
                context.send_initial_metadata(())
            with self._update(agent.agent_id, h, rest) as (tensors, received, checked):
                stats = rounds.NodeReport(
                    compute_seconds=h.stats.compute_seconds, communication_seconds=h.stats.communication_seconds,
                    loss=h.stats.loss, accuracy=h.stats.accuracy, samples_per_second=h.stats.samples_per_second,
                    bytes=float(received))
                self.s.engine.submit(agent.agent_id, h.round, h.num_samples, tensors, stats, checked_finite=checked)
        finally:
            self.s.uploads.release()
        if math.isfinite(h.stats.samples_per_second) and 0 < h.stats.samples_per_second <= MAX_THROUGHPUT:
            agent.throughput = h.stats.samples_per_second
        self.s.metrics.accepted_update(agent.name, h.num_samples, stats, received)
        return pb.UpdateAck(accepted=True, detail=f"round {h.round}")

    @contextmanager
    def _update(self, agent_id: str, h: pb.UpdateHeader, rest: Iterator[pb.UpdateMessage],
                ) -> Iterator[tuple[Mapping[str, torch.Tensor | serde.Sliced], int, bool]]:
        """The update's tensors, byte count and whether their values were checked, valid within the block.

        From the file named for this agent and round (read into a reused buffer), or from the stream: written to
        a staging file and read back from it a slice at a time, checked whole before any of it is used.
        """
        glob = self.s.engine.global_state
        expected = serde.spec_of(glob)
        if h.layout:
            if next(rest, None) is not None:
                raise rounds.MalformedError("an update in a file has nothing after its header")
            files = self.s.shared_files(create=False)
            if files is None:
                raise rounds.MalformedError("this coordinator names no update files")
            with self.s.arena() as arena:
                tensors, received = files.read_update(agent_id, h.round, h.layout, expected, arena)
                yield self._whole(glob, tensors, received, h.delta)
            return
        # staged: the mean (the robust aggregators keep every update whole), over float32 weights (the sum's dtype)
        if self.s.engine.aggregator != "mean" or any(
                s.dtype != torch.float32 for s in expected.values() if s.dtype.is_floating_point):
            with self.s.arena() as arena:
                asm = serde.Assembler(expected, into=arena)
                _read_parts(asm, rest)
                yield self._whole(glob, asm.finish(), asm.received_bytes, h.delta)
            return
        with self.s.stage() as stage:
            try:
                asm = serde.Assembler(expected, into=stage, check_finite=False)
                _read_parts(asm, rest)
                staged = asm.finish_staged(base=glob if h.delta else None)
            except OSError as err:
                log.warning("cannot stage an update in %s: %s", self.s.staging_dir or tempfile.gettempdir(), err)
                raise rounds.StagingError(f"the coordinator could not stage this update ({err})") from err
            yield staged, asm.received_bytes, False  # the engine reads it back whole to check it, then to add it

    @staticmethod
    def _whole(glob: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor], received: int,
               delta: bool) -> tuple[Mapping[str, torch.Tensor | serde.Sliced], int, bool]:
        # the decoder checked the values; weights rebuilt from a delta are checked again by the engine
        return (apply_delta(glob, tensors), received, False) if delta else (tensors, received, True)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:  # noqa: N802
        node = [UNKNOWN_NODE]
        with self._refusals(context, node):
            agent = self._agent(request.agent_id, context)
            self.s.membership.remove(agent.agent_id)
            self.s.engine.forget(agent.agent_id)
            log.info("agent %s left", agent.name)
        return pb.LeaveReply()
