"""The pure parts of the benchmarks: parsing, planning, the gain column, tables, CSV and PNG writers."""

import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgetrain.coordinator import experiments as ex
from edgetrain.coordinator.experiments.baselines import steps_for
from edgetrain.coordinator.experiments.parallel import _fill_ratios as fill_ratios

from edgetrain.errors import ConfigError, CoresError
from edgetrain.pinned import core_groups
from edgetrain.records import NodeStats
from tests.conftest import round_record

EIGHT = list(range(8))
TWO = [0, 1]


def test_default_counts_are_powers_of_two_then_the_core_count() -> None:
    assert ex.default_affinity_counts(1) == [1]
    assert ex.default_affinity_counts(2) == [1, 2]
    assert ex.default_affinity_counts(8) == [1, 2, 4, 8]
    assert ex.default_affinity_counts(6) == [1, 2, 4, 6]


def test_affinity_counts_take_the_first_allowed_cores() -> None:
    assert ex.parse_affinity("1,2,4,8", EIGHT) == [[0], [0, 1], [0, 1, 2, 3], EIGHT]
    assert ex.parse_affinity("1,2", [4, 5, 6]) == [[4], [4, 5]]


def test_affinity_sets_are_separated_by_semicolons() -> None:
    assert ex.parse_affinity("0;0,1;0-3", EIGHT) == [[0], [0, 1], [0, 1, 2, 3]]
    assert ex.parse_affinity("0-3", EIGHT) == [[0, 1, 2, 3]]
    assert ex.parse_affinity("2,5;", EIGHT) == [[2, 5]]


def test_oversize_affinity_is_refused_naming_the_core_count() -> None:
    with pytest.raises(CoresError, match=r"affinity 4 needs 4 cores.*only 2 \(cores 0-1\)"):
        ex.parse_affinity("1,2,4", TWO)
    with pytest.raises(CoresError, match=r"cores 2-3 are not available.*\(2 cores\)"):
        ex.parse_affinity("0;0-3", TWO)
    with pytest.raises(CoresError):
        ex.parse_affinity("0", [])
    with pytest.raises(CoresError, match="at least one core"):
        ex.parse_affinity("0,1", TWO)


def test_layouts() -> None:
    assert ex.parse_layouts("1x2, 2x1", TWO) == [(1, 2), (2, 1)]
    assert core_groups(2, 2, EIGHT) == [[0, 1], [2, 3]]
    with pytest.raises(CoresError, match=r"layout 2x2 needs 4 cores.*only 2"):
        ex.parse_layouts("2x2", TWO)
    with pytest.raises(ConfigError, match="PxT"):
        ex.parse_layouts("2by1", TWO)


def test_plan_gives_every_method_the_same_samples() -> None:
    s = ex.BenchSettings(epochs=1.0, batch_size=64)
    plan = ex.plan_parallel(s, n_train=1000, agents=2, local_steps=8, target=False)
    assert plan.rounds == 1  # 1000 / (2 * 8 * 64) rounded up
    assert plan.samples == plan.rounds * 2 * 8 * 64 == plan.serial_steps * 64
    plan = ex.plan_parallel(ex.BenchSettings(epochs=3.0, batch_size=32), 10_000, 4, 2, True)
    assert plan.rounds == 118 and plan.serial_steps == 118 * 4 * 2 and plan.eval_every_round
    assert steps_for(1000, 64) == 16 and steps_for(1024, 64, 2) == 8


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="--epochs"):
        ex.BenchSettings(epochs=0)
    with pytest.raises(ConfigError, match="--repeats"):
        ex.BenchSettings(repeats=0)
    with pytest.raises(ConfigError, match="optimizer"):
        ex.BenchSettings(optimizer="lion")


def test_gain_vs_slowest_within_each_sweep() -> None:
    rows = [
        ex.AffinityRow("affinity", "1", 1, 1, "0", times_ms=[1000.0, 1200.0, 1100.0]),
        ex.AffinityRow("affinity", "2", 1, 2, "0-1", times_ms=[550.0, 550.0, 550.0]),
        ex.AffinityRow("layout", "2x1", 2, 1, "0;1", times_ms=[300.0]),
        ex.AffinityRow("layout", "1x2", 1, 2, "0-1", times_ms=[400.0]),
    ]
    ex.fill_gains(rows)
    assert rows[0].gain_vs_slowest_pct == 0.0
    assert rows[1].gain_vs_slowest_pct == pytest.approx(50.0)  # (1100 - 550) / 1100
    assert rows[2].gain_vs_slowest_pct == pytest.approx(25.0)
    assert rows[3].gain_vs_slowest_pct == 0.0


def test_startup_is_round_zeros_excess_over_a_typical_round() -> None:
    history = [round_record(duration_seconds=5.0), round_record(duration_seconds=0.5),
               round_record(duration_seconds=0.7), round_record(duration_seconds=0.6)]
    assert ex.startup_seconds(history) == pytest.approx(4.4)
    one = [round_record(duration_seconds=3.0,
                        nodes={"a": NodeStats(compute_seconds=0.5, communication_seconds=0.1)})]
    assert ex.startup_seconds(one) == pytest.approx(2.4)
    assert ex.startup_seconds([]) == 0.0


def _parallel_report(repeats: int = 2) -> ex.ParallelReport:
    s = ex.BenchSettings(repeats=repeats)
    plan = ex.plan_parallel(s, 1000, 2, 8, False)
    rows = [
        ex.ParallelRow("serial", "d", 1, 2, "0-1", times_s=[10.0, 12.0], targets_s=[None, None],
                       accuracies=[0.6, 0.62], samples=plan.samples),
        ex.ParallelRow("edgetrain", "d", 2, 1, "0;1", times_s=[6.0, 5.0], targets_s=[None, None],
                       accuracies=[0.58, 0.6], samples=plan.samples),
        ex.ParallelRow("torch-ddp", "d", 2, 1, "0;1", times_s=[8.0, 8.0], targets_s=[None, None],
                       accuracies=[0.59, 0.59], samples=plan.samples),
        ex.ParallelRow("gpu", "d", 1, 2, "cuda:0", note="skipped: no CUDA device"),
    ]
    fill_ratios(rows, None, repeats)
    machine = ex.Machine("cpu", TWO, 2, "2.x", "none", (0.1, 0.2, 0.3))
    return ex.ParallelReport(s, plan, ex.DataFacts(1000, 100, "text-cnn"), machine, None, rows)


def test_parallel_ratios_and_writers(tmp_path: Path) -> None:
    report = _parallel_report()
    edge = report.row("edgetrain")
    assert edge is not None and edge.time_s == 5.5
    assert edge.speedup_vs_serial == pytest.approx(11.0 / 5.5)
    assert edge.speedup_vs_ddp == pytest.approx(8.0 / 5.5)
    gpu = report.row("gpu")
    assert gpu is not None and gpu.skipped and gpu.speedup_vs_serial is None
    lines = ex.parallel_ratios(report)
    assert any("edgetrain vs torch DDP" in ln and "1.45" in ln for ln in lines)

    paths = ex.write_parallel(report, tmp_path / "out", command="coordinator bench parallel")
    assert [p.name for p in paths] == ["parallel.md", "parallel.csv", "parallel.png"]
    md = paths[0].read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    assert len(table) == 1 + len(report.rows)  # header + one row per method
    assert "`coordinator bench parallel`" in md
    with paths[1].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["serial", "edgetrain", "torch-ddp", "gpu"]
    assert float(rows[1]["time_s"]) == statistics.median([float(rows[1]["time_s_r1"]), float(rows[1]["time_s_r2"])])
    assert rows[3]["time_s"] == "" and rows[3]["note"].startswith("skipped")
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_affinity_writers(tmp_path: Path) -> None:
    s = ex.BenchSettings(repeats=3)
    rows = [ex.AffinityRow("affinity", "1", 1, 1, "0", times_ms=[100.0, 110.0, 120.0], accuracies=[0.5] * 3,
                           samples=640),
            ex.AffinityRow("affinity", "2", 1, 2, "0-1", times_ms=[90.0, 95.0, 200.0], accuracies=[0.5] * 3,
                           samples=640)]
    ex.fill_gains(rows)
    machine = ex.Machine("cpu", TWO, 2, "2.x", "none", (0.1, 0.2, 0.3))
    report = ex.AffinityReport(s, ex.DataFacts(600, 600, "text-cnn"), machine, 10, rows)
    paths = ex.write_affinity(report, tmp_path)
    with paths[1].open() as fh:
        got = list(csv.DictReader(fh))
    assert got[0]["time_ms_r3"] == "120.0"
    # the paper's column uses means: set 2's outlier (200 ms) makes it the slowest despite its lower median
    assert float(got[1]["gain_vs_slowest_pct"]) == 0.0
    assert float(got[0]["gain_vs_slowest_pct"]) == pytest.approx((385 / 3 - 110) / (385 / 3) * 100)
    assert float(got[1]["median_ms"]) == 95.0 and float(got[1]["samples_per_s"]) == pytest.approx(640 / 0.095)
    assert "% gain vs slowest" in paths[0].read_text()
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_markdown_table_shape() -> None:
    text = ex.markdown_table(["method", "time"], [["a", "1"], ["b|c", "2"]])
    lines = text.splitlines()
    assert lines[0] == "| method | time |" and lines[1] == "| --- | ---: |"
    assert lines[3] == "| b\\|c | 2 |"


def test_load_probe_sees_another_process_busy_on_one_core() -> None:
    if ex.machine_busy_seconds() is None:
        pytest.skip("no /proc/stat here")
    cpus = os.cpu_count() or 1
    spin = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin])  # one busy core that is not ours
    try:
        probe = ex.LoadProbe()
        time.sleep(1.0)
        share = probe.other_share()
        # a whole core of the machine's cpus; anything else running only adds to it
        assert share is not None and share >= 0.3 / cpus, share
        assert ex.wait_until_quiet(0) is None  # 0: do not wait
        busy = ex.wait_until_quiet(0.01, window=0.3)  # gives up at once: the child is still busy
        assert busy is not None and busy >= 0.3 / cpus, busy
    finally:
        child.wait(10)


def test_disturbed_runs_are_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    shares = iter([0.5, 0.4, 0.02])
    monkeypatch.setattr(ex.LoadProbe, "other_share", lambda self: next(shares))
    from edgetrain.coordinator.experiments import common  # measure() looks the name up in its own module

    monkeypatch.setattr(common, "wait_until_quiet", lambda max_wait, window=2.0: None)
    runs: list[int] = []

    def runner() -> object:
        runs.append(1)
        return len(runs)

    m = ex.measure(ex.BenchSettings(max_other_load=10), runner)  # type: ignore[arg-type]
    assert (m.outcome, m.reruns, m.other_load) == (3, 2, 0.02)
    shares = iter([0.5, 0.5])
    m = ex.measure(ex.BenchSettings(max_other_load=10, retries=1), runner)  # type: ignore[arg-type]
    assert m.reruns == 1 and m.other_load == 0.5  # out of retries: the last try is kept, its load shown
    with pytest.raises(ConfigError, match="--max-other-load"):
        ex.BenchSettings(max_other_load=0)
