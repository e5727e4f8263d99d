"""`coordinator report RUN_DIR`: a run log as written by coordinator/run.py, turned into PNG plots."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from edgetrain.coordinator.report import ReportError, read_log, training_times, write_report
from edgetrain.coordinator.runlog import RoundRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]


def node(samples: int, compute: float, comm: float, acc: float) -> dict[str, float]:
    return {"samples": samples, "compute_seconds": compute, "communication_seconds": comm, "loss": 1.0 - acc,
            "accuracy": acc, "samples_per_second": samples / compute, "bytes": 4_000_000.0}


def make_records(rounds: int = 8, eval_every: int = 2, start_round: int = 0) -> list[dict[str, Any]]:
    """Records with exactly the fields Coordinator.run writes; agent-c joins at round 3, agent-b misses round 5."""
    records, elapsed = [], 0.0
    computed: dict[str, float] = {}
    for r in range(start_round, start_round + rounds):
        nodes = {"agent-a": node(256, 0.30 + 0.01 * r, 0.05, 0.40 + 0.04 * r)}
        missing = []
        if r == 5:
            missing.append("agent-b")
        else:
            nodes["agent-b"] = node(256, 0.35, 0.07, 0.38 + 0.04 * r)
        if r >= 3:
            nodes["agent-c"] = node(128, 0.20, 0.02, 0.5)
        duration = max(n["compute_seconds"] for n in nodes.values()) + 0.1
        elapsed += duration
        samples = sum(int(n["samples"]) for n in nodes.values())
        record: dict[str, Any] = {
            "round": r, "duration_seconds": duration, "sync_overhead_seconds": 0.1, "samples": samples,
            "samples_per_second": samples / duration, "missing": missing, "nodes": nodes,
        }
        if (r + 1) % eval_every == 0 or r == start_round + rounds - 1:
            record.update(accuracy=0.45 + 0.03 * r, loss=1.1 - 0.05 * r, macro_f1=0.4 + 0.03 * r,
                          macro_recall=0.41 + 0.03 * r, metric=0.45 + 0.03 * r)  # the run's --metric (accuracy)
            record.update(val_accuracy=0.46 + 0.03 * r, val_loss=1.0 - 0.05 * r, val_macro_f1=0.41 + 0.03 * r,
                          val_macro_recall=0.42 + 0.03 * r, val_metric=0.46 + 0.03 * r)
        record["elapsed_seconds"] = elapsed
        for name, n in nodes.items():
            computed[name] = computed.get(name, 0.0) + n["compute_seconds"]
        record["training_share"] = sum(computed.values()) / len(computed) / elapsed  # mean over the nodes so far
        record.update(local_steps=8, update_dtype="float32")  # what the round asked for
        records.append(record)
    return records


def write_log(run_dir: Path, lines: list[str]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "rounds.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def dumps(records: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(r) for r in records]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"  # complete, not truncated
    return width, height


def assert_sensible_png(path: Path) -> None:
    width, height = png_size(path)
    assert 600 <= width <= 3000 and 300 <= height <= 2000, (width, height)
    assert path.stat().st_size > 10_000  # axes, lines and text, not an empty canvas
    import matplotlib.image

    pixels = matplotlib.image.imread(path)  # decodes: a valid PNG
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # something is drawn on it


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgetrain.coordinator", "report",
                           *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)


# ---- write_report


def test_report_writes_two_valid_pngs_of_sensible_size(tmp_path: Path) -> None:
    run_dir = tmp_path / "tweets-20250101-120000"
    write_log(run_dir, dumps(make_records()))
    out = tmp_path / "plots"
    paths = write_report(run_dir, out)
    assert [p.name for p in paths] == ["accuracy.png", "round_time.png"]
    assert all(p.parent == out and p.exists() for p in paths)
    for path in paths:
        assert_sensible_png(path)
    assert not (run_dir / "accuracy.png").exists()  # written where asked


def test_report_on_a_single_round_and_without_evaluated_rounds(tmp_path: Path) -> None:
    one = make_records(rounds=1)
    write_log(tmp_path / "one", dumps(one))
    for path in write_report(tmp_path / "one", tmp_path / "one"):
        assert_sensible_png(path)
    unevaluated = [{k: v for k, v in r.items() if k not in ("accuracy", "loss", "macro_f1", "macro_recall")}
                   for r in make_records(rounds=3)]
    write_log(tmp_path / "noeval", dumps(unevaluated))
    for path in write_report(tmp_path / "noeval", tmp_path / "noeval"):
        assert_sensible_png(path)


def test_read_log_skips_blank_lines_and_keeps_order(tmp_path: Path) -> None:
    records = make_records(rounds=4)
    lines = dumps(records)
    write_log(tmp_path, [lines[0], "", lines[1], "   ", *lines[2:]])
    assert [r.to_json() for r in read_log(tmp_path)] == records  # every field read back as written


def test_training_time_continues_across_a_resume() -> None:
    # --resume appends to the same log and the new process counts elapsed_seconds from 0 again.
    first = make_records(rounds=4)
    second = make_records(rounds=3, start_round=4)
    times = training_times([RoundRecord.from_json(r) for r in first + second])
    end_of_first = first[-1]["elapsed_seconds"]
    assert times[:4] == [r["elapsed_seconds"] for r in first]
    assert times[4:] == [end_of_first + r["elapsed_seconds"] for r in second]
    assert times == sorted(times)


def test_report_of_a_resumed_run(tmp_path: Path) -> None:
    write_log(tmp_path, dumps(make_records(rounds=4) + make_records(rounds=3, start_round=4)))
    for path in write_report(tmp_path, tmp_path):
        assert_sensible_png(path)


# ---- bad logs


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ('{"round": 3, "duration_sec', "not JSON"),  # a torn last line
        ("round 3 took 1.2 s", "not JSON"),
        ("[1, 2]", "not a round record"),
        ("NaN", "not a round record"),
        ('{"round": 3}', "not a round record"),
        ("{}", "not a round record"),
    ],
)
def test_a_malformed_line_names_the_file_and_line(tmp_path: Path, bad: str, why: str) -> None:
    lines = dumps(make_records(rounds=4))
    path = write_log(tmp_path, [lines[0], "", lines[1], bad, lines[2]])  # blank lines count for the number
    with pytest.raises(ReportError) as err:
        write_report(tmp_path, tmp_path)
    assert str(err.value).startswith(f"{path}:4: {why}"), str(err.value)
    assert not (tmp_path / "accuracy.png").exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.pop("nodes"), "nodes"),
        (lambda r: r.update(elapsed_seconds="12.5"), "elapsed_seconds"),
        (lambda r: r.update(round=None), "round"),
        (lambda r: r.update(accuracy=[0.5]), "accuracy"),
        (lambda r: r["nodes"].update({"agent-a": 3}), "nodes.agent-a"),
        (lambda r: r["nodes"]["agent-b"].pop("compute_seconds"), "nodes.agent-b.compute_seconds"),
        (lambda r: r["nodes"]["agent-a"].update(accuracy=True), "nodes.agent-a.accuracy"),
        (lambda r: r.update(missing=None), "missing"),
        (lambda r: r.update(missing=3), "missing"),
        (lambda r: r.update(missing=[1]), "missing"),
    ],
)
def test_a_record_missing_what_the_plots_need_names_the_field(tmp_path: Path, change: Any, field: str) -> None:
    records = make_records(rounds=3)
    change(records[1])
    path = write_log(tmp_path, dumps(records))
    with pytest.raises(ReportError, match=rf"^{path}:2: not a round record \({field}\b"):
        read_log(tmp_path)


def test_missing_and_empty_logs(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no rounds.jsonl in"):
        read_log(tmp_path)
    write_log(tmp_path, ["", "  "])
    with pytest.raises(ReportError, match="is empty"):
        read_log(tmp_path)
    (tmp_path / "rounds.jsonl").write_bytes(b'{"round": \xff}\n')
    with pytest.raises(ReportError, match="cannot read"):
        read_log(tmp_path)


# ---- the command line


def test_cli_writes_the_pngs_into_the_run_dir_and_prints_their_paths(tmp_path: Path) -> None:
    write_log(tmp_path, dumps(make_records()))
    proc = run_cli(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(tmp_path / "accuracy.png"), str(tmp_path / "round_time.png")]
    for name in ("accuracy.png", "round_time.png"):
        assert_sensible_png(tmp_path / name)


@pytest.mark.parametrize("folder", ["empty-dir", "no-such-dir"])
def test_cli_on_a_folder_without_a_log_fails_with_one_line(tmp_path: Path, folder: str) -> None:
    run_dir = tmp_path / folder
    if folder == "empty-dir":
        run_dir.mkdir()
    proc = run_cli(str(run_dir))
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"coordinator: error: no rounds.jsonl in {run_dir}: is it a run folder?"]


def test_cli_on_a_malformed_log_fails_with_one_line_naming_file_and_line(tmp_path: Path) -> None:
    lines = dumps(make_records(rounds=3))
    path = write_log(tmp_path, [*lines, '{"round": 3}'])
    proc = run_cli(str(tmp_path))
    assert proc.returncode != 0
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"coordinator: error: {path}:4: not a round record"), proc.stderr


# ---- the confusion matrix of the model kept (result.json, written when a run ends)


def result_json(classes: list[str], confusion: list[list[int]]) -> dict[str, Any]:
    return {"metric": "macro-f1", "classes": classes, "round": 7, "chosen_on": "val",
            "test": {"value": 0.61, "confusion": confusion}}


@pytest.mark.parametrize("k", [2, 4, 120])
def test_report_draws_the_confusion_matrix_of_the_kept_model(tmp_path: Path, k: int) -> None:
    write_log(tmp_path, dumps(make_records()))
    confusion = [[(5 if t == p else 1) * (t + 1) for p in range(k)] for t in range(k)]
    (tmp_path / "result.json").write_text(json.dumps(result_json([f"class-{i}" for i in range(k)], confusion)))
    paths = write_report(tmp_path, tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy.png", "round_time.png", "confusion.png"]
    width, height = png_size(paths[2])
    assert width >= 600 and height >= 500 and (k < 100 or width > 2000)  # many classes: a bigger figure
    import matplotlib.image

    assert matplotlib.image.imread(paths[2]).std() > 0.05


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("test"), "not a run result ('test')"),
        (lambda r: r["test"].update(confusion=[[1, 2]]), "the confusion matrix is not 2 x 2"),
        (lambda r: r.update(classes=None), "not a run result"),
    ],
)
def test_a_broken_result_json_is_one_line(tmp_path: Path, change: Any, message: str) -> None:
    write_log(tmp_path, dumps(make_records()))
    result = result_json(["a", "b"], [[3, 1], [2, 4]])
    change(result)
    (tmp_path / "result.json").write_text(json.dumps(result))
    proc = run_cli(str(tmp_path))
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"coordinator: error: {tmp_path / 'result.json'}: ") and message in proc.stderr
