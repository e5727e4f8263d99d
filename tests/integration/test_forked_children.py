"""Children forked before their work is known (edgetrain.procs): what the commands do to start in ~2.5 s.

The coordinator's command forks its local agents before it loads data or serves, and each agent's command forks
its training workers before it joins; each child waits on its pipe for what to do. These tests fork trivial
children from the test process; the commands' own use is checked through them in test_training_runs (`--cores`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgetrain.procs import ChildError, Children, Prestarted, failed, fork_waiting, may_fork


def _report(tag: str, conn: object) -> None:
    comm = Path("/proc/self/comm").read_text().strip()
    conn.send((tag, os.getpid(), os.getppid(), comm))  # type: ignore[attr-defined]
    conn.recv()  # type: ignore[attr-defined]  # Stop


def _fails(conn: object) -> None:
    try:
        raise ValueError("no data here")
    except ValueError as exc:  # as a worker does: its error goes to the parent, then it exits
        conn.send(failed(exc))  # type: ignore[attr-defined]


def _dies(conn: object) -> None:
    os._exit(3)


def test_prestarted_children_run_the_work_they_are_given_later_in_the_same_processes() -> None:
    pre = Prestarted(2, name="edge-worker")
    pids = [p.pid for p in pre.processes]
    time.sleep(0.2)  # forked and waiting, before any work exists
    assert all(p.is_alive() for p in pre.processes)
    kids = Children(_report, [("a",), ("b",)], name="test", describe=lambda i: f"child {i}", prestarted=pre)
    try:
        got = [kids.recv(i, 30.0) for i in range(2)]
    finally:
        kids.stop(5.0)
    assert [g[0] for g in got] == ["a", "b"]
    assert [g[1] for g in got] == pids  # the forked processes themselves ran it, nothing was spawned
    assert all(g[2] == os.getpid() for g in got)
    assert all(g[3] == "edge-worker" for g in got)  # what ps -o comm shows
    assert len(pre) == 0  # taken over: stopping the Prestarted now stops nothing of theirs


def test_a_prestarted_child_that_fails_is_reported_with_its_own_words() -> None:
    pre = Prestarted(1, name="edge-worker")
    kids = Children(_fails, [()], name="test", describe=lambda i: f"child {i}", prestarted=pre)
    try:
        with pytest.raises(ChildError, match="child 0: ValueError: no data here"):
            kids.recv(0, 30.0)
    finally:
        kids.stop(5.0)


def test_a_prestarted_child_that_dies_is_reported_dead() -> None:
    pre = Prestarted(1, name="edge-worker")
    kids = Children(_dies, [()], name="test", describe=lambda i: f"child {i}", prestarted=pre)
    try:
        with pytest.raises(ChildError, match=r"child 0 exited unexpectedly \(exit code 3\)"):
            kids.recv(0, 30.0)
    finally:
        kids.stop(5.0)


def test_prestarted_children_never_given_work_end_cleanly_when_stopped() -> None:
    pre = Prestarted(2, name="edge-worker")
    procs = list(pre.processes)
    pre.stop()
    assert [p.exitcode for p in procs] == [0, 0]  # they saw EOF and ended (killed: -9)


def test_a_prestarted_child_ends_on_sigterm_whatever_its_parent_handles() -> None:
    """The agent's command handles SIGTERM itself (to leave cleanly); its forked workers must not inherit that."""
    before = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        pre = Prestarted(1, name="edge-worker")
    finally:
        signal.signal(signal.SIGTERM, before)
    (proc,) = pre.processes
    time.sleep(0.2)  # past the fork, in its own handlers
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(30)
    assert proc.exitcode == -signal.SIGTERM
    pre.stop()


def test_prestarted_count_must_match_the_work() -> None:
    pre = Prestarted(1, name="edge-worker")
    try:
        with pytest.raises(ValueError, match="1 prestarted children for 2 jobs"):
            Children(_report, [("a",), ("b",)], name="test", describe=str, prestarted=pre)
    finally:
        pre.stop()


def test_forked_commands_run_once_told_their_arguments_and_exit_with_their_code(tmp_path: Path) -> None:
    out = tmp_path / "argv"

    def main(argv: list[str]) -> int:
        out.write_text(" ".join(argv) + " " + Path("/proc/self/comm").read_text().strip())
        return len(argv)

    told, cancelled = fork_waiting(2, main, name="edge-agent")
    time.sleep(0.2)
    assert told.proc.poll() is None and cancelled.proc.poll() is None  # both waiting
    assert not out.exists()
    told.go(["start", "--coordinator", "127.0.0.1:5"])
    cancelled.cancel()  # never told: it ends without running the command
    assert told.proc.wait(30) == 3
    assert cancelled.proc.wait(30) == 0
    assert out.read_text() == "start --coordinator 127.0.0.1:5 edge-agent"


def test_a_forked_command_that_is_stopped_reports_the_signal() -> None:
    (waiting,) = fork_waiting(1, lambda argv: 0, name="edge-agent")
    waiting.proc.terminate()
    assert waiting.proc.wait(30) == -15
    waiting.cancel()


def test_only_a_commands_own_process_with_one_python_thread_may_fork() -> None:
    """Not a process that merely runs a CLI's app in-process (it may have run gRPC or torch), nor one with threads."""
    script = (
        "import threading\n"
        "from edgetrain import procs\n"
        "plain = procs.may_fork()\n"
        "procs.command_process()\n"
        "command = procs.may_fork()\n"
        "stop = threading.Event(); other = threading.Thread(target=stop.wait); other.start()\n"
        "threaded = procs.may_fork()\n"
        "stop.set(); other.join()\n"
        "print(plain, command, threaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True", "False"]
    assert not may_fork()  # this test process ran no command's entry point


def test_an_agent_that_fails_after_forking_its_workers_exits_and_leaves_none(tmp_path: Path) -> None:
    """A busy --metrics-port fails the agent after it forked its worker: it exits 1 at once, the worker with it."""
    def workers() -> set[int]:
        return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "edge-worker"}

    before = workers()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = subprocess.run(
            [sys.executable, "-m", "edgetrain.agent", "start", "--coordinator", "127.0.0.1:1", "--cores",
             str(os.sched_getaffinity(0).pop()), "--metrics-port", str(port), "--give-up-after", "5"],
            capture_output=True, text=True, timeout=120)
    assert agent.returncode == 1, agent.stderr
    assert "cannot serve /metrics" in agent.stderr, agent.stderr
    assert not workers() - before, "a forked worker outlived its agent"  # it stopped them before it exited
