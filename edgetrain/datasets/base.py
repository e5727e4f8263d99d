"""The data set containers, the fingerprint, the dataset-specific errors and the split rule."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from edgetrain.datasets.text import Vocab
from edgetrain.errors import DatasetError

# MNIST training-set pixel mean and standard deviation (of x/255), the customary constants.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# Bump when anything that shapes the tensors changes in a way the hashed parameters do not show.
FINGERPRINT_VERSION = 1


class DatasetFormatError(DatasetError):
    """A data file exists but its content is malformed (bad header, column count, value...)."""


def csv_records(reader: Iterator[list[str]], source: object) -> Iterator[tuple[int, list[str]]]:
    """(line the record starts on, its fields) for each record of a `csv.reader`.

    A `csv.Error` (an unclosed quote, a field over the size limit) is a DatasetFormatError at the line where the
    failing record starts, not where the parser gave up (often the end of the file).
    """
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DatasetFormatError(f"{source}: line {line}: {exc}") from None
        yield line, row
        line = reader.line_num + 1  # type: ignore[attr-defined]


class DownloadError(DatasetError):
    """A file could not be downloaded (network, HTTP status, short read)."""


class ShardingError(DatasetError):
    """Impossible sharding arguments (rank outside the world, unknown scheme, bad alpha)."""


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a data set: inputs ``x`` and int64 labels ``y`` with the same first dimension.

    Images: ``x`` is float32 ``[N, 1, 28, 28]``, normalised with the MNIST mean/std.
    Text: ``x`` is int64 ``[N, max_len]`` token ids (0 = pad, 1 = unk), or int32 ``[N, width]``
    hashed n-gram ids (0 = pad) for the ``text-ngram`` model.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise DatasetError(f"labels must be a 1-D int64 tensor, got {self.y.dtype} {tuple(self.y.shape)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise DatasetError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def head(self, n: int | None) -> Split:
        """Return the first ``n`` examples (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return Split(self.x[:n].clone(), self.y[:n].clone())


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded data set: splits, class names, vocabulary (text) and a fingerprint.

    Two nodes whose fingerprints are equal hold identical tensors (the fingerprint hashes
    the final tensors together with the class names, the vocabulary and the load options).
    """

    name: str
    kind: str
    train: Split
    test: Split
    val: Split | None
    classes: tuple[str, ...]
    vocab: Vocab | None
    fingerprint: str
    default_model: str
    ngram_buckets: int = 0  # hash buckets of n-gram features (0: token ids or images)
    class_descriptions: tuple[str, ...] = ()  # what mapping.txt says of each class beyond its name, if anything
    params: Mapping[str, object] = field(default_factory=dict)  # the load options the fingerprint hashes

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)


def compute_fingerprint(
    *,
    name: str,
    kind: str,
    classes: Sequence[str],
    vocab: Vocab | None,
    splits: Mapping[str, Split | None],
    params: Mapping[str, object],
) -> str:
    """sha256 hex over a JSON header (identity and options) followed by every tensor's bytes.

    The header holds the fingerprint version, name, kind, class names, the vocabulary
    fingerprint and ``params`` (seed, limit, max_len... whatever shaped the data). Then each
    split in order contributes its name, dtype, shape and raw (C-contiguous) bytes of x and y.
    """
    header = {
        "version": FINGERPRINT_VERSION,
        "name": name,
        "kind": kind,
        "classes": list(classes),
        "vocab": vocab.fingerprint if vocab is not None else None,
        "params": dict(params),
    }
    h = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for split_name, split in splits.items():
        h.update(f"\x00split:{split_name}".encode())
        if split is None:
            continue
        for tensor in (split.x, split.y):
            t = tensor.detach().cpu().contiguous()
            h.update(f"\x00{t.dtype}:{tuple(t.shape)}\x00".encode())
            h.update(t.numpy().reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def stratified_split(
    labels: Sequence[int], keys: Sequence[bytes], *, test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Deterministic stratified train/test split by seeded content hash.

    Each example gets the score ``blake2b(seed || key)``, where ``key`` identifies its
    content (text bytes, pixel bytes). Within each class the ``round(n_c * test_fraction)``
    examples with the smallest scores go to test, the rest to train. Both lists come back
    ordered by score (ties by index), which mixes classes, so that the first ``k`` of either
    list is itself a fair sample. Nothing depends on a library RNG, so the split is the same
    on every machine and every numpy/torch version.
    """
    if len(labels) != len(keys):
        raise DatasetError(f"{len(labels)} labels but {len(keys)} keys")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    salt = (seed & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    scores = [hashlib.blake2b(key, digest_size=16, salt=salt[:8] + bytes(8)).digest() for key in keys]
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    train: list[int] = []
    test: list[int] = []
    for members in by_class.values():
        members.sort(key=lambda i: (scores[i], i))
        n_test = round(len(members) * test_fraction)
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    train.sort(key=lambda i: (scores[i], i))
    test.sort(key=lambda i: (scores[i], i))
    return train, test
