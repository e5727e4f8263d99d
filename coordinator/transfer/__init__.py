"""A round's weights out and its updates in: send and upload slots, staging, same-host files.

The servicer hands this package what came over gRPC and gets back what to send; the round engine gets whole,
checked updates from it. Everything between the two is here:

- out: `Transfer.round_messages` yields a WORK header and either the weights' parts (each made only once it
  holds a send slot) or, for an agent on this host, nothing more: the header names the round's weights file
  and the agent's update file (`samehost.SharedFiles`).
- in: `Transfer.upload` holds one of `upload_slots` for an update; `Transfer.receive` reads its bytes from where
  `UpdateSource` says (the stream's parts, or the update file named for the agent) into a reused buffer
  (`staging.Arena`) or a reused staging file (`staging.Stage`), checked whole by serde before the engine adds it.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from edgetrain import aggregation, serde
from edgetrain.compression import apply_delta
from edgetrain.errors import ConfigError
from edgetrain.memory import in_memory_fs
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.samehost import SHM_ROOT

from .. import rounds
from ..config import UPLOAD_SLOTS
from .samehost import SharedFiles
from .staging import Arena, Pool, Stage, finish_staged

log = logging.getLogger("edgetrain.coordinator")

SEND_WAIT = 0.5  # seconds a weight part waits for a send slot before it goes anyway
# Weight parts being handed to gRPC at once, over all agents' downloads: each costs ~2 part-sized copies
# (serialised message, transport buffer) until its send completes. Unbounded, 16 agents starting a round
# together held ~30 MB of them in the coordinator (bench/core_perf.py, memory part).
SEND_SLOTS = 4


@dataclass(frozen=True)
class UpdateSource:
    """Where an update's bytes come from: the stream's parts after its header, or a same-host file.

    With `layout` given, the update is in the file the round named for its agent, cut by `layout`, and the
    stream must hold nothing after its header.
    """

    parts: Iterator[pb.UpdateMessage]
    layout: Sequence[pb.TensorPart] = ()

    @property
    def streamed(self) -> bool:
        return not self.layout


@dataclass(frozen=True)
class Update:
    """An update's tensors (valid within `Transfer.receive`'s block), its bytes, and whether its values were checked.

    The engine checks unchecked ones whole before it adds any of them.
    """

    tensors: Mapping[str, torch.Tensor | serde.Sliced]
    received: int
    checked_finite: bool


class Reading(Protocol):
    """An update stream that can be ended from outside (its round closed while it waited or read)."""

    def check(self) -> None: ...

    def end_now(self, why: str, error: type[rounds.RefusedError]) -> None: ...


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


class Transfer:
    """The coordinator's side of moving tensors, for one run (`engine`'s model).

    `upload_slots`: uploads taken at once (the others wait, and send nothing until told: paced uploads); each holds
    one update in a staging file (streamed) or a model-sized buffer (same-host file), so coordinator memory stays
    O(model) however many agents upload together. `send_slots`, `send_wait`: weight parts handed to gRPC at once,
    and how long one waits for a slot before it goes anyway (None: no limit). `shm_root`: where to make the
    same-host files' directory (None: always stream). `staging_dir`: where streamed updates wait until whole
    (None: the temp dir).
    """

    def __init__(self, engine: rounds.RoundEngine, *, upload_slots: int = UPLOAD_SLOTS, send_slots: int = SEND_SLOTS,
                 send_wait: float | None = SEND_WAIT, shm_root: Path | None = SHM_ROOT,
                 staging_dir: Path | None = None) -> None:
        self.engine = engine
        self.upload_slots, self.send_wait = upload_slots, send_wait
        self.shm_root, self.staging_dir = shm_root, staging_dir
        self.uploads = threading.BoundedSemaphore(upload_slots)
        self.sends = threading.BoundedSemaphore(send_slots)
        # at most upload_slots of each at once: reused upload after upload
        self._arenas = Pool(lambda: Arena(serde.spec_of(self.engine.global_state)))
        self._stages = Pool(lambda: Stage(self.staging_dir), lambda stage: stage.close())
        self._files_lock = threading.Lock()
        self._files: SharedFiles | None = None
        self._files_tried = False
        self._reading_lock = threading.Lock()
        self._reading: dict[int, tuple[int, Reading]] = {}  # update streams waiting or reading: id -> (round, it)
        engine.on_close.append(self._round_closed)

    # ---- the round's weights, out
    def round_messages(self, header: pb.RoundHeader, state: Mapping[str, torch.Tensor], agent_id: str,
                       same_host: bool, sent: Callable[[int], None]) -> Iterator[pb.RoundMessage | Outgoing]:
        """A WORK round's messages for one agent: the header, then the weights' parts or (same host) nothing.

        `sent(bytes)` once the weights went. Files only for a caller on this machine (`same_host`): a remote agent
        can't read them, and needn't learn their paths.
        """
        files = self.shared_files() if same_host else None
        if files is not None:
            try:
                path, layout, size = files.weights(header.round, state)
            except OSError as err:  # e.g. a full /dev/shm (containers default to 64 MB): stream this round
                log.warning("cannot write the round's weights file (%s): streaming them", err)
            else:
                header.weights_file = path
                header.weights_layout.extend(layout)
                header.update_file = files.update_file(agent_id, header.round)
                yield pb.RoundMessage(header=header)
                sent(size)
                return
        yield pb.RoundMessage(header=header)
        total = 0
        # Each part's message is made only once it holds a send slot (views of `state` until then): a copy of the
        # encoded weights kept for every stream cost the coordinator one model's size (bench/core_perf.py).
        for layout, chunk, offset in serde.slices(state):
            # The sync server resumes this generator once gRPC has sent the part (or the call ended). Agents
            # that read slowly must not hold up everyone's download: past send_wait a part goes without a slot.
            # Parts in memory: one per send slot, serialised (gRPC's sync server keeps the last object yielded on
            # each stream until this generator gives the next: an Outgoing, emptied as gRPC took its bytes).
            slot = self.sends.acquire(timeout=self.send_wait)
            try:
                msg = pb.RoundMessage()
                serde.fill(msg.part, layout, chunk, offset)
                out = Outgoing(msg.SerializeToString())
                del msg
                yield out
                del out
            finally:
                if slot:
                    self.sends.release()
            total += len(chunk)
        sent(total)

    # ---- updates, in
    @contextmanager
    def upload(self, round_: int, stream: Reading | None, alive: Callable[[], bool],
               time_remaining: float | None) -> Iterator[None]:
        """Hold an upload slot for an update of `round_`, or refuse it as late.

        The slot is waited for while the round is open (at most until its deadline, or `time_remaining` of the
        call) and the call is `alive`. From here until the update is read whole, the round's close ends `stream`
        (it would hold a slot for nothing).
        """
        self._register(round_, stream)
        try:
            if not self._upload_slot(stream, alive, time_remaining):
                raise rounds.LateUpdateError(f"round {round_} closed for updates while this one waited its turn")
            try:
                # An agent whose call ended while it waited asks for work again, may be handed this round again and
                # rewrites its (reused) update file: this call must not read it then.
                if not alive():
                    raise rounds.LateUpdateError(f"the call for round {round_} ended while it waited its turn")
                yield
            finally:
                self.uploads.release()
        finally:
            self._unregister(stream)

    def _upload_slot(self, stream: Reading | None, alive: Callable[[], bool], remaining: float | None) -> bool:
        left = self.engine.seconds_left()
        end = time.monotonic() + (left if remaining is None else min(left, remaining))
        while True:
            if self.uploads.acquire(timeout=max(0.0, min(0.5, end - time.monotonic()))):
                return True
            if stream is not None:
                stream.check()  # the round closed (or the stream's deadline passed) while it waited
            if time.monotonic() >= end or not alive():
                return False

    @contextmanager
    def receive(self, agent_id: str, h: pb.UpdateHeader, source: UpdateSource,
                stream: Reading | None = None) -> Iterator[Update]:
        """The update `h` announced, read from `source`, valid within the block (hold `upload` around it).

        From the file named for this agent and round (read into a reused buffer), or from the stream: written to
        a staging file and read back from it a slice at a time, checked whole before any of it is used; into a
        reused buffer where the aggregator keeps updates whole or the weights are not all float32 (the sum's
        dtype). Once read whole, the round's close no longer ends `stream` (the update may be being added).
        """
        glob = self.engine.global_state
        expected = serde.spec_of(glob)
        if not source.streamed:
            if next(source.parts, None) is not None:
                raise rounds.MalformedError("an update in a file has nothing after its header")
            files = self.shared_files(create=False)
            if files is None:
                raise rounds.MalformedError("this coordinator names no update files")
            with self.arena() as arena:
                tensors, received = files.read_update(agent_id, h.round, source.layout, expected, arena)
                self._unregister(stream)
                yield _whole(glob, tensors, received, h.delta)
            return
        if aggregation.keeps_updates(self.engine.aggregator) or any(
                s.dtype != torch.float32 for s in expected.values() if s.dtype.is_floating_point):
            with self.arena() as arena:
                asm = serde.Assembler(expected, into=arena)
                _read_parts(asm, source.parts)
                tensors = asm.finish()
                self._unregister(stream)
                yield _whole(glob, tensors, asm.received_bytes, h.delta)
            return
        with self.stage() as stage:
            try:
                asm = serde.Assembler(expected, into=stage, check_finite=False)
                _read_parts(asm, source.parts)
                staged = finish_staged(asm, base=glob if h.delta else None)
            except OSError as err:
                log.warning("cannot stage an update in %s: %s", self.staging_dir or tempfile.gettempdir(), err)
                raise rounds.StagingError(f"the coordinator could not stage this update ({err})") from err
            self._unregister(stream)
            yield Update(staged, asm.received_bytes, False)  # the engine reads it back to check it, then adds it

    def _register(self, round_: int, stream: Reading | None) -> None:
        if stream is not None:
            with self._reading_lock:
                self._reading[id(stream)] = (round_, stream)

    def _unregister(self, stream: Reading | None) -> None:
        if stream is not None:
            with self._reading_lock:
                self._reading.pop(id(stream), None)

    def _round_closed(self, round_: int) -> None:
        """End the update streams still waiting or reading for a round that closed: they hold slots for nothing.

        Then write the next round's weights file, before the round opens: otherwise the first local agent's fetch
        writes it and the others' fetches wait behind that write (the second agent's fetch came 1.4 ms after the
        round opened, median, 4.9 ms p90, on a text-ngram run).
        """
        with self._reading_lock:
            ending = [stream for r, stream in self._reading.values() if r == round_]
        for stream in ending:
            stream.end_now(f"round {round_} closed while this update was still arriving", rounds.StaleRoundError)
        files = self.shared_files(create=False)
        if files is not None and not self.engine.finished:
            try:
                files.weights(self.engine.completed_rounds, self.engine.global_state)
            except OSError:  # a full /dev/shm: the fetches try again, and stream if it still fails
                pass

    @contextmanager
    def arena(self) -> Iterator[Arena | None]:
        """A reusable update-sized buffer for an upload slot's holder, or None where updates must keep their memory.

        The sample-weighted mean copies each update into its running sum, so the buffer is free again once
        the engine took it; the robust aggregators keep every update, which then needs its own memory.
        """
        if aggregation.keeps_updates(self.engine.aggregator):
            yield None
            return
        with self._arenas.take() as arena:
            yield arena

    @contextmanager
    def stage(self) -> Iterator[Stage]:
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

    # ---- set-up, figures, clean-up
    def prepare_staging(self) -> None:
        """Make the first staging file now, where updates are staged at all.

        A directory that cannot take one then stops the start, not every upload.
        """
        if aggregation.keeps_updates(self.engine.aggregator):
            return
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


def _read_parts(asm: serde.Assembler, parts: Iterator[pb.UpdateMessage]) -> None:
    for msg in parts:
        if not msg.HasField("part"):
            raise rounds.MalformedError("a second header in one update stream")
        data = msg.part.data  # each read of a bytes field makes a new copy: read it once
        if len(data) > serde.MAX_PART_BYTES:
            raise rounds.TooLargeError(f"a part of {len(data)} bytes; at most {serde.MAX_PART_BYTES}")
        asm.add(msg.part, data)
        del msg, data  # not kept while the next part is awaited


def _whole(glob: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor], received: int, delta: bool) -> Update:
    # the decoder checked the values; weights rebuilt from a delta are checked again by the engine
    return Update(apply_delta(glob, tensors), received, False) if delta else Update(tensors, received, True)
