"""The run's metric decides it: the best round on val is the model kept, and what the run reports and exports.

A real coordinator (in-process, gRPC on loopback, port 0), a real local agent process, the embedded tweets (its
val split carved from train).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from edgetrain.coordinator import checkpoint
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.report import write_report
from edgetrain.coordinator.run import LOG, RESULT, Coordinator, quality_tables
from prometheus_client import CollectorRegistry
from rich.console import Console

from edgetrain import metric_names as m
from edgetrain.spec import RunSpec
from edgetrain.training import evaluate
from edgetrain.workload import load_workload


def _no_nan(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


SPEC = RunSpec(dataset="tweets", model="text-ngram", limit=2000, seed=1, class_weighting="auto", lr_decay=None)


def test_the_best_round_on_val_is_kept_reported_and_exported(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    registry = CollectorRegistry()
    cfg = CoordinatorConfig(spec=SPEC, port=0, local_steps=3, rounds=10, metric="macro-recall", local_agents=1,
                            eval_every=1, run_dir=run_dir, progress=False, round_timeout=120)
    result = Coordinator(cfg, registry=registry).run()
    logged = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    assert len(logged) == 10 and all("val_metric" in r and "metric" in r for r in logged)
    assert all(r["val_metric"] == r["val_macro_recall"] and r["metric"] == r["macro_recall"] for r in logged)

    # the round kept is the first with the highest val figure, whatever test says
    val = [r["val_metric"] for r in logged]
    best = val.index(max(val))
    saved = json.loads((run_dir / RESULT).read_text(), parse_constant=_no_nan)  # strict JSON: other tools read it
    assert saved["metric"] == "macro-recall" and saved["chosen_on"] == "val"
    assert saved["round"] == best + 1  # rounds completed when that model was evaluated
    assert saved["val"]["value"] == val[best] and saved["test"]["value"] == logged[best]["macro_recall"]
    assert saved["test"]["accuracy"] == logged[best]["accuracy"]
    assert result.choice is not None and result.choice.round == best + 1

    # the saved model is that round's model: evaluated again it gives the same test figures and confusion matrix
    wl = load_workload(SPEC)
    model = wl.new_model()
    model.load_state_dict(checkpoint.load_model(run_dir / checkpoint.MODEL))
    again = evaluate(model, wl.data.test.x, wl.data.test.y, wl.data.num_classes)
    assert again.accuracy == saved["test"]["accuracy"]
    assert [list(row) for row in again.confusion] == saved["test"]["confusion"]
    assert sum(map(sum, saved["test"]["confusion"])) == len(wl.data.test) == 2000

    # the majority class of train, predicted for every test example: its accuracy is that class's share of test
    top = int(torch.bincount(wl.data.train.y).argmax())
    assert saved["majority"]["accuracy"] == float((wl.data.test.y == top).double().mean())
    assert saved["majority"]["macro_recall"] == 1 / wl.data.num_classes

    # the summary's headline is the metric on test, with the round and its val figure
    console = Console(width=200, record=True)
    for table in quality_tables(result.choice):
        console.print(table)
    text = console.export_text()
    assert f"test macro-recall {saved['test']['value']:.4f}" in text and f"round {best + 1}" in text
    for name in ("negative", "neutral", "positive", "majority class", "macro-f1", "accuracy"):
        assert name in text

    # Prometheus: the selected metric's gauge holds the last round's test value, under its name
    exported = registry.get_sample_value(m.GLOBAL_METRIC, {m.METRIC: "macro-recall"})
    assert exported == logged[-1]["macro_recall"]

    # `coordinator report` draws the kept model's confusion matrix
    paths = write_report(run_dir, tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy.png", "round_time.png", "confusion.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 5000


def test_own_csv_with_test_and_val_files_trains_on_local_agents(tmp_path: Path) -> None:
    """A local agent is given the same --test-path/--val-path: its data's fingerprint matches, so it trains."""
    from edgetrain.spec import DataLocation

    words = {"spam": "buy cheap pills now", "ham": "see you at lunch", "eggs": "breakfast with toast"}

    def table(name: str, per_class: int) -> Path:
        rows = "".join(f"{c},{text} {i}\n" for i in range(per_class) for c, text in words.items())
        (tmp_path / name).write_text("label,text\n" + rows)
        return tmp_path / name

    where = DataLocation(data_path=table("train.csv", 40), test_path=table("test.csv", 5),
                         val_path=table("val.csv", 4))
    cfg = CoordinatorConfig(spec=RunSpec(dataset="csv"), where=where, port=0, rounds=3, local_agents=1,
                            run_dir=tmp_path / "run", progress=False, round_timeout=120)
    result = Coordinator(cfg).run()
    assert result.completed_rounds == 3 and set(result.nodes) == {"local-0"}
    saved = json.loads((tmp_path / "run" / RESULT).read_text())
    assert saved["classes"] == ["eggs", "ham", "spam"] and saved["metric"] == "accuracy"  # balanced: accuracy
    assert saved["test"]["n"] == 15 and saved["val"]["n"] == 12 and saved["chosen_on"] == "val"
    assert saved["test"]["accuracy"] == 1.0  # three classes, each its own words
