"""A CLI given bad options says what is wrong in one line and exits non-zero."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"edgetrain.{args[0]}",
                           *args[1:]], capture_output=True, text=True, timeout=120)


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
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2",
          "--token-file", "/nonexistent.token"), 1,
         "cannot read token file /nonexistent.token: No such file or directory"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2",
          "--token-file", "/dev/null"), 1, "token file /dev/null is empty"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2",
          "--tls-cert", "/nonexistent.pem"), 1, "--tls-cert and --tls-key go together"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2",
          "--device", "tpu"), 1, "device 'tpu': use cpu or cuda:N"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2",
          "--name", "a/b"), 1, "agent name 'a/b': use 1-128 letters, digits, '_', '.', ':' or '-'"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2",
          "--name", "n" * 129), 1, f"agent name {'n' * 129!r}: use 1-128 letters"),
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2",
          "--name", ""), 1, "agent name '': use 1-128 letters"),  # not quietly the host name
        (("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2",
          "--name", "unknown"), 1, "agent name 'unknown': 'unknown' is reserved"),  # refusals' node label
        (("coordinator", "run", "--rounds", "0"), 1, "--rounds must be at least 1"),
        (("coordinator", "run", "--rounds", "1", "--cores", "4096"), 1, "cores 4096 are not available"),
        (("coordinator", "run", "--rounds", "1", "--cores", "0-x"), 1, "cannot read core list item"),
        (("coordinator", "run", "--rounds", "1", "--optimizer", "lion"), 1, "unknown optimizer 'lion'"),
        (("coordinator", "run", "--rounds", "1", "--dataset", "imagenet"), 1, "imagenet"),
        (("coordinator", "run", "--rounds", "1", "--host", "0.0.0.0"), 1, "refusing to serve on 0.0.0.0 without TLS"),
        (("coordinator", "run", "--no-such-flag"), 2, "No such option"),
        (("coordinator", "run", "--rounds", "1", "--target-accuracy", "99"), 1, "fraction in (0, 1]"),
        (("coordinator", "run", "--rounds", "1", "--seed", "3000000000"), 1, "seed must be in 0..2147483647"),
        (("coordinator", "run", "--rounds", "1", "--trim", "0.7"), 1, "--trim must be in [0, 0.5)"),
        (("coordinator", "run", "--rounds", "1", "--upload-slots", "0"), 1, "--upload-slots must be at least 1"),
        (("coordinator", "run", "--rounds", "1", "--max-agents", "0"), 1, "--max-agents must be at least 1"),
        (("coordinator", "run", "--rounds", "1", "--staging-dir", "/no/such/dir"), 1,
         "--staging-dir /no/such/dir is not a directory"),
        (("coordinator", "run", "--rounds", "1", "--checkpoint-every", "0"), 1,
         "--checkpoint-every must be at least 1 or auto, got 0"),
        (("coordinator", "run", "--rounds", "1", "--eval-every", "0"), 1, "--eval-every must be at least 1 or auto"),
        (("coordinator", "run", "--rounds", "1", "--eval-every", "often"), 2, "Invalid value for '--eval-every'"),
        (("coordinator", "run", "--rounds", "1", "--timed-rounds", "--balance"), 1,
         "--timed-rounds and --balance each size the agents' work: give one of them"),
        (("coordinator", "run", "--rounds", "1", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"), 1,
         "--tls-cert /nonexistent.pem, --tls-key /nonexistent.key: No such file or directory"),
    ],
)
def test_bad_options_give_one_line_and_a_nonzero_exit(args: tuple[str, ...], code: int, message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edge-agent: error: " if args[0] == "agent" else "coordinator: error: "), lines[0]
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
    assert lines[-1] == (f"coordinator: error: cannot listen on 127.0.0.1:{port}: the port is in use or needs "
                         "privileges (below 1024), or the host is not an address of this machine")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [
    ("coordinator", "run", "--rounds", "1", "--port", "0", "--dataset", "tweets", "--model", "text-bag", "--limit",
     "300", "--no-progress", "--join-timeout", "2"),
    ("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2"),
])
def test_a_busy_metrics_port_is_one_line(command: tuple[str, ...], tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", f"edgetrain.{command[0]}", *command[1:], "--metrics-port",
                               str(port)], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
    prog = "edge-agent" if command[0] == "agent" else "coordinator"
    assert _one_error_line(proc) == f"{prog}: error: cannot serve /metrics on 127.0.0.1:{port}: Address already in use"
    assert proc.returncode == 1
    assert [p for p in tmp_path.rglob("*") if p.name != "runs"] == []  # no run folder left behind


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _self_signed(folder: Path, stem: str) -> tuple[Path, Path]:
    cert, key = folder / f"{stem}-cert.pem", folder / f"{stem}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=x"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


_AGENT = ("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0", "--give-up-after", "2")


def test_an_agent_given_a_file_that_is_no_ca_says_so_before_grpc_does(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    line = _one_error_line(_run(*_AGENT, "--tls-ca", str(garbage)))
    assert line == f"edge-agent: error: --tls-ca {garbage}: not a CA certificate file (no PEM certificate in it)"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes certificates with openssl")
def test_an_agent_given_a_key_of_another_certificate_says_so(tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path, "first")
    _, key = _self_signed(tmp_path, "second")
    line = _one_error_line(_run(*_AGENT, "--tls-ca", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)))
    assert line == (f"edge-agent: error: --tls-cert {cert}, --tls-key {key}: "
                    "the key does not belong to the certificate")


@pytest.mark.parametrize("level", ["info", "critical"])
def test_an_agent_that_gives_up_on_the_coordinator_says_so_in_one_line(level: str) -> None:
    line = _one_error_line(_run("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0",
                                "--give-up-after", "1", "--log-level", level))
    assert line.startswith("edge-agent: error: coordinator 127.0.0.1:1 unreachable; gave up (--give-up-after 1 s): "
                           "UNAVAILABLE "), line


@pytest.mark.parametrize("seconds", ["-1", "0", "nan", "inf"])
def test_give_up_after_must_be_a_positive_number_of_seconds(seconds: str) -> None:
    line = _one_error_line(_run("agent", "start", "--coordinator", "127.0.0.1:1", "--cores", "0",
                                "--give-up-after", seconds))
    assert line == f"edge-agent: error: --give-up-after must be a positive number of seconds, got {seconds}"


def test_the_agents_log_level_help_names_every_level_it_takes() -> None:
    proc = subprocess.run([sys.executable, "-m", "edgetrain.agent", "start", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "debug, info, warning, error or critical." in proc.stdout
    line = _one_error_line(_run(*_AGENT, "--log-level", "verbose"))
    assert line.startswith("edge-agent: error: --log-level takes ") and "critical" in line and "'verbose'" in line
