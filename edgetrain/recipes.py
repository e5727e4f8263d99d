"""The defaults a run gets without flags: the best recipe measured per data set family (docs/accuracy.md).

Pure rules over facts of the loaded data (examples, classes, label counts), so every node that loads the same
data derives the same values. What a user passes always wins; these fill in what was left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LR_DECAY = 0.7  # learning rate x this per epoch, as in PyTorch's MNIST example (StepLR, gamma 0.7)

# ---- text: the fastText-style `text-ngram` model (linear over hashed word/character n-grams)
TEXT_MODEL = "text-ngram"
IMAGE_MODEL = "mnist-cnn"
# Local steps per round of text-ngram: it computes little per step, so rounds must be long to outweigh shipping
# the weights; at most this many, fewer when a node's shard holds fewer batches (see `local_steps`).
NGRAM_LOCAL_STEPS = 32
OTHER_LOCAL_STEPS = 8  # every other model (the embedding text models, the MNIST CNN)
# Passes over the training data: text-ngram reaches its best val figure within 4 epochs on 30-45k tweets; a small
# set needs more passes for as many steps, so a run trains at least TEXT_MIN_SAMPLES examples (the best round is
# kept, chosen on val, so the extra passes cost time, never quality).
TEXT_EPOCHS = 4.0
TEXT_MIN_SAMPLES = 100_000
TEXT_MAX_EPOCHS = 30.0
OTHER_EPOCHS = 3.0
# Skew that turns class weighting on, for a metric that weighs every class alike (all but accuracy): the largest
# class of train at least this many times the smallest. Measured on val (docs/accuracy.md): it helps from
# offensive's 2.0 up (sentiment 2.9, emotion 4.8) and is a tie at hate's 1.4 and irony's 1.0; with accuracy as
# the metric it costs (tweets, 2.3), as it must: accuracy rewards the large classes.
SKEW_THRESHOLD = 1.5
# Hashed n-gram buckets: about BUCKETS_PER_EXAMPLE per training example (a power of two), within
# [MIN_BUCKETS, MAX_BUCKETS], and the model (buckets x classes floats) at most MAX_NGRAM_PARAMETERS.
BUCKETS_PER_EXAMPLE = 8
MIN_BUCKETS = 2**16
MAX_BUCKETS = 2**18
MAX_NGRAM_PARAMETERS = 2**22  # 16 MiB of float32 per round and node, however many classes
# text-ngram scales each feature's row per class by its NBSVM log-count ratio on train (one class against the rest,
# counts + NGRAM_SCALING_ALPHA; models.log_count_ratios): measured on val of every TweetEval task and tweets
# (docs/accuracy.md) it gains 4.4 points on emotion, 0.5-1.4 on offensive, irony and hate, and ties on tweets and
# sentiment. "none": no scaling.
NGRAM_SCALING = "log-count-ratio"
NGRAM_SCALING_ALPHA = 1.0

METRICS = ("accuracy", "macro-f1", "macro-recall")  # and "f1:<class>"


def skew(counts: Sequence[int]) -> float:
    """Largest class count over the smallest (inf when a class has no example)."""
    if not counts:
        return 1.0
    return max(counts) / min(counts) if min(counts) > 0 else math.inf


def class_weighting(counts: Sequence[int], metric: str) -> str:
    """The class weighting of a run: "balanced" or "none".

    "balanced" when the train labels are skewed (largest class >= SKEW_THRESHOLD x the smallest) and the metric
    is not accuracy.
    """
    return "balanced" if metric != "accuracy" and skew(counts) >= SKEW_THRESHOLD else "none"


def ngram_buckets(train_examples: int, num_classes: int) -> int:
    """Hash buckets of text-ngram for a training set: capacity follows examples, bounded by classes."""
    want = 1 << max(0, math.ceil(math.log2(max(1, train_examples * BUCKETS_PER_EXAMPLE))))
    buckets = min(MAX_BUCKETS, max(MIN_BUCKETS, want))
    while buckets > 1024 and buckets * max(2, num_classes) > MAX_NGRAM_PARAMETERS:
        buckets //= 2
    return buckets


def default_model(kind: str) -> str:
    """The model of a data set of this kind ("text" or "image") when none is named."""
    return TEXT_MODEL if kind == "text" else IMAGE_MODEL


def local_steps(model: str, train_examples: int, agents: int, batch_size: int) -> int:
    """K: NGRAM_LOCAL_STEPS for text-ngram (at most a shard's batches per epoch, at least 1), else 8."""
    if model != TEXT_MODEL:
        return OTHER_LOCAL_STEPS
    per_shard = train_examples // max(1, agents) // max(1, batch_size)
    return max(1, min(NGRAM_LOCAL_STEPS, per_shard))


def lr_decay(model: str, train_examples: int) -> float:
    """Learning rate x this per epoch: LR_DECAY, spread over the epochs of text-ngram's longer runs on small sets.

    A run of E epochs decays as much as TEXT_EPOCHS epochs at LR_DECAY each: LR_DECAY ** (TEXT_EPOCHS / E).
    """
    if model != TEXT_MODEL:
        return LR_DECAY
    return round(float(LR_DECAY ** (TEXT_EPOCHS / epochs(model, train_examples))), 4)


def epochs(model: str, train_examples: int) -> float:
    """Passes over the training data: TEXT_EPOCHS, more for small sets (>= TEXT_MIN_SAMPLES examples seen)."""
    if model != TEXT_MODEL:
        return OTHER_EPOCHS
    need = math.ceil(TEXT_MIN_SAMPLES / max(1, train_examples))
    return float(min(TEXT_MAX_EPOCHS, max(TEXT_EPOCHS, need)))


@dataclass(frozen=True)
class Metric:
    """The figure that decides a run: "accuracy", "macro-f1", "macro-recall" or "f1:<class>"."""

    name: str
    class_index: int | None = None  # for f1:<class>


def metric_problem(name: str, classes: Sequence[str] | None = None) -> str | None:
    """Why `name` is no metric (of a data set with these classes), or None."""
    if name in METRICS:
        return None
    if name.startswith("f1:") and name[3:]:
        if classes is None or name[3:] in classes or _class_id(name[3:], classes) is not None:
            return None
        return f"--metric {name}: no class {name[3:]!r}; classes: {', '.join(classes)}"
    return f"unknown --metric {name!r}; choose from {', '.join(METRICS)} or f1:<class>"


def _class_id(text: str, classes: Sequence[str]) -> int | None:
    if text in classes:
        return list(classes).index(text)
    if text.isascii() and text.isdigit() and int(text) < len(classes):
        return int(text)
    return None


def resolve_metric(name: str, classes: Sequence[str]) -> Metric:
    """The metric `name` for a data set with these classes (f1:<class> takes a name or an id)."""
    problem = metric_problem(name, classes)
    if problem is not None:
        from edgetrain.errors import ConfigError

        raise ConfigError(problem)
    if name.startswith("f1:"):
        index = _class_id(name[3:], classes)
        assert index is not None
        return Metric(f"f1:{classes[index]}", index)
    return Metric(name)


# TweetEval's own metric of each task, told apart by its class names (the task's mapping.txt).
TWEETEVAL_METRICS: dict[tuple[str, ...], str] = {
    ("negative", "neutral", "positive"): "macro-recall",  # sentiment (SemEval-2017 4A)
    ("non_irony", "irony"): "f1:irony",  # irony (SemEval-2018 3A)
}


def default_metric(dataset: str, classes: Sequence[str], counts: Sequence[int]) -> str:
    """The metric a data set is judged by when none is named.

    TweetEval tasks: the task's own (macro-recall for sentiment, F1 of irony, else macro-F1). The embedded
    `tweets` and MNIST: accuracy. Own data: macro-F1 when its train labels are skewed, else accuracy.
    """
    if dataset in ("tweeteval", "tweeteval-sentiment"):
        return TWEETEVAL_METRICS.get(tuple(classes), "macro-f1")
    if dataset in ("csv", "tsv"):
        return "macro-f1" if skew(counts) >= SKEW_THRESHOLD else "accuracy"
    return "accuracy"
