"""Thin gRPC servicer: decode, call the round engine, encode; refusals mapped to status codes in one place."""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import grpc
import torch

from coordinator import rounds
from coordinator.admission import CallCounts, JoinRate, Limits, PollSlots, Watchdog, join_problem, metrics_address
from coordinator.config import UPLOAD_SLOTS
from coordinator.membership import Agent, FullError, Membership
from coordinator.metrics import CoordinatorMetrics
from coordinator.shm import SharedFiles
from edgetrain import grpc_options, serde
from edgetrain import metric_names as m
from edgetrain.compression import apply_delta
from edgetrain.cores import format_cores
from edgetrain.errors import ConfigError, NonFiniteError, WireError
from edgetrain.grpc_options import address_host, is_loopback
from edgetrain.memory import in_memory_fs
from edgetrain.metric_names import UNKNOWN_NODE
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
    limits: Limits = field(default_factory=Limits)  # what one client may hold (coordinator/admission.py)

    def __post_init__(self) -> None:
        self.uploads = threading.BoundedSemaphore(self.upload_slots)
        self.sends = threading.BoundedSemaphore(self.send_slots)
        # at most upload_slots of each at once: reused upload after upload
        self._arenas = _Pool(lambda: serde.Arena(serde.spec_of(self.engine.global_state)))
        self._stages = _Pool(lambda: serde.Stage(self.staging_dir), lambda stage: stage.close())
        self._files_lock = threading.Lock()
        self._files: SharedFiles | None = None
        self._files_tried = False
        self.calls = CallCounts(self.limits.calls_per_agent)
        self.upload_calls = CallCounts(1)  # one upload per agent at a time: two would hold two upload slots
        self.joins = JoinRate(self.limits.joins_per_second, self.limits.join_burst)
        self.polls = PollSlots(self.limits.held_polls, self.limits.newcomer_polls)
        self.watchdog = Watchdog()
        self._reading_lock = threading.Lock()
        self._reading: dict[int, tuple[int, _Stream]] = {}  # update streams reading parts: id -> (round, stream)
        self.engine.on_close.append(self._round_closed)
        self._swept_at = 0.0

    def _round_closed(self, round_: int) -> None:
        """End the update streams still reading parts for a round that closed: they hold slots for nothing."""
        with self._reading_lock:
            ending = [stream for r, stream in self._reading.values() if r == round_]
        for stream in ending:
            stream.end_now(f"round {round_} closed while this update was still arriving", rounds.StaleRoundError)

    def reading(self, round_: int, stream: _Stream | None) -> None:
        """`stream` waits for a slot or reads parts for `round_`: its round's close ends it."""
        if stream is not None:
            with self._reading_lock:
                self._reading[id(stream)] = (round_, stream)

    def read(self, stream: _Stream | None) -> None:
        """`stream` is read whole (or failed): a close no longer ends it (it may be being added)."""
        if stream is not None:
            with self._reading_lock:
                self._reading.pop(id(stream), None)

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
        self.watchdog.close()
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


class _Stream:
    """An update stream's deadline: its watchdog timer ends the call when it runs out, with `error`'s status."""

    def __init__(self, context: grpc.ServicerContext, state: ServiceState, seconds: float, why: str) -> None:
        self.why = why
        self.error: type[rounds.RefusedError] = rounds.StreamTimeoutError
        self.timer = state.watchdog.arm(seconds, lambda: end_call(context, _STATUS[self.error.status], self.why))

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


def _parts(rest: Iterator[pb.UpdateMessage | Oversize], stream: _Stream, gap: float,
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


def _read_parts(asm: serde.Assembler, rest: Iterator[pb.UpdateMessage]) -> None:
    for msg in rest:
        if not msg.HasField("part"):
            raise rounds.MalformedError("a second header in one update stream")
        data = msg.part.data  # each read of a bytes field makes a new copy: read it once
        if len(data) > serde.MAX_PART_BYTES:
            raise rounds.TooLargeError(f"a part of {len(data)} bytes; at most {serde.MAX_PART_BYTES}")
        asm.add(msg.part, data)
        del msg, data  # not kept while the next part is awaited


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
            self.s.sweep()
            try:
                agent, replaced = self.s.membership.admit(
                    name, cores=tuple(cores), device=device, workers=max(1, request.workers),
                    throughput=request.throughput, metrics_address=address)
            except FullError as err:
                raise rounds.TooManyAgentsError(str(err)) from err
            self.s.metrics.node_admitted(name)
            if replaced is not None:
                self.s.engine.forget(replaced.agent_id)
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
        agent.ready = agent.polled = True
        remaining = context.time_remaining()
        hold = self.s.long_poll if remaining is None else max(0.0, min(self.s.long_poll, remaining - 5.0))
        with self.s.polls.hold(self.s.engine.measured(agent.agent_id)) as may_wait:
            # No long-poll slot: only work that is there now, else WAIT at once, and a newcomer sits out the
            # rounds until it holds one (a ghost that never polls again is in none of them).
            work = self.s.engine.get_work(agent.agent_id, request.after_round, hold if may_wait else 0.0,
                                          gone=gone.is_set)
        if work.status != "WORK":
            status = {"FINISHED": pb.FINISHED, "FAILED": pb.FAILED}.get(work.status, pb.WAIT)
            header = pb.RoundHeader(status=status, round=work.round, detail=work.detail)
            if status == pb.WAIT and not may_wait:
                header.poll_again_ms = round(self.s.limits.poll_again_seconds * 1000)
                agent.ready = agent.ready and self.s.engine.measured(agent.agent_id)
                self.s.metrics.refused_update(agent.name, m.POLLS_FULL)
            answered.set()
            yield pb.RoundMessage(header=header)
            return
        answered.set()
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
                stream = _Stream(context, self.s, lim.first_message_seconds,
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
                     context: grpc.ServicerContext, stream: _Stream | None) -> pb.UpdateAck:
        """Check, read and aggregate one update of `agent` (checked against `h` and the session by the caller)."""
        self.s.engine.precheck(agent.agent_id, h.round, h.num_samples)
        with self.s.upload_calls.hold(agent.agent_id) as ok:
            if not ok:
                raise rounds.TooManyCallsError("an update from this agent is being taken already")
            return self._take_slot_and_update(agent, h, rest, context, stream)

    def _take_slot_and_update(self, agent: Agent, h: pb.UpdateHeader, rest: Iterator[pb.UpdateMessage | Oversize],
                              context: grpc.ServicerContext, stream: _Stream | None) -> pb.UpdateAck:
        self.s.reading(h.round, stream)  # from here the round's close ends the stream
        try:
            if not self._upload_slot(h.round, context, stream):
                raise rounds.LateUpdateError(f"round {h.round} closed for updates while this one waited its turn")
            try:
                # An agent whose call ended while it waited asks for work again, may be handed this round again and
                # rewrites its (reused) update file: this call must not read it then.
                if not context.is_active():
                    raise rounds.LateUpdateError(f"the call for round {h.round} ended while it waited its turn")
                if not h.layout:  # a paced agent waits for this before it sends its parts
                    context.send_initial_metadata(())
                parts = iter(()) if stream is None else _parts(rest, stream, self.s.limits.part_gap_seconds)
                with self._update(agent.agent_id, h, parts) as (tensors, received, checked):
                    self.s.read(stream)
                    stats = rounds.NodeReport(
                        compute_seconds=h.stats.compute_seconds, communication_seconds=h.stats.communication_seconds,
                        loss=h.stats.loss, accuracy=h.stats.accuracy, samples_per_second=h.stats.samples_per_second,
                        bytes=float(received))
                    self.s.engine.submit(agent.agent_id, h.round, h.num_samples, tensors, stats,
                                         checked_finite=checked)
            finally:
                self.s.uploads.release()
        finally:
            self.s.read(stream)
        if math.isfinite(h.stats.samples_per_second) and 0 < h.stats.samples_per_second <= MAX_THROUGHPUT:
            agent.throughput = h.stats.samples_per_second
        self.s.metrics.accepted_update(agent.name, h.num_samples, stats, received)
        return pb.UpdateAck(accepted=True, detail=f"round {h.round}")

    def _upload_slot(self, round_: int, context: grpc.ServicerContext, stream: _Stream | None) -> bool:
        """Wait for an upload slot while the round is open (at most until its deadline) and the call lives."""
        remaining = context.time_remaining()
        end = time.monotonic() + (self.s.engine.seconds_left() if remaining is None
                                  else min(self.s.engine.seconds_left(), remaining))
        while True:
            if self.s.uploads.acquire(timeout=max(0.0, min(0.5, end - time.monotonic()))):
                return True
            if stream is not None:
                stream.check()  # the round closed (or the stream's deadline passed) while it waited
            if time.monotonic() >= end or not context.is_active():
                return False

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
