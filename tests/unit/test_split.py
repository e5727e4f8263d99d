"""The rule behind --workers auto / --local-agents auto: candidates, budget, choice, cache."""

import json
import os
from pathlib import Path

import pytest

from edgetrain.errors import ConfigError
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.split import (
    DEFAULT_EPOCHS,
    MAX_STEPS,
    MIN_STEPS,
    PROBE_SHARE,
    ROUNDS,
    TIE,
    Split,
    Trial,
    cache_key,
    cached_split,
    candidates,
    choose_split,
    parse_count,
    pick,
    probe_steps,
    store_split,
)


def test_candidates_use_every_core_fewest_processes_first() -> None:
    assert candidates(1) == [(1, 1)]
    assert candidates(2) == [(1, 2), (2, 1)]
    assert candidates(12) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]
    assert all(p * t == 7 for p, t in candidates(7)) and len(candidates(7)) == 2
    with pytest.raises(ConfigError):
        candidates(0)


def test_the_fastest_wins_beyond_the_tie_margin() -> None:
    slow, fast = Trial(1, 4, 1000.0), Trial(4, 1, 1000.0 / (1 - TIE) + 1)
    assert pick([slow, fast]) == fast


def test_within_the_tie_margin_fewer_processes_win() -> None:
    one, two = Trial(1, 2, 990.0), Trial(2, 1, 1000.0)
    assert TIE > 0.01 and pick([two, one]) == one
    # among several tied, the fewest processes, whatever the order measured
    assert pick([Trial(4, 1, 1000.0), Trial(2, 2, 985.0), Trial(1, 4, 900.0)]) == Trial(2, 2, 985.0)
    with pytest.raises(ConfigError):
        pick([])


def test_timed_samples_stay_within_the_share_of_a_default_run() -> None:
    batch, options = 64, candidates(4)
    runs = len(options) * ROUNDS
    for n_train in (30_000, 60_000, 1_000_000):
        budget = PROBE_SHARE * DEFAULT_EPOCHS * n_train / runs  # per candidate and round
        for p, _ in options:
            steps = probe_steps(n_train, batch, p, runs)
            assert MIN_STEPS <= steps <= MAX_STEPS
            # within its share of the budget, unless the minimum a timing needs is more (small data sets)
            assert p * steps * batch <= max(budget, p * MIN_STEPS * batch)
    assert probe_steps(60_000, batch, 1, 3) == int(PROBE_SHARE * DEFAULT_EPOCHS * 60_000 / 3 / batch)
    assert probe_steps(100, batch, 1, 2) == MIN_STEPS and probe_steps(10**9, batch, 1, 2) == MAX_STEPS


def test_parse_count_reads_numbers_and_auto() -> None:
    assert parse_count("3", "--workers") == 3 and parse_count("auto", "--workers") is None
    assert parse_count(" AUTO ", "--workers") is None
    with pytest.raises(ConfigError, match="--local-agents takes a number or auto, not 'many'"):
        parse_count("many", "--local-agents")


def test_cache_keeps_the_answer_per_model_cores_mode_and_machine(tmp_path: Path) -> None:
    spec = RunSpec(dataset="tweets", model="text-cnn")
    key = cache_key(spec, [0, 1], "ddp", 1)
    assert key != cache_key(spec, [0, 1, 2, 3], "ddp", 1)
    assert key != cache_key(spec.with_(model="text-gru"), [0, 1], "ddp", 1)
    assert key != cache_key(spec, [0, 1], "lockstep", 8) != cache_key(spec, [0, 1], "lockstep", 4)
    assert key != cache_key(spec.with_(batch_size=32), [0, 1], "ddp", 1)
    assert cached_split(key, tmp_path) is None
    trials = (Trial(1, 2, 900.0, 10, 1.4), Trial(2, 1, 1200.0, 5, 0.5))
    path = store_split(Split(2, 1, trials, key, probe_seconds=9.0), tmp_path)
    assert path is not None and key in json.loads(path.read_text())
    hit = cached_split(key, tmp_path)
    assert hit is not None and hit.cached and (hit.processes, hit.threads) == (2, 1) and hit.trials == trials
    # a hit is returned without measuring anything (the data set named here does not even exist)
    again = choose_split(RunSpec(dataset="tweets", model="text-cnn"), DataLocation(), [0, 1], cache_dir=tmp_path)
    assert again == hit


def test_a_broken_cache_is_measured_again_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "splits.json").write_text("{not json")
    assert cached_split("anything", tmp_path) is None
    (tmp_path / "splits.json").write_text(json.dumps({"k": {"processes": "x"}}))
    assert cached_split("k", tmp_path) is None


def test_an_unwritable_cache_costs_only_the_next_probe(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert store_split(Split(1, 2, (Trial(1, 2, 1.0),), "k"), blocker) is None


def test_one_core_has_nothing_to_measure(tmp_path: Path) -> None:
    split = choose_split(RunSpec(dataset="tweets"), DataLocation(), [min(os.sched_getaffinity(0))], cache_dir=tmp_path)
    assert (split.processes, split.threads) == (1, 1) and not (tmp_path / "splits.json").exists()


def test_bench_affinity_names_the_layout_the_same_rule_chooses() -> None:
    from edgetrain.coordinator.experiments import (
        AffinityReport,
        AffinityRow,
        BenchSettings,
        DataFacts,
        Machine,
        affinity_markdown,
        chosen_layout,
        chosen_sentence,
    )

    def row(sweep: str, p: int, t: int, ms: float) -> AffinityRow:
        return AffinityRow(sweep, f"{p}x{t}" if sweep == "layout" else str(t), p, t, "0-3", times_ms=[ms, ms],
                           accuracies=[0.5], samples=6400)

    machine = Machine("cpu", [0, 1, 2, 3], 4, "torch", "none", (0.0, 0.0, 0.0))
    rows = [row("affinity", 1, 4, 500.0),  # the fastest row of all, but no layout: never the choice
            row("layout", 1, 4, 1000.0), row("layout", 2, 2, 1000.0 * (1 - TIE / 2)), row("layout", 4, 1, 700.0)]
    report = AffinityReport(BenchSettings(), DataFacts(100, 10, "text-cnn"), machine, 100, rows)
    assert chosen_layout(report) is rows[3]
    rows[3].times_ms = [990.0, 990.0]  # now all three within the tie margin: the fewest processes
    assert chosen_layout(report) is rows[1]
    sentence = chosen_sentence(report)
    assert sentence is not None and "would choose 1x4" in sentence
    assert f"- {sentence}" in affinity_markdown(report)
    assert chosen_sentence(AffinityReport(BenchSettings(), DataFacts(100, 10, "m"), machine, 100, rows[:1])) is None
