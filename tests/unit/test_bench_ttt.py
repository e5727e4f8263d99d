"""The pure parts of `bench parallel --until`: options, the hyper-parameter rule, the plan, the clock, the tables."""

import csv
import math
from pathlib import Path

import pytest
from edgetrain.coordinator import bench_ttt as ttt
from edgetrain.coordinator import experiments as ex
from edgetrain.coordinator.runlog import RoundRecord

from edgetrain.errors import ConfigError
from edgetrain.spec import RunSpec
from tests.conftest import round_record


def test_targets_are_metric_equals_fraction() -> None:
    assert ttt.parse_target("accuracy=0.99") == ttt.Target("accuracy", 0.99)
    assert ttt.parse_target(" Macro-F1 = 0.6 ") == ttt.Target("macro-f1", 0.6)
    for bad, why in [("0.99", "METRIC=VALUE"), ("loss=0.1", "one of accuracy"), ("accuracy=high", "not a number"),
                     ("accuracy=99", r"fraction in \(0, 1\]"), ("accuracy=0", "fraction")]:
        with pytest.raises(ConfigError, match=why):
            ttt.parse_target(bad)


def test_k_candidates() -> None:
    assert ttt.parse_ks("8, 1,2,2") == (1, 2, 8)
    for bad in ("0,1", "1,x", ",", "-2"):
        with pytest.raises(ConfigError, match="--ks"):
            ttt.parse_ks(bad)


def test_one_rule_gives_every_method_the_same_effective_batch_rate_decay_and_seed() -> None:
    settings = ex.BenchSettings(dataset="mnist", batch_size=64, optimizer="adam", lr_decay=0.7, seed=3)
    rule = ttt.hyper_rule(settings, "mnist-cnn", agents=4)
    assert rule.effective_batch == 256 and rule.lr == pytest.approx(1e-3 * 2)  # default lr x sqrt(4)
    base = RunSpec(dataset="mnist", model="mnist-cnn")
    serial, workers = rule.spec(base, 1), rule.spec(base, 4)
    assert serial.batch_size == 256 and workers.batch_size == 64  # one batch of N x b, or N workers of b
    for spec in (serial, workers):
        assert (spec.lr, spec.optimizer, spec.lr_decay, spec.seed) == (rule.lr, "adam", 0.7, 3)
    assert "no warm-up" in rule.describe() and "sqrt(4)" in rule.describe()
    with pytest.raises(ConfigError, match="does not split"):
        rule.spec(base, 3)
    explicit = ttt.hyper_rule(ex.BenchSettings(lr=0.5, optimizer="adadelta"), "text-cnn", agents=16)
    assert explicit.lr == pytest.approx(2.0) and explicit.effective_batch == 1024


def test_plan_evaluates_every_method_at_the_same_sample_counts() -> None:
    plan = ttt.plan_ttt(60_000, agents=2, per_worker_batch=64, ks=(1, 2, 4, 8, 16), eval_every_epochs=0.25,
                        max_epochs=6)
    assert plan.cadence == 7 * 2048  # the nearest whole number of rounds of K=16 (2 x 64 x 16 samples each)
    assert plan.budget % plan.cadence == 0 and plan.budget >= 6 * 60_000 > plan.budget - plan.cadence
    for k in plan.ks:  # every K evaluates after a whole number of rounds
        assert plan.rounds(plan.cadence, k) * 2 * 64 * k == plan.cadence
    assert plan.steps(plan.cadence) * 128 == plan.cadence  # serial's steps of 128 = each DDP rank's steps of 64
    sixteen = ttt.plan_ttt(60_000, 16, 64, (1, 2, 4, 8, 16), 0.25, 14)  # FULL=1 on 16 cores
    assert sixteen.cadence == 16_384 and sixteen.epochs(sixteen.budget) >= 14
    with pytest.raises(ConfigError, match="--eval-every-epochs"):
        ttt.plan_ttt(1000, 2, 64, (1,), 0, 1)
    with pytest.raises(ConfigError, match="allows no evaluation"):
        ttt.plan_ttt(1000, 2, 64, (1,), 2, 1)


def test_first_reach_and_choose_k() -> None:
    trace = [(1.0, 0.97), (2.0, 0.985), (3.1, 0.9901), (4.0, 0.989), (5.0, 0.992)]
    assert ttt.first_reach(trace, 0.99) == 3.1
    assert ttt.first_reach(trace, 0.995) is None
    probes = [ttt.KProbe(1, 1500.0, 9.0), ttt.KProbe(2, 1700.0, 9.0), ttt.KProbe(4, 1790.0, 9.0),
              ttt.KProbe(8, 1800.0, 9.0)]
    assert ttt.choose_k(probes) == 4  # within 3 % of the fastest (1800): 1790 yes, 1700 no
    assert ttt.choose_k(probes, tie=0.2) == 1


def test_coordinator_clock_takes_off_start_up_and_every_evaluation() -> None:
    # rounds of 1 s after a round 0 that waited 4 s for the agents' workers; evaluations after rounds 2 and 4
    history: list[RoundRecord] = []
    elapsed = 0.0
    evaluations = [(2, 0.5, 0.95), (4, 0.7, 0.991)]
    for r in range(4):  # a round's record takes its time, then its evaluation runs (the next round waits)
        elapsed += 5.0 if r == 0 else 1.0
        history.append(round_record(round=r, duration_seconds=5.0 if r == 0 else 1.0, samples=256,
                                    elapsed_seconds=elapsed))
        elapsed += sum(s for n, s, _ in evaluations if n == r + 1)
    out = ttt.coordinator_outcome(history, evaluations, wall=elapsed + 0.1, target=0.99)
    assert [t for t, _ in out.evals] == pytest.approx([2.0, 4.0])  # round 0 counts as a typical 1 s round
    assert [v for _, v in out.evals] == [0.95, 0.991]
    assert out.time_to_target == pytest.approx(4.0)
    assert out.samples == 4 * 256 and out.accuracy == 0.991
    assert out.train_seconds == pytest.approx(elapsed + 0.1 - 4.0 - 1.2)
    assert ttt.coordinator_outcome(history, evaluations, wall=elapsed, target=0.999).time_to_target is None


def _report() -> ttt.TTTReport:
    settings = ex.BenchSettings(dataset="mnist", epochs=4)
    plan = ttt.plan_ttt(60_000, 2, 64, (1, 8), 0.25, 4)
    c = plan.cadence
    rule = ttt.hyper_rule(settings, "mnist-cnn", 2)
    row = ttt.TTTRow
    rows = [
        row("serial", "d", 1, 2, "0-1", times_s=[100.0], targets_s=[90.0], accuracies=[0.991], samples=6 * c,
            traces=[tuple((15.0 * (i + 1), 0.98 + 0.002 * i) for i in range(6))]),
        row("torch-ddp", "d", 2, 1, "0; 1", times_s=[95.0], targets_s=[80.0], accuracies=[0.990], samples=6 * c,
            traces=[((13.0, 0.98), (80.0, 0.990))]),
        row("edgetrain K=1", "d", 2, 1, "0; 1", k=1, times_s=[120.0], targets_s=[None], accuracies=[0.985],
            samples=8 * c, traces=[((15.0, 0.98), (120.0, 0.985))], sync_ms=[9.0]),
        row("edgetrain K=8", "d", 2, 1, "0; 1", k=8, times_s=[80.0], targets_s=[72.0], accuracies=[0.990],
            samples=5 * c, traces=[((14.0, 0.98), (72.0, 0.990))], sync_ms=[12.0]),
        row("gpu", "d", 1, 2, "cuda:0", note="skipped: torch sees no CUDA device"),
        row("ceiling", "d", 2, 1, "0; 1", rate=2300.0),
    ]
    machine = ex.Machine("cpu", [0, 1], 2, "2.x", "none", (0.1, 0.2, 0.3))
    report = ttt.TTTReport(settings, plan, rule, ttt.Target("accuracy", 0.99), ex.DataFacts(60_000, 10_000,
                           "mnist-cnn"), machine, rows, [ttt.KProbe(1, 1700, 9), ttt.KProbe(8, 1900, 12)], 8,
                           [(2000.0, 2300.0), (2000.0, 2260.0)])
    ttt.fill_ttt_ratios(report)
    return report


def test_ratios_verdict_and_writers(tmp_path: Path) -> None:
    report = _report()
    assert report.ceiling == pytest.approx((1.15 + 1.13) / 2)
    best = report.edgetrain_best()
    assert best is not None and best.method == "edgetrain K=8"
    assert best.speedup_vs_serial == pytest.approx(90 / 72) and best.speedup_vs_ddp == pytest.approx(80 / 72)
    k1 = report.row("edgetrain K=1")
    assert k1 is not None and k1.speedup_vs_serial is None and "reached in 0/1" in k1.note
    ceiling = report.row("ceiling")
    assert ceiling is not None and ceiling.speedup_vs_serial == pytest.approx(report.ceiling)
    lines = ttt.verdict(report)
    assert any("no later than torch-ddp met" in ln for ln in lines)
    assert any("no later than serial met" in ln for ln in lines)
    share = (90 / 72) / report.ceiling
    assert any(f"= {share:.2f} x the ceiling" in ln and ": met" in ln for ln in lines)
    assert any(ln.startswith("edgetrain K=8: samples/s") and "sync overhead" in ln for ln in lines)

    paths = ttt.write_ttt(report, tmp_path / "out", command="coordinator bench parallel --until accuracy=0.99")
    md = paths[0].read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    assert len(table) == 1 + len(report.rows)
    assert "| edgetrain K=8 | 2x1 | 0; 1 | 8 | 72.0 | 99.00 |" in md
    assert "`coordinator bench parallel --until accuracy=0.99`" in md and "no warm-up" in md
    with paths[1].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == [r.method for r in report.rows]
    assert float(rows[0]["epochs"]) == pytest.approx(6 * report.plan.cadence / 60_000)
    assert int(rows[0]["eval_every_samples"]) == report.plan.cadence
    assert rows[4]["time_to_target_s"] == "" and rows[4]["note"].startswith("skipped")
    assert math.isclose(float(rows[5]["samples_per_s"]), 2300.0)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
