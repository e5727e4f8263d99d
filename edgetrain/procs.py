"""Spawned child processes pinned to cores, and the typed messages they exchange with their parent over a pipe.

The agent's training workers (agent/worker.py) and the pinned runs of `edgetrain.pinned` (the split probe of
`--workers auto`, and the benchmarks) both start children this way: `spawn` (gRPC does not survive fork()), each child
pinned first, then torch's thread pools sized. A child that fails sends `Failed` before it exits; the parent
raises `ChildError` with the child's own message, as it does when a child dies or does not answer in time.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as tmp

from edgetrain.cores import pin_current_process
from edgetrain.errors import EdgetrainError


class ChildError(EdgetrainError):
    """A child process failed, died or did not answer in time; the message says which and why."""


@dataclass(frozen=True)
class Failed:
    """A child's last message when it fails: its error in one line, and the traceback."""

    detail: str
    trace: str = ""


@dataclass(frozen=True)
class Stop:
    """Parent to a long-lived child: finish and exit."""


def free_port() -> int:
    """A TCP port free on loopback right now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_child(cores: Sequence[int], threads: int, world: int) -> None:
    """What every spawned training child does first (the agent's workers and pinned runs alike).

    Pins itself to `cores` before torch runs anything (its pools start lazily), runs `threads` intra-op threads
    and one inter-op thread, and keeps a gloo group of `world` > 1 processes on loopback.
    """
    pin_current_process(list(cores))
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    if world > 1 and sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # rendezvous and traffic stay on loopback


def failed(exc: BaseException) -> Failed:
    """The message a child sends for `exc`: our own errors by their message, others with their type."""
    import traceback

    detail = str(exc) if isinstance(exc, EdgetrainError) else f"{type(exc).__name__}: {exc}"
    return Failed(detail, traceback.format_exc())


_NOTHING = object()  # no message: a dead child whose pipe's write end something else still holds


class Children:
    """Spawned children, each running `target(*args)` with its own end of a pipe as the last argument.

    `describe(i)` names child `i` in errors ("benchmark child 1 (cores 2-3)"); `error` is the ChildError raised,
    with `failure(i, detail)` as its message when the child sent `Failed`. `one_shot`: each child sends its one
    result and exits (a pinned run), so one that ended cleanly has finished; otherwise (training workers, which
    run until told to stop) any child that ended has died.
    """

    def __init__(self, target: Callable[..., None], args: Sequence[tuple[Any, ...]], *, name: str,
                 describe: Callable[[int], str], error: type[ChildError] = ChildError,
                 failure: Callable[[int, str], str] | None = None, one_shot: bool = False) -> None:
        self._one_shot = one_shot
        self._ctx = tmp.get_context("spawn")
        self._describe, self._error = describe, error
        self._failure = failure or (lambda i, detail: f"{describe(i)}: {detail}")
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        self._held: dict[int, Any] = {}  # children's messages read early (see recv)
        self._done: set[int] = set()  # children that ended cleanly, every message read
        self._eof: set[int] = set()  # children whose pipe was found closed
        try:
            for i, child_args in enumerate(args):
                parent, child = self._ctx.Pipe()
                proc = self._ctx.Process(target=target, args=(*child_args, child), name=f"{name}-{i}", daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.processes.append(proc)
        except BaseException:
            self.stop(0.1)
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def send(self, i: int, msg: object) -> None:
        try:
            self.conns[i].send(msg)
        except OSError as exc:  # its end of the pipe is gone: it died after its last message was read
            self.processes[i].join(1.0)
            raise self._error(f"{self._describe(i)} exited unexpectedly (exit code {self.processes[i].exitcode})"
                              ) from exc

    def recv(self, i: int, timeout: float) -> Any:
        """Child `i`'s next message; `error` when it sent `Failed`, when any child died, or after `timeout` s.

        With `one_shot`, a child that ended cleanly while another is awaited has not died: a pinned run's child
        sends its one message and exits, maybe before the one awaited. Its message is kept for its own `recv`.
        One that ended without a message and a nonzero exit code, or with `Failed`, has died; without
        `one_shot`, any child that ended has.
        """
        end = time.monotonic() + timeout
        while i not in self._held and not self.conns[i].poll(0.2):  # 0.2 s: how soon a death is seen
            for j, proc in enumerate(self.processes):
                if j != i and j not in self._held and j not in self._done and not proc.is_alive():
                    self._last_words(j)
            if time.monotonic() > end:
                raise self._error(f"no answer from {self._describe(i)} in {timeout:.0f} s")
        return self._held.pop(i) if i in self._held else self._read(i)

    def _last_words(self, j: int) -> None:
        """Child `j` ended: keep its message, if it left one (`one_shot`); `error` for `Failed` or a death."""
        try:
            msg = self._read(j) if self.conns[j].poll(0) else _NOTHING  # a dead child's pipe polls true at EOF too
        except self._error:
            if not self._one_shot or j not in self._eof or self.processes[j].exitcode != 0:
                raise
            self._done.add(j)  # no message left and exit code 0: it finished, every message it sent was read
            return
        if not self._one_shot or msg is _NOTHING:
            self.processes[j].join(1.0)
            raise self._error(f"{self._describe(j)} exited unexpectedly (exit code {self.processes[j].exitcode})")
        self._held[j] = msg

    def _read(self, i: int) -> Any:
        """Child `i`'s next message, which is there (or its pipe is closed); `error` for `Failed` or none."""
        try:
            msg = self.conns[i].recv()
        except EOFError as exc:
            self.processes[i].join(1.0)  # (its exit code, when it is gone)
            self._eof.add(i)
            raise self._error(f"{self._describe(i)} exited unexpectedly (exit code {self.processes[i].exitcode})"
                              ) from exc
        if isinstance(msg, Failed):
            raise self._error(self._failure(i, msg.detail))
        return msg

    def stop(self, timeout: float = 10.0) -> None:
        """Tell every child to stop, wait up to `timeout` s for each, then kill what is left."""
        for conn in self.conns:
            try:
                conn.send(Stop())
            except (BrokenPipeError, OSError):
                pass
        for proc in self.processes:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self.conns:
            conn.close()
        self.conns = []
