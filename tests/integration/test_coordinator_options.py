"""The coordinator's CLI refuses bad options and unusable folders in one line, before any work and losing nothing."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

QUICK = ("--dataset", "tweets", "--model", "text-bag", "--limit", "300", "--port", "0", "--no-progress")


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"edgetrain.{args[0]}",
                           *args[1:]], capture_output=True, text=True, timeout=180, cwd=cwd)


def _one_line_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("coordinator: error: ") and message in lines[0], lines[0]


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _pem_pair(folder: Path, name: str, *key_args: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", *(key_args or (*EC_KEY, "-nodes")), "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", f"/CN={name}"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="makes certificates with openssl")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--log-level", "loud"), "--log-level takes debug, info, warning, error or critical, not 'loud'"),
        (("--metrics-port", "99999"), "--metrics-port 99999 out of range"),
        (("--resume",), "--resume needs --run-dir"),
        (("--weight-decay", "-1"), "weight decay must be zero or positive and finite, got -1.0"),
        (("--lr", "inf"), "learning rate must be positive and finite, got inf"),
        (("--dataset", "mnist", "--data-dir", "/nonexistent"), "mnist: --data-dir /nonexistent does not exist"),
        (("--dataset", "mnist", "--data-path", "x.csv"), "pass --data-dir instead of --data-path"),
        (("--token-file", "/nonexistent.token"),
         "cannot read token file /nonexistent.token: No such file or directory"),
        (("--token-file", "/dev/null"), "token file /dev/null is empty"),
        (("--tls-client-ca", "/dev/null"), "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
        (("--aggregator", "max"), "unknown aggregator 'max'; choose from mean, median, trimmed-mean"),
        (("--shard-scheme", "round-robin"), "unknown shard scheme 'round-robin'; choose from iid, dirichlet"),
        (("--update-dtype", "int4"), "unknown update dtype 'int4'; choose from float32, float16, bfloat16, int8"),
        (("--metric", "f1"), "unknown --metric 'f1'; choose from accuracy, macro-f1, macro-recall or f1:<class>"),
        (("--metric", "f1:sarcasm"), "--metric f1:sarcasm: no class 'sarcasm'; classes: negative, neutral, positive"),
        (("--target", "2"), "--target is a fraction in (0, 1], got 2.0"),
        (("--target", "0.5", "--target-accuracy", "0.6"), "--target-accuracy is --target with --metric accuracy"),
        (("--target-accuracy", "0.6", "--metric", "macro-f1"), "--target-accuracy judges accuracy, not --metric"),
        (("--class-weighting", "lots"), "unknown class weighting 'lots'; choose from none, balanced, auto"),
        (("--test-path", "x.csv"), "tweets has its own splits; --test-path and --val-path are for csv and tsv"),
        (("--dataset", "tweeteval"), "tweeteval needs --data-dir: a TweetEval task's folder"),
    ],
)
def test_bad_values_are_one_line(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    # --join-timeout: a bad value taken by mistake ends in a few seconds (waiting for agents), not at the timeout
    _one_line_error(_run("coordinator", "run", "--rounds", "1", *QUICK, "--join-timeout", "2", *args, cwd=tmp_path),
                    message)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no empty run folder left


def test_gpus_torch_cannot_see_are_refused_before_anything_starts() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA devices")
    _one_line_error(_run("coordinator", "run", "--rounds", "1", *QUICK, "--local-gpus", "0"),
                    "--local-gpus 0: torch sees 0 CUDA device(s) here, so no cuda:0")


@needs_openssl
def test_tls_files_that_are_no_certificate_or_do_not_match_are_named(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert_a, _ = _pem_pair(tmp_path, "a")
    _, key_b = _pem_pair(tmp_path, "b")
    base = ("coordinator", "run", "--rounds", "1", *QUICK)
    _one_line_error(_run(*base, "--tls-cert", str(garbage), "--tls-key", str(garbage)),
                    f"--tls-cert {garbage}, --tls-key {garbage}: not a PEM certificate and its private key")
    _one_line_error(_run(*base, "--tls-cert", str(cert_a), "--tls-key", str(key_b)),
                    "the key does not belong to the certificate")
    _one_line_error(_run(*base, "--tls-cert", str(cert_a), "--tls-key", str(tmp_path / "missing.key")),
                    "No such file or directory")
    cert_e, key_e = _pem_pair(tmp_path, "e", *EC_KEY, "-passout", "pass:secret")
    proc = subprocess.run([sys.executable, "-m", "edgetrain.coordinator", "run", "--rounds", "1", *QUICK, "--tls-cert",
                           str(cert_e), "--tls-key", str(key_e)], capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    _one_line_error(proc, f"--tls-key {key_e}: the key is encrypted; gRPC needs it unencrypted")  # and no prompt


@needs_openssl
def test_a_small_rsa_key_gRPC_takes_is_not_called_malformed(tmp_path: Path) -> None:
    """A 1024-bit RSA pair (self-signed, so also its own CA) that OpenSSL's default level refuses but gRPC serves."""
    import ssl

    from edgetrain.agent.client import CoordinatorClient, TLSFiles
    from edgetrain.coordinator.membership import Membership
    from edgetrain.coordinator.metrics import CoordinatorMetrics
    from edgetrain.coordinator.rounds import RoundEngine
    from edgetrain.coordinator.server import start_server
    from edgetrain.coordinator.service import ServiceState
    from prometheus_client import CollectorRegistry

    from edgetrain.cli_util import check_tls_ca, check_tls_pair
    from edgetrain.proto import edgetrain_pb2 as pb
    from edgetrain.spec import RunSpec

    cert, key = _pem_pair(tmp_path, "small", "-newkey", "rsa:1024", "-nodes",
                          "-addext", "subjectAltName=IP:127.0.0.1")
    with pytest.raises(ssl.SSLError):  # the premise: a default context refuses the pair
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    check_tls_pair(cert, key, "--tls-cert", "--tls-key")
    check_tls_ca(cert, "--tls-ca")
    # ...and gRPC takes them: a TLS server as the coordinator starts it, and an agent's Join trusting that CA.
    engine = RoundEngine({"w": torch.zeros(2)}, batch_size=4, local_steps=1, round_timeout=30.0)
    membership = Membership()
    state = ServiceState(engine, membership, RunSpec(dataset="tweets"), CoordinatorMetrics(CollectorRegistry()))
    server, port, _ = start_server(state, "127.0.0.1", 0, tls_cert=cert, tls_key=key)
    client = CoordinatorClient(f"127.0.0.1:{port}", tls=TLSFiles(ca=cert.read_bytes()))
    try:
        reply = client.join(pb.JoinRequest(agent_name="small-key", cores=[0], workers=1), give_up_after=0)
    finally:
        client.close()
        engine.finish()
        server.stop(grace=None).wait()
    assert reply.agent_id and [a.name for a in membership.live()] == ["small-key"]


def test_a_run_dir_that_cannot_be_a_folder_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ("coordinator", "run", "--rounds", "1", *QUICK)
    _one_line_error(_run(*base, "--run-dir", str(afile)), f"--run-dir {afile}: not a folder")
    _one_line_error(_run(*base, "--run-dir", str(afile / "sub")), f"--run-dir {afile / 'sub'}: cannot make the folder")


def test_resume_where_there_is_no_run_is_refused_and_makes_no_folder(tmp_path: Path) -> None:
    typo = tmp_path / "typo"
    _one_line_error(_run("coordinator", "run", "--rounds", "1", *QUICK, "--resume", "--run-dir", str(typo)),
                    f"--resume: {typo} holds no run to go on with (no checkpoint.safetensors, no rounds.jsonl)")
    assert not typo.exists()


def test_a_start_that_fails_leaves_no_folder_and_one_that_never_trained_leaves_no_log(tmp_path: Path) -> None:
    new = tmp_path / "new"
    _one_line_error(_run("coordinator", "run", "--rounds", "1", *QUICK, "--run-dir", str(new), "--dataset", "mnist",
                         "--data-dir", str(tmp_path / "nothing")), "does not exist")
    assert not new.exists()
    _one_line_error(_run("coordinator", "run", "--rounds", "1", *QUICK, "--run-dir", str(new), "--join-timeout", "0.5"),
                    "only 0 of --min-agents 1 ready")
    assert list(new.iterdir()) == []  # nothing trained, nothing logged: the folder takes a new run as it is


def test_a_run_that_stopped_before_its_first_checkpoint_is_resumed_from_round_0(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "rounds.jsonl").write_text('{"round": 0}\n{"round": 1, "torn')  # killed before any checkpoint
    _one_line_error(_run("coordinator", "run", "--rounds", "1", *QUICK, "--run-dir", str(run_dir)),
                    "holds a run already (rounds.jsonl): pass --resume")
    resumed = _run("coordinator", "run", "--rounds", "1", *QUICK, "--local-agents", "1", "--run-dir", str(run_dir),
                   "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from round 0" in resumed.stdout + resumed.stderr
    assert [line[:12] for line in (run_dir / "rounds.jsonl").read_text().splitlines()] == ['{"round": 0,']


def test_a_second_run_into_a_run_dir_is_refused_unless_resumed_and_loses_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _run("coordinator", "run", "--rounds", "1", *QUICK, "--local-agents", "1", "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr
    kept = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert {"rounds.jsonl", "checkpoint.safetensors", "model.safetensors"} <= set(kept)
    again = _run("coordinator", "run", "--rounds", "1", *QUICK, "--local-agents", "1", "--run-dir", str(run_dir))
    _one_line_error(again, f"--run-dir {run_dir} holds a run already (rounds.jsonl, checkpoint.safetensors, "
                           "model.safetensors): "
                           "pass --resume")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == kept
    resumed = _run("coordinator", "run", "--rounds", "2", *QUICK, "--local-agents", "1", "--run-dir", str(run_dir),
                   "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len((run_dir / "rounds.jsonl").read_text().splitlines()) == 2  # round 0 kept, round 1 added


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = _run("coordinator", "run", "--rounds", "1", *QUICK, "--local-agents", "1", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.mark.parametrize("other", [("--limit", "200"), ("--model", "text-cnn")], ids=["data", "model"])
def test_resume_onto_a_checkpoint_of_another_data_set_or_model_is_refused_and_loses_nothing(
        finished_run: Path, other: tuple[str, ...]) -> None:
    kept = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    proc = _run("coordinator", "run", "--rounds", "2", *QUICK, *other, "--run-dir", str(finished_run), "--resume",
                "--join-timeout", "2")
    _one_line_error(proc, f"checkpoint in {finished_run} is from another data set or model")
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == kept  # the log is not trimmed either


@pytest.mark.parametrize(("content", "message"), [
    (b"garbage\n", "cannot read {path}: not an edgetrain safetensors checkpoint"),
    (b"", "cannot read {path}: not an edgetrain safetensors checkpoint"),
    (None, "cannot read {path}: not an edgetrain safetensors checkpoint"),  # tensors, but not a checkpoint
])
def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "checkpoint.safetensors"
    if content is None:
        safetensors.torch.save_file({"x": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    proc = _run("coordinator", "run", "--rounds", "2", *QUICK, "--run-dir", str(tmp_path), "--resume")
    _one_line_error(proc, message.format(path=path))


def test_a_bit_flipped_checkpoint_is_refused_naming_the_file_and_loses_nothing(finished_run: Path,
                                                                                tmp_path: Path) -> None:
    """The outside probe of 2026-12-07: 4 KiB of the embedding set to 0xFF resumed silently and served NaNs."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    path = run_dir / "checkpoint.safetensors"
    blob = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", blob[:8])
    start, end = json.loads(blob[8:8 + size])["0.weight"]["data_offsets"]  # text-bag's embedding
    assert end - start > 4096
    blob[8 + size + start:8 + size + start + 4096] = b"\xff" * 4096
    path.write_bytes(blob)
    kept = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    proc = _run("coordinator", "run", "--rounds", "3", *QUICK, "--run-dir", str(run_dir), "--resume",
                "--local-agents", "1")
    _one_line_error(proc, f"{path} is damaged (its SHA-256 does not match: truncated or altered); refusing to load it")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == kept


def test_a_checkpoint_of_an_older_version_is_refused_with_the_way_out_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "rounds.jsonl").write_text('{"round": 0}\n')
    torch.save({"completed_rounds": 1, "state": {}, "marker": _Touch(marker)}, tmp_path / "checkpoint.pt")
    proc = _run("coordinator", "run", "--rounds", "2", *QUICK, "--run-dir", str(tmp_path), "--resume")
    _one_line_error(proc, f"{tmp_path / 'checkpoint.pt'} was written by an older edgetrain with torch.save (a "
                          "pickle), which this version never loads: finish that run with the edgetrain that started "
                          "it, or start a new run")
    assert not marker.exists()
    again = _run("coordinator", "run", "--rounds", "2", *QUICK, "--run-dir", str(tmp_path))
    _one_line_error(again, f"--run-dir {tmp_path} holds a run already (rounds.jsonl, checkpoint.pt): pass --resume")


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


@pytest.mark.parametrize("command", [
    ("bench", "affinity", "--dataset", "tweets", "--model", "text-bag", "--limit", "200", "--affinity", "1",
     "--epochs", "0.1", "--no-progress"),
    ("bench", "parallel", "--dataset", "tweets", "--model", "text-bag", "--limit", "200", "--epochs", "0.1",
     "--no-progress"),
])
def test_a_bench_out_that_cannot_be_a_folder_is_refused_before_it_trains(tmp_path: Path,
                                                                        command: tuple[str, ...]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(_run("coordinator", *command, "--out", str(afile)), f"--out {afile}: not a folder")


def test_a_report_out_that_cannot_be_a_folder_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "run"
    runs.mkdir()  # no log in it: --out is checked first
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(_run("coordinator", "report", str(runs), "--out", str(afile)), f"--out {afile}: not a folder")


def test_a_bench_or_report_that_fails_leaves_no_empty_out_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    bench = _run("coordinator", "bench", "affinity", "--dataset", "tweets", "--model", "text-bag", "--limit", "200",
                 "--affinity", "4096", "--no-progress", "--out", str(out))
    _one_line_error(bench, "affinity 4096 needs 4096 cores")
    assert not out.exists()
    _one_line_error(_run("coordinator", "report", str(tmp_path), "--out", str(out)), "no rounds.jsonl")
    assert not out.exists()


@pytest.mark.parametrize("model", ["model.safetensors", "model.pt"])
def test_a_folder_holding_only_a_final_model_is_not_offered_to_resume(tmp_path: Path, model: str) -> None:
    (tmp_path / model).write_bytes(b"x")
    proc = _run("coordinator", "run", "--rounds", "1", *QUICK, "--run-dir", str(tmp_path))
    _one_line_error(proc, f"--run-dir {tmp_path} holds a run already ({model}): name another folder")
