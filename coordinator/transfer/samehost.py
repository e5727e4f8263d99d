"""Same-host fast path: the round's weights and local agents' updates as files in a private /dev/shm directory.

A 4.8 MB model over loopback gRPC took 5-36 ms each way (bench/core_perf.py); through tmpfs it is a memcpy.
gRPC still carries every control message, and an update read from a file goes through the same
`serde.Assembler` checks as a streamed one. The coordinator never opens a path a client names: it names each
agent's update file itself, remembers it, and reads only that. How agents open these files: edgetrain.samehost.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetrain import serde
from edgetrain.errors import WireError
from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.samehost import DIR_PREFIX, SHM_ROOT, Rewriter

_OURS = re.compile(r"edgetrain-(\d+)-")  # edgetrain-<coordinator pid>-<random>


def remove_orphans(root: Path) -> list[Path]:
    """Remove this user's directories left by coordinators that died without cleaning up (SIGKILL, OOM).

    A directory of tmpfs holds memory until reboot; its name carries the pid that made it, and one whose pid
    no longer runs is removed. Returns what was removed.
    """
    removed = []
    for entry in root.iterdir():
        match = _OURS.match(entry.name)
        if match is None:
            continue
        try:
            if entry.lstat().st_uid != os.getuid() or not entry.is_dir():
                continue
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        except (OSError, OverflowError):  # gone meanwhile, a live process of another user, or not a pid
            continue
    return removed


def _remove(path: Path) -> None:
    """Delete what is at `path`, whatever an agent put there (a file, a link, a directory); never raise."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@dataclass
class _Named:
    """The update file named for one agent: the round it was last handed out for, and whether it was read."""

    round: int
    path: Path
    taken: bool = False


class SharedFiles:
    """A private directory (mode 0700) of two weights files, written in turn, and one update file per agent.

    Files are rewritten in place round after round, never made anew: new tmpfs pages cost ~1.5 ms per 4.8 MB to
    fill and as much to free, on every round's critical path (weights written, update written, update freed).
    The weights alternate between two files, so round r's file is rewritten for round r+2 only, when round r
    has long closed: an agent still reading it then trains for a closed round and is refused as stale anyway.
    The directory goes when `close` is called, or at the latest when the interpreter exits.
    """

    def __init__(self, root: Path = SHM_ROOT) -> None:
        remove_orphans(root)
        # mkdtemp makes it 0700
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=root))
        self._lock = threading.Lock()
        self._round = -1
        self._weights: tuple[str, list[pb.TensorPart], int] = ("", [], 0)
        self._slots: list[tuple[str, int]] = []  # (path, open descriptor) of the two weights files
        self._next_slot = 0
        self._updates: dict[str, _Named] = {}  # agent_id -> its update file
        self._finalizer = weakref.finalize(self, _close, str(self.dir), self._slots)

    @classmethod
    def create(cls, root: Path = SHM_ROOT) -> SharedFiles | None:
        """A new directory under `root`, or None where there is no usable `root` (then everything streams)."""
        try:
            return cls(root)
        except OSError:
            return None

    def weights(self, round_: int, state: Mapping[str, torch.Tensor]) -> tuple[str, list[pb.TensorPart], int]:
        """Round `round_`'s weights file, its layout and size, written once per round."""
        with self._lock:
            if round_ < self._round:  # rewriting for an older round would change the current round's file
                raise OSError(f"round {round_} is older than the files' round {self._round}")
            if self._round != round_:
                if len(self._slots) < 2:
                    # created exclusively (0600) and written only through this descriptor afterwards: nothing
                    # planted in the directory is ever opened or followed
                    fd, path = tempfile.mkstemp(prefix=f"weights{len(self._slots)}-", dir=self.dir)
                    self._slots.append((path, fd))
                path, fd = self._slots[self._next_slot]
                with Rewriter(fd, closefd=False) as f:
                    layout = serde.write_raw(state, f)
                    size = f.tell()
                self._next_slot ^= 1
                self._round, self._weights = round_, (path, layout, size)
                self._forget_idle(round_)
            return self._weights

    def _forget_idle(self, round_: int) -> None:
        """Remove update files not handed out in the last round (agents gone), and anything else put here."""
        for agent_id, named in list(self._updates.items()):
            if named.round < round_ - 1:
                del self._updates[agent_id]
        keep = {Path(p).name for p, _ in self._slots} | {n.path.name for n in self._updates.values()}
        for entry in self.dir.iterdir():
            if entry.name not in keep:
                _remove(entry)

    def update_file(self, agent_id: str, round_: int) -> str:
        """Name the file `agent_id` may write its round `round_` update into: the same one each round.

        The name is unguessable; the agent creates the file the first time, and rewrites it afterwards.
        """
        with self._lock:
            named = self._updates.get(agent_id)
            if named is None:
                named = self._updates[agent_id] = _Named(round_, self.dir / f"update-{secrets.token_hex(8)}")
            named.round, named.taken = round_, False
            return str(named.path)

    def read_update(
        self, agent_id: str, round_: int, layout: Sequence[pb.TensorPart], expected: Mapping[str, serde.TensorSpec],
        into: serde.Buffers | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Decode the update `agent_id` wrote for `round_` into the file named for it (at most once per round).

        Raises WireError when no file was named for this agent and round, or the file is missing, not a regular
        file, or its bytes do not match the layout and `expected` (serde's checks); such a file is deleted and
        the agent gets a new name next round.
        """
        with self._lock:
            named = self._updates.get(agent_id)
            if named is None or named.round != round_ or named.taken:
                raise WireError(f"no update file was named for this agent in round {round_}")
            named.taken = True
        try:
            # O_NOFOLLOW and O_NONBLOCK: a symlink or a FIFO put there instead is refused, never followed or waited on
            fd = os.open(named.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as err:
            self._drop(agent_id, named)
            raise WireError(f"the update file for round {round_} cannot be opened ({err.strerror})") from err
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise WireError("the update file is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return serde.decode_file(f, layout, expected, into=into)
        except WireError:
            self._drop(agent_id, named)
            raise
        finally:
            os.close(fd)

    def _drop(self, agent_id: str, named: _Named) -> None:
        """Forget a file that failed, and delete whatever is at its path (a file, a link, a directory)."""
        with self._lock:
            if self._updates.get(agent_id) is named:
                del self._updates[agent_id]
        _remove(named.path)

    def close(self) -> None:
        """Remove the directory and everything in it."""
        self._finalizer()


def _close(directory: str, slots: list[tuple[str, int]]) -> None:
    for _, fd in slots:
        try:
            os.close(fd)
        except OSError:
            pass
    slots.clear()
    shutil.rmtree(directory, ignore_errors=True)
