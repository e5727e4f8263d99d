"""Same-host fast path: the round's weights and local agents' updates as files in a private /dev/shm directory.

A 4.8 MB model over loopback gRPC took 5-36 ms each way (bench/core_perf.py); through tmpfs it is a memcpy.
gRPC still carries every control message, and an update read from a file goes through the same
`serde.Assembler` checks as a streamed one. The coordinator never opens a path a client names: it names each
agent's update file itself, remembers it, and reads only that.
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
from pathlib import Path

import torch

from edgetrain import serde
from edgetrain.errors import WireError
from edgetrain.proto import edgetrain_pb2 as pb

SHM_ROOT = Path("/dev/shm")  # tmpfs on Linux; where it is missing, everything is streamed
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


class SharedFiles:
    """A private directory (mode 0700) of one weights file per round and per-agent update files.

    The directory goes when `close` is called, or at the latest when the interpreter exits.
    """

    def __init__(self, root: Path = SHM_ROOT) -> None:
        remove_orphans(root)
        self.dir = Path(tempfile.mkdtemp(prefix=f"edgetrain-{os.getpid()}-", dir=root))  # mkdtemp makes it 0700
        self._lock = threading.Lock()
        self._round = -1
        self._weights: tuple[str, list[pb.TensorPart], int] = ("", [], 0)
        self._updates: dict[str, tuple[int, Path]] = {}  # agent_id -> (round, the file it was told to write)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), ignore_errors=True)

    @classmethod
    def create(cls, root: Path = SHM_ROOT) -> SharedFiles | None:
        """A new directory under `root`, or None where there is no usable `root` (then everything streams)."""
        try:
            return cls(root)
        except OSError:
            return None

    def weights(self, round_: int, state: Mapping[str, torch.Tensor]) -> tuple[str, list[pb.TensorPart], int]:
        """Round `round_`'s weights file, its layout and size, written once per round (write, then rename)."""
        with self._lock:
            if round_ < self._round:  # sweeping for an older round would delete the current round's files
                raise OSError(f"round {round_} is older than the files' round {self._round}")
            if self._round != round_:
                self._sweep(keep=f"r{round_}-")
                path = self.dir / f"r{round_}-weights"
                # a fresh name, created exclusively (0600): nothing planted in the directory is followed
                fd, tmp = tempfile.mkstemp(prefix=f"r{round_}-weights-", dir=self.dir)
                try:
                    with os.fdopen(fd, "wb") as f:
                        layout = serde.write_raw(state, f)
                        size = f.tell()
                    os.replace(tmp, path)  # rename never follows a link planted at `path`
                except OSError:
                    Path(tmp).unlink(missing_ok=True)  # a partial file would hold tmpfs memory for nothing
                    raise
                self._round, self._weights = round_, (str(path), layout, size)
                self._updates = {a: named for a, named in self._updates.items() if named[0] >= round_}
            return self._weights

    def update_file(self, agent_id: str, round_: int) -> str:
        """Name the file `agent_id` may write its round `round_` update into (unguessable, one per hand-out)."""
        path = self.dir / f"r{round_}-update-{secrets.token_hex(8)}"
        with self._lock:
            old = self._updates.get(agent_id)
            self._updates[agent_id] = (round_, path)
        if old is not None:
            _remove(old[1])
        return str(path)

    def read_update(
        self, agent_id: str, round_: int, layout: Sequence[pb.TensorPart], expected: Mapping[str, serde.TensorSpec]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Decode the update `agent_id` wrote for `round_` into the file named for it, then delete the file.

        Raises WireError when no file was named for this agent and round, or the file is missing, not a regular
        file, or its bytes do not match the layout and `expected` (serde's checks).
        """
        with self._lock:
            named = self._updates.get(agent_id)
            if named is None or named[0] != round_:
                raise WireError(f"no update file was named for this agent in round {round_}")
            del self._updates[agent_id]
        path = named[1]
        try:
            # O_NOFOLLOW and O_NONBLOCK: a symlink or a FIFO put there instead is refused, never followed or waited on
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as err:
            _remove(path)
            raise WireError(f"the update file for round {round_} cannot be opened ({err.strerror})") from err
        try:
            _remove(path)  # read through the open descriptor; whatever was put there goes now
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise WireError("the update file is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                return serde.decode_file(f, layout, expected)
        finally:
            os.close(fd)

    def _sweep(self, keep: str) -> None:
        """Delete every file of other rounds (old weights, updates never sent or refused before being read)."""
        for entry in self.dir.iterdir():
            if not entry.name.startswith(keep):
                _remove(entry)

    def close(self) -> None:
        """Remove the directory and everything in it."""
        self._finalizer()
