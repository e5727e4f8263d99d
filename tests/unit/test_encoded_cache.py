"""The encoded-data cache: a second load reads what the first encoded, bit for bit; damage or new files rebuild."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from edgetrain.datasets import Dataset, load_dataset
from edgetrain.datasets.encoded import FOLDER, cached
from edgetrain.spec import DataLocation, RunSpec
from edgetrain.workload import load_workload


def corpus(path: Path, n: int = 300, extra: str = "") -> Path:
    words = ["good", "bad", "meh", "sooooo", "@you", "http://x.y", ":)", "#tag", "don't", "3.5"]
    rows = [f'{("pos", "neg", "neu")[i % 3]},"{words[i % 10]} {words[(i * 7) % 10]} row {i} {extra}"\n'
            for i in range(n)]
    path.write_text("".join(rows), encoding="utf-8")
    return path


def load(path: Path, cache: Path, calls: list[int]) -> Dataset:
    def build() -> Dataset:
        calls.append(1)
        return load_dataset("csv", data_path=path, text_features="ngrams")

    return cached("csv", data_dir=None, data_path=path, test_path=None, val_path=None, cache_dir=cache,
                  options={"features": "ngrams"}, build=build)


def same(a: Dataset, b: Dataset) -> None:
    assert a.fingerprint == b.fingerprint
    for split in ("train", "val", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert (sa is None) == (sb is None)
        if sa is not None:
            assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y) and sa.x.dtype == sb.x.dtype
    assert a.vocab is not None and b.vocab is not None and a.vocab.tokens == b.vocab.tokens
    assert (a.classes, a.ngram_buckets, a.default_model, a.kind) == (b.classes, b.ngram_buckets, b.default_model,
                                                                     b.kind)


def test_second_load_reads_the_cache_and_equals_the_first(tmp_path: Path) -> None:
    path, calls = corpus(tmp_path / "d.csv"), []
    first = load(path, tmp_path / "cache", calls)
    second = load(path, tmp_path / "cache", calls)
    assert calls == [1]  # encoded once
    same(first, second)
    same(second, load_dataset("csv", data_path=path, text_features="ngrams"))


def test_a_damaged_entry_is_rebuilt_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, calls = corpus(tmp_path / "d.csv"), []
    first = load(path, tmp_path / "cache", calls)
    (entry,) = (tmp_path / "cache" / FOLDER).iterdir()
    blob = bytearray(entry.read_bytes())
    blob[-5] ^= 0x01  # one bit of the last tensor's bytes
    entry.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="edgetrain.datasets"):
        again = load(path, tmp_path / "cache", calls)
    assert calls == [1, 1] and "damaged cache entry" in caplog.text
    same(first, again)
    assert load(path, tmp_path / "cache", calls) is not None and calls == [1, 1]  # rewritten whole


def test_changed_source_file_is_encoded_again(tmp_path: Path) -> None:
    path, calls = corpus(tmp_path / "d.csv"), []
    first = load(path, tmp_path / "cache", calls)
    corpus(path, extra="new")
    second = load(path, tmp_path / "cache", calls)
    assert calls == [1, 1] and first.fingerprint != second.fingerprint


def test_workload_of_an_agent_reads_the_coordinators_entry(tmp_path: Path) -> None:
    """The coordinator's load fills the cache; an agent's (spec with the fingerprint) finds the same tensors."""
    where = DataLocation(data_path=corpus(tmp_path / "d.csv"), cache_dir=tmp_path / "cache")
    coordinator = load_workload(RunSpec(dataset="csv"), where)
    assert len(list((tmp_path / "cache" / FOLDER).iterdir())) == 1
    agent = load_workload(coordinator.spec, where)
    same(coordinator.data, agent.data)
