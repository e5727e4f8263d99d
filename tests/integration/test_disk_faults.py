"""Disk faults on a real small filesystem (a tmpfs this test mounts, filled with a ballast file).

The checkpoint's folder fills up mid-run: the coordinator stops with one error line, its agents hear that the run
FAILED (never FINISHED) and exit 1, the previous checkpoint stays loadable, and `--resume` goes on once space is
freed. The staging folder fills up: that update is refused UNAVAILABLE and counted, the model is unchanged, and
the run goes on. Skipped with the reason where a tmpfs cannot be mounted; failed under CI=true.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from edgetrain.coordinator import checkpoint

from tests.conftest import free_port
from tests.integration.conftest import make_service
from tests.integration.test_faults import CORES, ROOT, Procs, _rounds, procs, wait_for  # noqa: F401
from tests.integration.test_grpc_servicer import open_round, snapshot, update
from tests.smallfs import fill, free_bytes, tmpfs

QUICK = ["--dataset", "tweets", "--model", "text-bag", "--limit", "300", "--seed", "3", "--local-steps", "2",
         "--eval-every", "1000", "--checkpoint-every", "1", "--no-progress"]


def _last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def test_a_full_disk_at_a_checkpoint_fails_the_run_agents_exit_1_and_resume_goes_on(tmp_path: Path,
                                                                                     procs: Procs) -> None:  # noqa: F811
    with tmpfs(tmp_path / "fs", 16 << 20) as fs:  # room for a checkpoint (~1 MB), its temp copy and the model
        run_dir, port = fs / "run", free_port()
        coordinator = procs.start("coordinator", ["coordinator", "run", *QUICK, "--rounds", "500", "--port",
                                                  str(port), "--run-dir", str(run_dir), "--round-timeout", "20",
                                                  "--join-timeout", "120"])
        agent = procs.agent("a", port, CORES[0])
        log = run_dir / "rounds.jsonl"
        wait_for(lambda: len(_rounds(log)) >= 3 or coordinator.poll() is not None, 120, "3 rounds")
        assert coordinator.poll() is None, procs.logs()
        size = (run_dir / checkpoint.LATEST).stat().st_size
        assert size > 128 << 10, size  # the log keeps some room, a new checkpoint finds none
        ballast = fill(fs, leave=64 << 10)
        assert free_bytes(fs) < size

        assert coordinator.wait(60) == 1, procs.logs()
        out = procs.log("coordinator")
        assert "Traceback" not in out, out
        kept = checkpoint.load(run_dir)  # the previous checkpoint, whole
        stopped = _rounds(log)[-1] + 1
        assert _last_line(out) == (
            f"coordinator: error: cannot write {run_dir / checkpoint.LATEST}: No space left on device (ENOSPC); "
            f"the run stopped after {stopped} rounds, its checkpoint after {kept.completed_rounds} rounds is intact; "
            f"free space, then coordinator run --resume --run-dir {run_dir}")
        assert kept.completed_rounds == stopped - 1 >= 3  # only the round whose checkpoint failed is lost
        assert not list(run_dir.glob(".*.tmp"))

        assert agent.wait(30) == 1, procs.logs()  # told the run failed: never "finished", never exit 0
        said = procs.log("a")
        assert "Traceback" not in said, said
        assert _last_line(said) == (
            "edge-agent: error: the coordinator stopped the run on an error: "
            f"cannot write {run_dir / checkpoint.LATEST}: No space left on device (ENOSPC); the run stopped after "
            f"{stopped} rounds, its checkpoint after {kept.completed_rounds} rounds is intact; free space, then "
            f"coordinator run --resume --run-dir {run_dir}")

        ballast.unlink()  # space freed: the run goes on from its checkpoint
        resumed = subprocess.run(
            [sys.executable, "-m", "edgetrain.coordinator", "run", *QUICK, "--rounds", str(stopped + 2), "--port", "0",
             "--run-dir", str(run_dir), "--resume", "--local-agents", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming from round {kept.completed_rounds}" in resumed.stdout + resumed.stderr
        assert _rounds(log) == list(range(stopped + 2))  # each round once: the failed one ran again
        assert checkpoint.load(run_dir).completed_rounds == stopped + 2
        assert checkpoint.load_model(run_dir / checkpoint.MODEL).keys() == kept.state.keys()


def test_a_full_staging_folder_refuses_the_update_unavailable_keeps_the_model_and_the_run_goes_on(
        tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {"fc.weight": torch.randn(256, 256, generator=g), "fc.bias": torch.randn(256, generator=g)}  # 257 KiB
    with tmpfs(tmp_path / "fs", 1 << 20) as fs:
        for svc in make_service(state, staging_dir=fs):
            agent_id, md = open_round(svc, "a")["a"]
            before = snapshot(svc)
            trained = {k: v + 1 for k, v in state.items()}
            ballast = fill(fs, leave=16 << 10)
            with pytest.raises(grpc.RpcError) as err:
                svc.stub.SubmitUpdate(iter(update(agent_id, 0, 8, trained)), metadata=md, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the agent asks for work again
            assert err.value.details() == ("the coordinator could not stage this update "
                                           "([Errno 28] No space left on device)")
            assert svc.refused("staging") == 1.0
            assert snapshot(svc) == before  # nothing of it reached the model or the round's sum
            assert list(fs.iterdir()) == [ballast]  # and no file was left behind
            ballast.unlink()  # room again: the agent asks for work again and its update goes through
            ack = svc.stub.SubmitUpdate(iter(update(agent_id, 0, 8, trained)), metadata=md, timeout=30)
            assert ack.detail == "round 0"
            assert svc.engine.close_round().applied
            assert snapshot(svc) == {k: v.numpy().tobytes() for k, v in trained.items()}
            assert svc.refused("staging") == 1.0
