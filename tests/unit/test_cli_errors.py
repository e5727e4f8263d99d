"""A CLI given bad options says what is wrong in one line and exits non-zero."""

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "4096"), 1, "cores 4096 are not available"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0-x"), 1, "cannot read core list item"),
        (("agent", "start", "--coordinator", "nowhere", "--cores", "0"), 1, "is not HOST:PORT"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--workers", "2"), 1,
         "needs at least as many cores"),
        (("agent", "start", "--cores", "0"), 2, "Missing option '--coordinator'"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--workers", "two"), 2,
         "Invalid value for '--workers'"),
        (("coordinator", "run", "--rounds", "0"), 1, "--rounds must be at least 1"),
        (("coordinator", "run", "--rounds", "1", "--optimizer", "lion"), 1, "unknown optimizer 'lion'"),
        (("coordinator", "run", "--rounds", "1", "--dataset", "imagenet"), 1, "imagenet"),
        (("coordinator", "run", "--rounds", "1", "--host", "0.0.0.0"), 1, "refusing to serve on 0.0.0.0 without TLS"),
        (("coordinator", "run", "--no-such-flag"), 2, "No such option"),
        (("coordinator", "run", "--rounds", "1", "--target-accuracy", "99"), 1, "fraction in (0, 1]"),
        (("coordinator", "run", "--rounds", "1", "--seed", "3000000000"), 1, "seed must be in 0..2147483647"),
        (("coordinator", "run", "--rounds", "1", "--trim", "0.7"), 1, "--trim must be in [0, 0.5)"),
        (("coordinator", "run", "--rounds", "1", "--upload-slots", "0"), 1, "--upload-slots must be at least 1"),
        (("coordinator", "run", "--rounds", "1", "--staging-dir", "/no/such/dir"), 1,
         "--staging-dir /no/such/dir is not a directory"),
        (("coordinator", "run", "--rounds", "1", "--checkpoint-every", "0"), 1,
         "--checkpoint-every must be at least 1"),
        (("coordinator", "run", "--rounds", "1", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"), 1,
         "cannot read the TLS key /nonexistent.key"),
    ],
)
def test_bad_options_give_one_line_and_a_nonzero_exit(args: tuple[str, ...], code: int, message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_busy_port_is_one_line_not_a_second_coordinator() -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = _run("coordinator", "run", "--rounds", "1", "--port", str(port), "--dataset", "tweets", "--limit", "300")
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1] == f"coordinator: error: cannot listen on 127.0.0.1:{port}: the port is in use or not allowed"
    assert "Traceback" not in proc.stderr
