"""The typed records round-trip: RoundRecord through the log's JSON, Assignment and NodeStats through protobuf."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
from edgetrain.coordinator.runlog import LOG, Figures, LogWriter, RoundRecord, read_log

from edgetrain.proto import edgetrain_pb2 as pb
from edgetrain.records import Assignment, NodeStats
from edgetrain.records_pb import assignment_of, stats_message, stats_of, work_header

STATS = NodeStats(samples=256, compute_seconds=0.31, communication_seconds=0.05, loss=0.625, accuracy=0.75,
                  samples_per_second=825.8, bytes=4_000_000.0)
RECORD = RoundRecord(
    round=7, duration_seconds=0.42, sync_overhead_seconds=0.11, samples=384, samples_per_second=914.3,
    missing=("agent-c",), nodes={"agent-a": STATS, "agent-b": NodeStats(samples=128, compute_seconds=0.2)},
    elapsed_seconds=12.5, training_share=0.74,
    test=Figures(accuracy=0.81, loss=0.55, macro_f1=0.78, macro_recall=0.79, metric=0.78),
    val=Figures(accuracy=0.8, loss=0.57, macro_f1=0.77, macro_recall=0.775, metric=0.77),
    local_steps=32, update_dtype="int8",
)
# A line as coordinator run wrote it before RoundRecord existed (a dict dumped with json.dumps: its keys, its order)
OLD_LINE = (
    '{"round": 3, "duration_seconds": 0.5, "sync_overhead_seconds": 0.125, "samples": 512, '
    '"samples_per_second": 1024.0, "missing": ["agent-b"], "nodes": {"agent-a": {"samples": 512, '
    '"compute_seconds": 0.375, "communication_seconds": 0.0625, "loss": 0.5, "accuracy": 0.75, '
    '"samples_per_second": 1365.3, "bytes": 4096.0}}, "elapsed_seconds": 2.25, "training_share": 0.8, '
    '"accuracy": 0.7, "loss": NaN, "macro_f1": 0.6, "macro_recall": 0.65, "metric": 0.6}'
)


def assert_same(got: object, want: object) -> None:
    """Field by field (NaN equal to NaN), nested dataclasses and mappings of them included."""
    if hasattr(want, "__dataclass_fields__"):
        assert type(got) is type(want)
        for f in fields(want):  # type: ignore[arg-type]
            assert_same(getattr(got, f.name), getattr(want, f.name))
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert got == want and type(got) is type(want), (got, want)


def test_a_round_record_survives_json_field_by_field() -> None:
    back = RoundRecord.from_json(json.loads(json.dumps(RECORD.to_json())))
    assert_same(back, RECORD)
    unevaluated = RoundRecord(**{f.name: getattr(RECORD, f.name) for f in fields(RoundRecord)
                                 if f.name not in ("test", "val")})
    assert_same(RoundRecord.from_json(json.loads(json.dumps(unevaluated.to_json()))), unevaluated)
    assert RECORD.judged == 0.77 and unevaluated.judged is None  # a --target is judged on val


def test_an_existing_log_line_reads_and_writes_back_the_same(tmp_path: Path) -> None:
    (tmp_path / LOG).write_text(OLD_LINE + "\n")
    [record] = read_log(tmp_path)
    assert (record.round, record.missing, record.elapsed_seconds, record.training_share) == (3, ("agent-b",), 2.25, 0.8)
    assert_same(record.nodes, {"agent-a": NodeStats(samples=512, compute_seconds=0.375, communication_seconds=0.0625,
                                                    loss=0.5, accuracy=0.75, samples_per_second=1365.3,
                                                    bytes=4096.0)})
    assert record.test is not None and record.val is None
    assert (record.test.accuracy, record.test.metric) == (0.7, 0.6) and math.isnan(record.test.loss)
    assert json.dumps(record.to_json()) == OLD_LINE  # the same keys, in the same order, the same values


def test_an_older_record_without_the_later_fields_reads_with_them_unset() -> None:
    old = {"round": 0, "duration_seconds": 1.0, "elapsed_seconds": 1.0, "accuracy": 0.5,
           "nodes": {"a": {"samples": 8, "compute_seconds": 0.5, "communication_seconds": 0.1, "accuracy": 0.4}}}
    record = RoundRecord.from_json(old)
    assert (record.training_share, record.missing, record.val) == (0.0, (), None)
    assert record.nodes["a"] == NodeStats(samples=8, compute_seconds=0.5, communication_seconds=0.1, accuracy=0.4)
    assert record.test is not None and record.test.accuracy == 0.5 and math.isnan(record.test.metric)


def test_the_writer_appends_one_line_per_record(tmp_path: Path) -> None:
    log = LogWriter(tmp_path, append=False)
    log.write(RECORD)
    log.close()
    again = LogWriter(tmp_path, append=True)  # a resumed run goes on with the same log
    again.write(RoundRecord.from_json(json.loads(OLD_LINE)))
    again.close()
    lines = (tmp_path / LOG).read_text().splitlines()
    assert lines[1] == OLD_LINE and json.loads(lines[0]) == RECORD.to_json()
    assert [r.round for r in read_log(tmp_path)] == [7, 3]


def test_a_record_that_is_not_one_says_which_field() -> None:
    with pytest.raises(ValueError, match="elapsed_seconds missing or not a number"):
        RoundRecord.from_json({"round": 1, "duration_seconds": 1.0, "nodes": {}})


def test_an_assignment_survives_its_round_header_field_by_field() -> None:
    a = Assignment(round=12, rank=2, world=5, local_steps=7, batch_size=64, sample_offset=10_000_000_000,
                   update_dtype="int8", budget_seconds=0.75, max_steps=14)
    header = pb.RoundHeader.FromString(work_header(a, 1.7e9).SerializeToString())  # through the wire bytes
    assert header.status == pb.WORK and header.deadline_unix == 1.7e9
    assert_same(assignment_of(header), a)


def test_node_stats_survive_their_message_field_by_field() -> None:
    msg = pb.NodeStats.FromString(stats_message(STATS).SerializeToString())
    assert_same(stats_of(msg, samples=STATS.samples, received_bytes=STATS.bytes), STATS)
    # the update header carries the weight; the coordinator counts the bytes: neither is in the message
    on_wire = {f.name for f in pb.NodeStats.DESCRIPTOR.fields}
    assert on_wire == {f.name for f in fields(NodeStats)} - {"samples", "bytes"}
