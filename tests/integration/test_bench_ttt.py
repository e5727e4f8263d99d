"""`coordinator bench parallel --until` for real on a tiny budget: rows, cadence, target detection, refusals.

The figures are whatever this machine gives; what is checked is that every method has its row, that every
method was evaluated after the same numbers of samples and stopped at its first evaluation at the target, and
that the time to target is read off that method's own trace.
"""

import csv
from pathlib import Path

import pytest
from edgetrain.coordinator.bench_ttt import first_reach
from edgetrain.coordinator.cli import make_app

from edgetrain.cli_util import run_app
from edgetrain.cores import allowed_cores

N_CORES = len(allowed_cores())
TARGET = 0.4  # a 3-class tweets model passes 40 % accuracy within its first pass over a few hundred tweets


def _trace(text: str) -> list[tuple[float, float]]:
    return [(float(t), float(v)) for t, v in (p.split(":") for p in text.split(";") if p)]


@pytest.mark.skipif(N_CORES < 2, reason="data parallelism needs two cores")
def test_every_method_to_a_low_target_on_the_same_cadence(tmp_path: Path) -> None:
    out = tmp_path / "ttt"
    code = run_app(make_app(), "coordinator", [
        "bench", "parallel", "--dataset", "tweets", "--model", "text-cnn", "--limit", "1200", "--epochs", "4",
        "--until", f"accuracy={TARGET}", "--ks", "2", "--eval-every-epochs", "0.5", "--agents", "2",
        "--no-progress", "--out", str(out)])
    assert code == 0
    with (out / "parallel-ttt.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    methods = [r["method"] for r in rows]
    # K=1, and the K search's best: K=2, the one candidate
    assert methods == ["serial", "torch-ddp", "edgetrain K=1", "edgetrain K=2", "gpu", "ceiling"]
    by = {r["method"]: r for r in rows}
    if not by["gpu"]["time_to_target_s"]:
        assert by["gpu"]["note"] == "skipped: torch sees no CUDA device"
    cadence = int(rows[0]["eval_every_samples"])
    serial_t = float(by["serial"]["time_to_target_s"])
    for r in (r for r in rows if r["method"] in ("serial", "torch-ddp") or r["method"].startswith("edgetrain")):
        trace = _trace(r["trace"])
        assert trace, r["method"]
        assert int(r["samples"]) == len(trace) * cadence, r["method"]  # evaluated after every `cadence` samples
        times = [t for t, _ in trace]
        assert times == sorted(times) and times[0] > 0
        reached = first_reach(trace, TARGET)
        assert reached is not None, r["method"]  # the budget is ample for this target
        assert float(r["time_to_target_s"]) == pytest.approx(reached, abs=1e-3)
        assert trace[-1][0] == pytest.approx(reached, abs=1e-3)  # stopped at the first evaluation at the target
        assert all(v < TARGET for _, v in trace[:-1])
        assert float(r["final_figure"]) == pytest.approx(trace[-1][1], abs=1e-5)
        assert float(r["speedup_vs_serial"]) == pytest.approx(serial_t / float(r["time_to_target_s"]), rel=1e-3)
    ceiling = by["ceiling"]
    assert float(ceiling["samples_per_s"]) > 0 and float(ceiling["speedup_vs_serial"]) > 0
    md = (out / "parallel-ttt.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    assert len(table) == 1 + len(rows)
    assert "K search:" in md and "Hyper-parameter rule:" in md
    assert (out / "parallel-ttt.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("args", "says"), [
    (["--until", "accuracy"], "METRIC=VALUE"),
    (["--until", "accuracy=2"], "fraction"),
    (["--until", "accuracy=0.5", "--ks", "0,4"], "--ks"),
    (["--until", "accuracy=0.5", "--target-accuracy", "0.5"], "give one of them"),
    (["--until", "accuracy=0.5", "--eval-every-epochs", "0"], "--eval-every-epochs"),
])
def test_bad_options_are_refused_in_one_line(args: list[str], says: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    code = run_app(make_app(), "coordinator", ["bench", "parallel", "--limit", "300", "--no-progress", *args,
                                               "--out", str(out)])
    assert code != 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("coordinator: error:") and says in lines[0]
    assert not out.exists()  # refused before anything ran
