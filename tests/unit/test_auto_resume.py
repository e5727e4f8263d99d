"""`coordinator run --auto-resume`: a restarted pod goes on with its run, a fresh volume starts one, unattended."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

QUICK = ("--dataset", "tweets", "--model", "text-bag", "--limit", "300", "--port", "0", "--no-progress",
         "--local-agents", "1")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgetrain.coordinator", "run", *args], capture_output=True, text=True,
                          timeout=180)


def _one_line_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("coordinator: error: ") and message in lines[0], proc.stderr


def test_auto_resume_needs_a_run_dir() -> None:
    _one_line_error(_run("--auto-resume", *QUICK), "--auto-resume needs --run-dir")


def test_the_first_start_begins_a_run_and_a_restart_goes_on_with_it(tmp_path: Path) -> None:
    volume = tmp_path / "pvc"
    volume.mkdir()  # a mounted volume exists before the program starts; the run folder inside it may not
    run_dir = volume / "run"
    first = _run("--rounds", "1", *QUICK, "--run-dir", str(run_dir), "--auto-resume")
    assert first.returncode == 0, first.stderr
    assert "resuming" not in first.stdout + first.stderr
    assert len((run_dir / "rounds.jsonl").read_text().splitlines()) == 1
    restarted = _run("--rounds", "3", *QUICK, "--run-dir", str(run_dir), "--auto-resume")
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming from round 1" in restarted.stdout + restarted.stderr
    rounds = [line for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 3 and '"round": 0' in rounds[0] and '"round": 2' in rounds[2]


def test_a_folder_holding_something_else_is_still_refused(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"x")  # no log, no checkpoint: no run to go on with, and not empty
    _one_line_error(_run("--rounds", "1", *QUICK, "--run-dir", str(tmp_path), "--auto-resume"),
                    f"--run-dir {tmp_path} holds a run already (model.pt): name another folder")
