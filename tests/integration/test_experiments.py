"""`coordinator bench parallel|affinity` for real on a tiny budget: the tables' shape and arithmetic.

The numbers themselves are whatever this machine gives; what is checked is that every configuration has
its row, that the derived columns follow from the measured ones in the CSV, and that impossible core
sets are refused in one line naming how many cores there are.
"""

import csv
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from edgetrain.coordinator.cli import make_app

from edgetrain.cli_util import run_app
from edgetrain.cores import allowed_cores
from edgetrain.errors import ConfigError

N_CORES = len(allowed_cores())
TINY = ["--limit", "600", "--epochs", "1", "--repeats", "2", "--no-progress"]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _md_rows(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| ---")][1:]


def test_bench_parallel_rows_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    code = run_app(make_app(), "coordinator", ["bench", "parallel", *TINY, "--target-accuracy", "0.3",
                                               "--out", str(out)])
    assert code == 0
    rows = _csv(out / "parallel.csv")
    methods = [r["method"] for r in rows]
    assert methods == ["serial", "edgetrain", "torch-single", "torch-ddp", "gpu"]
    for column in ("time_s_r1", "time_s_r2", "time_s", "time_to_target_s", "test_accuracy", "samples",
                   "samples_per_s", "speedup_vs_serial", "speedup_vs_ddp", "processes", "threads_per_process",
                   "other_load_max_pct"):
        assert column in rows[0]
    by = {r["method"]: r for r in rows}
    serial_time = float(by["serial"]["time_s"])
    ddp_time = float(by["torch-ddp"]["time_s"])
    measured = [r for r in rows if r["time_s"]]
    assert {r["method"] for r in measured} >= {"serial", "edgetrain", "torch-single", "torch-ddp"}
    samples = {int(r["samples"]) for r in measured}
    assert len(samples) == 1  # every method trained on the same number of examples
    for r in measured:
        times = [float(r["time_s_r1"]), float(r["time_s_r2"])]
        t = float(r["time_s"])
        assert all(x > 0 for x in times)
        assert t == pytest.approx(statistics.median(times))
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert float(r["speedup_vs_serial"]) == pytest.approx(serial_time / t)
        assert float(r["speedup_vs_ddp"]) == pytest.approx(ddp_time / t)
        assert float(r["samples_per_s"]) == pytest.approx(int(r["samples"]) / t)
        if r["other_load_max_pct"]:
            assert 0.0 <= float(r["other_load_max_pct"]) <= 100.0
        if r["time_to_target_s"]:
            assert 0 < float(r["time_to_target_s"]) <= t + 1e-6
    assert by["torch-ddp"]["processes"] == by["edgetrain"]["processes"] == str(N_CORES)
    if not by["gpu"]["time_s"]:
        assert by["gpu"]["note"] == "skipped: no CUDA device"
    assert len(_md_rows(out / "parallel.md")) == len(rows)
    assert (out / "parallel.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_affinity_rows_and_gain(tmp_path: Path) -> None:
    out = tmp_path / "affinity"
    counts = "1,2" if N_CORES >= 2 else "1"
    layout = "2x1" if N_CORES >= 2 else "1x1"
    code = run_app(make_app(), "coordinator", ["bench", "affinity", *TINY, "--affinity", counts, "--layout", layout,
                                               "--out", str(out)])
    assert code == 0
    rows = _csv(out / "affinity.csv")
    assert [(r["sweep"], r["affinity"]) for r in rows] == [
        *(("affinity", c) for c in counts.split(",")), ("layout", layout)]
    for column in ("time_ms_r1", "time_ms_r2", "mean_ms", "median_ms", "gain_vs_slowest_pct", "test_accuracy",
                   "samples_per_s", "other_load_max_pct"):
        assert column in rows[0]
    for sweep in ("affinity", "layout"):
        group = [r for r in rows if r["sweep"] == sweep]
        means = [statistics.fmean([float(r["time_ms_r1"]), float(r["time_ms_r2"])]) for r in group]
        slowest = max(means)
        for r, mean in zip(group, means, strict=True):
            assert float(r["mean_ms"]) == pytest.approx(mean)
            assert float(r["gain_vs_slowest_pct"]) == pytest.approx((slowest - mean) / slowest * 100)
            assert 0.0 <= float(r["test_accuracy"]) <= 1.0
            median = statistics.median([float(r["time_ms_r1"]), float(r["time_ms_r2"])])
            assert float(r["samples_per_s"]) == pytest.approx(int(r["samples"]) / (median / 1000))
        assert min(float(r["gain_vs_slowest_pct"]) for r in group) == 0.0
    assert rows[0]["cores"] == str(allowed_cores()[0])
    assert len(_md_rows(out / "affinity.md")) == len(rows)
    assert (out / "affinity.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args", [
    ["--affinity", str(N_CORES + 1)],
    ["--affinity", f"0;0-{max(allowed_cores()) + 1}"],
    ["--layout", f"{N_CORES + 1}x1"],
])
def test_oversize_sets_are_refused_in_one_line(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgetrain.coordinator", "bench", "affinity", *args, "--out",
                           str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("coordinator: error:")
    assert f"{N_CORES} cores" in lines[0] or f"only {N_CORES}" in lines[0]
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_every_loop_trains_the_planned_steps_and_evaluates_on_cadence() -> None:
    from edgetrain.coordinator.experiments import edgetrain_serial
    from edgetrain.coordinator.experiments.baselines import TrainJob, combine, torch_single

    from edgetrain.pinned import run_pinned
    from edgetrain.spec import RunSpec

    # 600 examples, batch 64: the 25 steps cross two epoch boundaries (the learning rate decays there)
    job = TrainJob(RunSpec(dataset="tweets", limit=600), steps=25, eval_every=8, target_accuracy=0.01)
    for target in (edgetrain_serial, torch_single):
        out = combine(run_pinned(target, [allowed_cores()[:1]], job))
        assert out.samples == 25 * 64
        assert len(out.evals) == 4  # after steps 8, 16, 24 and the last
        assert [a for _, a in out.evals][-1] == out.accuracy
        assert out.time_to_target == out.evals[0][0]
        assert out.cores == tuple(allowed_cores()[:1]) and out.threads == 1
        assert 0 < out.train_seconds < out.seconds


@pytest.mark.skipif(N_CORES < 2, reason="the lock-step pair needs two cores")
def test_lockstep_pair_waits_every_sync_every_steps_on_its_own_shards() -> None:
    from edgetrain.coordinator.experiments.baselines import TrainJob, combine, torch_lockstep

    from edgetrain.pinned import run_pinned
    from edgetrain.spec import RunSpec

    cores = allowed_cores()
    job = TrainJob(RunSpec(dataset="tweets", limit=600), steps=10, sync_every=4)
    outs = run_pinned(torch_lockstep, [cores[:1], cores[1:2]], job)
    for rank, out in enumerate(outs):
        assert out.barriers == 3  # after steps 4 and 8, and the last
        assert out.samples == 10 * 64
        assert out.cores == (cores[rank],) and out.threads == 1
    assert combine(outs).barriers == 3 and combine(outs).samples == 2 * 10 * 64
    with pytest.raises(ConfigError, match="sync_every"):
        TrainJob(RunSpec(dataset="tweets", limit=600), sync_every=0)
