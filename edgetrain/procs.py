"""Spawned child processes pinned to cores, and the typed messages they exchange with their parent over a pipe.

The agent's training workers (agent/worker.py) and the pinned runs of `edgetrain.pinned` (the split probe of
`--workers auto`, and the benchmarks) both start children this way: `spawn` (gRPC does not survive fork()), each child
pinned first, then torch's thread pools sized. A child that fails sends `Failed` before it exits; the parent
raises `ChildError` with the child's own message, as it does when a child dies or does not answer in time.

Start-up: a spawned child imports torch again (~1.5 s of CPU), and the README's run starts four such processes
after the coordinator's own import. So a process that may still fork safely (`may_fork`: Linux, one thread, gRPC
not started, torch's thread pools not used) forks its children early instead, while they cannot be told their
work yet: `Prestarted` children wait for it on their pipe, and `Children(prestarted=...)` hands it to them.
`fork_waiting` does the same for whole commands (the coordinator's local agents, which wait for its address).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


def name_process(name: str) -> None:
    """What `ps -o comm` and `top` show for this process (Linux: 15 characters).

    A forked child keeps its parent's command line, so this is what tells a forked agent or worker apart.
    """
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass


@contextmanager
def _forking() -> Iterator[None]:
    """Around a deliberate fork (see `may_fork`): no warning of the threads that are safe to fork.

    Python 3.12+ warns of any other thread, and the one such thread a CLI process has, OpenBLAS's pool (numpy
    starts it at import), is fork-safe: OpenBLAS re-creates it in a child.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        yield


_command = False  # this process runs one of the commands, started fresh (`command_process`)


def command_process() -> None:
    """Mark this process as a command's own, started fresh: the console scripts' entry points call it.

    Only such a process may fork its agents or workers (`may_fork`): one that ran a command in-process (a
    test calling the CLI's app) may have run gRPC or torch before.
    """
    global _command
    _command = True


def may_fork() -> bool:
    """Whether this process can fork children that go on to use torch and gRPC.

    Only on Linux, only in a command's own process (`command_process`), and only with one Python thread. The
    caller must also know that it has not started gRPC (no channel, no server) nor run torch operations (GNU
    OpenMP's pool does not survive fork): the coordinator's and the agent's commands fork before either.
    """
    return (_command and sys.platform.startswith("linux") and hasattr(os, "fork")
            and threading.active_count() == 1)


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@dataclass(frozen=True)
class _Work:
    """Parent to a prestarted child: what to run, as `target(*args, conn)`."""

    target: Callable[..., None]
    args: tuple[Any, ...]


def _await_work(conn: Any, inherited: list[Any], name: str) -> None:
    """A prestarted child: wait for its work, then run it; end quietly when the parent stops it or is gone."""
    _default_signals()  # not the parent's handlers (the agent's would keep SIGTERM from ending it)
    name_process(name)
    for other in inherited:  # the parent's ends (its own, its elder siblings'): only the parent may hold them, so
        # that the parent's close or death reaches each child as EOF
        other.close()
    try:
        work = conn.recv()
    except (EOFError, OSError):
        return
    if isinstance(work, _Work):
        work.target(*work.args, conn)


class Prestarted:
    """`count` children forked now, before their work is known; `Children(prestarted=...)` gives it to them."""

    def __init__(self, count: int, *, name: str) -> None:
        ctx = tmp.get_context("fork")
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        try:
            for i in range(count):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_await_work, args=(child, [*self.conns, parent], name), name=f"{name}-{i}",
                                   daemon=True)
                with _forking():
                    proc.start()
                child.close()
                self.conns.append(parent)
                self.processes.append(proc)
        except BaseException:
            self.stop()
            raise

    def __len__(self) -> int:
        return len(self.processes)

    def stop(self) -> None:
        """End children that were never given work."""
        for conn in self.conns:
            conn.close()  # EOF: each ends by itself
        for proc in self.processes:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        self.conns, self.processes = [], []


class Children:
    """Spawned children, each running `target(*args)` with its own end of a pipe as the last argument.

    `describe(i)` names child `i` in errors ("benchmark child 1 (cores 2-3)"); `error` is the ChildError raised,
    with `failure(i, detail)` as its message when the child sent `Failed`. `one_shot`: each child sends its one
    result and exits (a pinned run), so one that ended cleanly has finished; otherwise (training workers, which
    run until told to stop) any child that ended has died.
    """

    def __init__(self, target: Callable[..., None], args: Sequence[tuple[Any, ...]], *, name: str,
                 describe: Callable[[int], str], error: type[ChildError] = ChildError,
                 failure: Callable[[int, str], str] | None = None, one_shot: bool = False,
                 prestarted: Prestarted | None = None) -> None:
        """`prestarted`: run in these forked children (as many as `args`; they are taken over) instead of spawning."""
        self._one_shot = one_shot
        self._ctx = tmp.get_context("spawn")
        self._describe, self._error = describe, error
        self._failure = failure or (lambda i, detail: f"{describe(i)}: {detail}")
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        self._held: dict[int, Any] = {}  # children's messages read early (see recv)
        self._done: set[int] = set()  # children that ended cleanly, every message read
        self._eof: set[int] = set()  # children whose pipe was found closed
        if prestarted is not None:
            if len(prestarted) != len(args):
                raise ValueError(f"{len(prestarted)} prestarted children for {len(args)} jobs")
            self.conns, self.processes = prestarted.conns, prestarted.processes
            prestarted.conns, prestarted.processes = [], []
            try:
                for i, child_args in enumerate(args):
                    self.send(i, _Work(target, tuple(child_args)))
            except BaseException:
                self.stop(0.1)
                raise
            return
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


class Forked:
    """A forked command (`fork_waiting`), with what its parent uses of `subprocess.Popen`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its code is lost
                self.returncode = 0
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Waiting:
    """A command forked by `fork_waiting`: `go(argv)` runs it, `cancel()` (or the parent's exit) ends it unrun."""

    def __init__(self, proc: Forked, fd: int) -> None:
        self.proc, self._fd = proc, fd

    def go(self, argv: Sequence[str]) -> None:
        import json

        try:
            with os.fdopen(self._fd, "wb") as pipe:
                pipe.write(json.dumps(list(argv)).encode())
        except BrokenPipeError:  # it died while waiting: the parent sees its exit code
            pass
        self._fd = -1

    def cancel(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def fork_waiting(count: int, main: Callable[[list[str]], int], *, name: str) -> list[Waiting]:
    """Fork `count` children now that each run `main(argv)` once given their argv, and exit with its code.

    For a command whose arguments are known only later (the coordinator's local agents need its port): the
    children are ready, imports done, when it is. Only where `may_fork()`, and before gRPC or torch ran.
    """
    import json
    import traceback

    pipes = [os.pipe() for _ in range(count)]
    out: list[Waiting] = []
    try:
        for i, (read, write) in enumerate(pipes):
            sys.stdout.flush()
            sys.stderr.flush()
            with _forking():
                pid = os.fork()
            if pid == 0:  # the child: never returns into its parent's code
                code = 1
                try:
                    name_process(name)
                    for j, (r, w) in enumerate(pipes):
                        for fd in (w,) if j == i else (r, w):
                            try:
                                os.close(fd)
                            except OSError:  # closed in the parent before this fork
                                pass
                    _default_signals()
                    with os.fdopen(read, "rb") as pipe:
                        given = pipe.read()
                    code = main(json.loads(given)) if given else 0
                except SystemExit as exc:  # as Python's own exit: None is 0, a message is printed and is 1
                    if exc.code is None or isinstance(exc.code, int):
                        code = exc.code or 0
                    else:
                        print(exc.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
                finally:
                    for stream in (sys.stdout, sys.stderr):
                        try:
                            stream.flush()
                        except BaseException:  # noqa: S110 - nothing may keep the child from exiting here
                            pass
                    os._exit(code)
            os.close(read)
            out.append(Waiting(Forked(pid), write))
    except BaseException:
        for waiting in out:
            waiting.cancel()
            waiting.proc.wait()  # they end at once, never told what to run: reaped, no zombies
        for read, write in pipes[len(out):]:
            for fd in (read, write):
                try:
                    os.close(fd)
                except OSError:
                    pass
        raise
    return out
