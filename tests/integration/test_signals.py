"""`coordinator run` stopped by a signal: Ctrl-C (SIGINT to the whole process group) or a service manager's
SIGTERM to the coordinator alone. Either is a stop by request: exit 0, the summary says "(stop)", the last
checkpoint holds every logged round, the final model is written, and nothing of the run is left behind
(local agents, their workers, the same-host files in /dev/shm).

The coordinator is a real `python -m edgetrain.coordinator run` process in its own session, with one local agent on
real gRPC over loopback (port 0).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from edgetrain.coordinator import checkpoint

from edgetrain.samehost import DIR_PREFIX, SHM_ROOT
from edgetrain.spec import RunSpec
from edgetrain.training import evaluate
from edgetrain.workload import load_workload
from tests.integration.test_faults import wait_for

ROOT = Path(__file__).resolve().parents[2]


def session_members(sid: int) -> list[psutil.Process]:
    """Live processes whose session id is `sid` (zombies are dead: they only wait to be reaped)."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (OSError, psutil.Error):  # gone meanwhile
            continue
    return members


def logged_lines(log: Path) -> list[str]:
    """Whole lines of rounds.jsonl (a line still being written has no newline yet)."""
    if not log.exists():
        return []
    text = log.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def shm_dirs(pid: int) -> list[Path]:
    return sorted(SHM_ROOT.glob(f"{DIR_PREFIX}{pid}-*")) if SHM_ROOT.is_dir() else []


@pytest.mark.parametrize("how", ["sigint-to-group", "sigterm-to-coordinator"])
def test_a_signal_stops_the_run_cleanly_with_a_checkpoint_of_every_logged_round(tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "run"
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # text-bag on 2,000 tweets, 2 local steps: rounds of a few ms, so many are done by the time the signal lands.
    # No periodic checkpoint: the one read below is the one written at the stop.
    cmd = [sys.executable, "-m", "edgetrain.coordinator", "run", "--dataset", "tweets", "--model", "text-bag",
           "--limit", "2000", "--local-agents", "1", "--rounds", "100000", "--local-steps", "2",
           "--eval-every", "1", "--checkpoint-every", "1000000", "--run-dir", str(run_dir), "--port", "0",
           "--no-progress", "--no-download", "--cache-dir", str(tmp_path / "cache"), "--round-timeout", "60"]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        coord = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                 env={**os.environ, "COLUMNS": "200"})
    sid = coord.pid  # its own session: the local agent and its worker join it

    def output() -> str:
        return f"--- stdout\n{out_path.read_text(errors='replace')}\n--- stderr\n{err_path.read_text(errors='replace')}"

    try:
        log = run_dir / "rounds.jsonl"

        def trained_two_rounds() -> bool:
            assert coord.poll() is None, f"the coordinator exited early ({coord.returncode})\n{output()}"
            return len(logged_lines(log)) >= 2

        wait_for(trained_two_rounds, 120, "two logged rounds")
        before = session_members(sid)
        # the coordinator, its local agent and the agent's training worker at least: "all gone" means something
        assert len(before) >= 3, [p.cmdline() for p in before]
        assert shm_dirs(coord.pid), "the same-host fast path made no /dev/shm directory to clean up"

        if how == "sigint-to-group":
            os.killpg(sid, signal.SIGINT)  # as Ctrl-C in a terminal: every process of the foreground group
        else:
            os.kill(coord.pid, signal.SIGTERM)  # as `systemctl stop` / `docker stop`: the main process only
        code = coord.wait(timeout=90)
        text = output()
        assert code == 0, text  # a stop by request is a clean end, not a failure
        assert "(stop)" in out_path.read_text(), text  # the summary table's title says why the run ended

        lines = logged_lines(log)
        assert log.read_text().endswith("\n"), "rounds.jsonl ends with a torn line"
        ck = checkpoint.load(run_dir)
        assert ck.completed_rounds == len(lines) >= 2, (ck.completed_rounds, len(lines))
        assert f"{ck.completed_rounds} rounds in" in out_path.read_text(), text
        model = checkpoint.load_model(run_dir / checkpoint.MODEL)
        assert model.keys() == ck.state.keys()
        # the final model is the round best on val, a logged one: evaluated again it scores what that round logged
        kept = json.loads((run_dir / "result.json").read_text())["round"]
        assert 1 <= kept <= ck.completed_rounds
        wl = load_workload(RunSpec(dataset="tweets", model="text-bag", limit=2000))
        net = wl.new_model()
        net.load_state_dict(model)
        assert wl.data.val is not None
        val = evaluate(net, wl.data.val.x, wl.data.val.y, wl.data.num_classes)
        assert val.accuracy == json.loads(lines[kept - 1])["val_accuracy"]
        if kept == ck.completed_rounds:  # the last round: the checkpoint's model, nothing trained after it
            assert all(torch.equal(tensor, ck.state[name]) for name, tensor in model.items())

        wait_for(lambda: not session_members(sid), 30, "every process of the run to exit")
        assert not shm_dirs(coord.pid), shm_dirs(coord.pid)
    finally:
        if coord.poll() is None:
            os.killpg(sid, signal.SIGKILL)
            coord.wait(10)
        for p in session_members(sid):  # agents or workers the coordinator left behind
            try:
                p.kill()
            except psutil.Error:
                pass
        for d in shm_dirs(coord.pid):
            shutil.rmtree(d, ignore_errors=True)
