"""The recipe rules (edgetrain.recipes), the metrics a run can be judged by, and how a spec's blanks are filled."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from edgetrain import recipes
from edgetrain.datasets import load_dataset
from edgetrain.datasets.text import ngram_ids
from edgetrain.errors import ConfigError
from edgetrain.models import TextNgram
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.training import EvalResult, evaluate
from edgetrain.workload import load_workload, resolve_spec


def test_skew_and_the_class_weighting_threshold() -> None:
    assert recipes.skew([100, 50]) == 2.0 and recipes.skew([3, 3, 3]) == 1.0 and recipes.skew([5, 0]) == float("inf")
    # balanced from SKEW_THRESHOLD up, for any metric but accuracy (which rewards the large classes)
    t = recipes.SKEW_THRESHOLD
    assert recipes.class_weighting([int(100 * t), 100], "macro-f1") == "balanced"
    assert recipes.class_weighting([int(100 * t) - 1, 100], "macro-f1") == "none"
    assert recipes.class_weighting([500, 100], "accuracy") == "none"
    assert recipes.class_weighting([500, 100, 100], "f1:b") == "balanced"


def test_ngram_capacity_follows_examples_and_classes() -> None:
    small, mid, large = (recipes.ngram_buckets(n, 3) for n in (2_000, 12_000, 45_000))
    assert small == recipes.MIN_BUCKETS and small < mid < large == recipes.MAX_BUCKETS
    for n in (10, 3_000, 30_000, 10**7):
        b = recipes.ngram_buckets(n, 3)
        assert b & (b - 1) == 0, b  # a power of two
    # many classes: the model (buckets x classes floats) stays within the budget
    for classes in (2, 20, 100, 150):
        b = recipes.ngram_buckets(45_000, classes)
        assert b * classes <= recipes.MAX_NGRAM_PARAMETERS
    assert recipes.ngram_buckets(45_000, 100) < recipes.ngram_buckets(45_000, 3)


def test_local_steps_and_epochs_follow_the_data() -> None:
    assert recipes.local_steps("text-ngram", 30_000, 2, 64) == recipes.NGRAM_LOCAL_STEPS
    assert recipes.local_steps("text-ngram", 2_862, 2, 64) == 2_862 // 2 // 64  # a shard's batches per epoch
    assert recipes.local_steps("text-ngram", 10, 4, 64) == 1
    assert recipes.local_steps("text-cnn", 30_000, 2, 64) == recipes.OTHER_LOCAL_STEPS
    assert recipes.epochs("text-ngram", 45_000) == recipes.TEXT_EPOCHS
    assert recipes.epochs("text-ngram", 9_000) * 9_000 >= recipes.TEXT_MIN_SAMPLES
    assert recipes.epochs("text-ngram", 100) == recipes.TEXT_MAX_EPOCHS
    assert recipes.epochs("mnist-cnn", 60_000) == recipes.OTHER_EPOCHS
    # the decay of a longer run is spread over it: the same total as TEXT_EPOCHS epochs at 0.7 (rounded: 1%)
    e = recipes.epochs("text-ngram", 3_000)
    assert recipes.lr_decay("text-ngram", 3_000) ** e == pytest.approx(0.7**recipes.TEXT_EPOCHS, rel=1e-2)
    assert recipes.lr_decay("text-ngram", 45_000) == 0.7 == recipes.lr_decay("mnist-cnn", 100)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("accuracy", None),
        ("macro-f1", None),
        ("macro-recall", None),
        ("f1:irony", None),
        ("f1:1", None),
        ("f1:", "unknown --metric 'f1:'"),
        ("f1", "unknown --metric 'f1'; choose from accuracy, macro-f1, macro-recall or f1:<class>"),
        ("f1:sarcasm", "--metric f1:sarcasm: no class 'sarcasm'; classes: non_irony, irony"),
        ("f1:2", "no class '2'"),
    ],
)
def test_metric_names(name: str, problem: str | None) -> None:
    got = recipes.metric_problem(name, ("non_irony", "irony"))
    assert got == problem if problem is None else problem in (got or "")
    if problem is None:
        metric = recipes.resolve_metric(name, ("non_irony", "irony"))
        assert metric.class_index == (1 if name.startswith("f1:") else None)
        assert metric.name == ("f1:irony" if name.startswith("f1:") else name)
    else:
        with pytest.raises(ConfigError, match="metric"):
            recipes.resolve_metric(name, ("non_irony", "irony"))


def test_default_metric_per_data_set() -> None:
    assert recipes.default_metric("tweets", ("negative", "neutral", "positive"), [5, 5, 2]) == "accuracy"
    assert recipes.default_metric("tweeteval-sentiment", ("negative", "neutral", "positive"), [1, 1, 1]) == (
        "macro-recall")
    assert recipes.default_metric("tweeteval", ("non_irony", "irony"), [1, 1]) == "f1:irony"
    assert recipes.default_metric("tweeteval", ("anger", "joy", "optimism", "sadness"), [4, 2, 1, 3]) == "macro-f1"
    assert recipes.default_metric("csv", ("a", "b"), [100, 10]) == "macro-f1"
    assert recipes.default_metric("csv", ("a", "b"), [100, 90]) == "accuracy"
    assert recipes.default_metric("mnist", tuple("0123456789"), [1] * 10) == "accuracy"


def test_per_class_figures_and_values_from_the_confusion_matrix() -> None:
    # 3 classes; rows: true, columns: predicted
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 1, 1, 2, 2, 0, 2])

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(pred[x], 3).float()

    result = evaluate(Fixed(), torch.arange(10), y, 3)
    assert result.confusion == ((2, 1, 1), (0, 2, 0), (1, 0, 3))
    (p0, r0, f0, n0), (p1, r1, f1, n1), (p2, r2, f2, n2) = result.per_class()
    assert (n0, n1, n2) == (4, 2, 4)
    assert (p0, r0) == (2 / 3, 2 / 4) and (p1, r1) == (2 / 3, 1.0) and (p2, r2) == (3 / 4, 3 / 4)
    assert f1 == pytest.approx(0.8) and f2 == pytest.approx(0.75)
    assert result.macro_f1 == pytest.approx((f0 + f1 + f2) / 3)
    assert result.macro_recall == pytest.approx((0.5 + 1 + 0.75) / 3)
    assert result.value("f1:b", 1) == f1 and result.value("accuracy") == 0.7
    assert result.value("macro-recall") == result.macro_recall
    with pytest.raises(ConfigError):
        EvalResult(1, 0.0, 1.0, 1.0, 1.0).value("f1:x", 0)  # no confusion matrix kept


def _task(folder: Path, counts: list[int]) -> Path:
    """A TweetEval-style folder (TSV layout, no mapping.txt) whose train labels have these counts."""
    folder.mkdir()
    for split, scale in (("train", 1), ("val", 1), ("test", 1)):
        rows = "".join(f"{c}\tword{c} text {i} of {split}\n" for c, n in enumerate(counts) for i in range(n * scale))
        (folder / f"{split}.tsv.gz").write_bytes(gzip.compress(rows.encode(), mtime=0))
    return folder


def test_a_spec_left_blank_is_filled_from_the_data(tmp_path: Path) -> None:
    skewed = _task(tmp_path / "skewed", [40, 10])
    even = _task(tmp_path / "even", [20, 20])
    spec = RunSpec(dataset="tweeteval", class_weighting="auto", lr_decay=None)
    assert spec.lr is None and spec.model == ""
    wl = load_workload(spec, _where(skewed))
    assert wl.spec.model == "text-ngram" and wl.spec.lr == 0.1 and wl.spec.class_weighting == "balanced"
    assert wl.spec.lr_decay == recipes.lr_decay("text-ngram", 50)
    assert wl.data.ngram_buckets == recipes.MIN_BUCKETS and wl.new_model().weight.weight.shape == (  # type: ignore[union-attr]
        recipes.MIN_BUCKETS, 2)
    # text-ngram scales its features by the train split's log-count ratios, alike on every node: the features of
    # word0 (class 0's texts only) lean to class 0, those of "text" (in every text) tell nothing
    scaled = wl.new_model()
    assert recipes.NGRAM_SCALING == "log-count-ratio" and isinstance(scaled, TextNgram) and scaled.scale is not None
    again = load_workload(spec, _where(skewed)).new_model()
    assert isinstance(again, TextNgram) and again.scale is not None and torch.equal(scaled.scale, again.scale)
    buckets = wl.data.ngram_buckets
    own = sorted(set(ngram_ids(["word0"], buckets)) - set(ngram_ids(["word1"], buckets)))
    common = ngram_ids(["text"], buckets)
    assert (scaled.scale[own, 0] > 0).all() and (scaled.scale[own, 1] < 0).all()
    assert scaled.scale[common].abs().max() < scaled.scale[own].abs().min()
    assert load_workload(spec, _where(even)).spec.class_weighting == "none"
    # judged by accuracy, a skewed set is not weighted; what the user names is kept
    assert load_workload(spec, _where(skewed), metric="accuracy").spec.class_weighting == "none"
    named = RunSpec(dataset="tweeteval", model="text-bag", lr=0.5, class_weighting="none", lr_decay=0.9)
    assert resolve_spec(named, wl.data) is named
    # the wire form is whole: an agent given the coordinator's spec fills in nothing
    again = RunSpec.from_proto(wl.spec.to_proto())
    assert again == wl.spec and resolve_spec(again, wl.data) is again


def _where(folder: Path) -> DataLocation:
    return DataLocation(data_dir=folder)


def test_many_classes_load_and_train(tmp_path: Path) -> None:
    """120 classes (ids only, no mapping.txt): loaded, and the n-gram model stays within its size budget."""
    folder = _task(tmp_path / "many", [3] * 120)
    data = load_dataset("tweeteval", data_dir=folder, text_features="ngrams")
    assert data.classes == tuple(str(i) for i in range(120)) and data.num_classes == 120
    assert data.train.y.bincount().tolist() == [3] * 120
    wl = load_workload(RunSpec(dataset="tweeteval"), _where(folder))
    params = sum(p.numel() for p in wl.new_model().parameters())
    assert params <= recipes.MAX_NGRAM_PARAMETERS + 120
