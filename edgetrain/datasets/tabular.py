"""A labelled CSV/TSV file the user brings: ``label,text`` rows or ``label`` + 784 pixel columns."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetrain.datasets.base import DatasetFormatError, csv_records
from edgetrain.datasets.idx import read_maybe_gzip
from edgetrain.datasets.mnist import parse_pixel_rows
from edgetrain.errors import DatasetError

# A first row whose first column is one of these (case-insensitive) is a header, not data.
HEADER_LABELS = frozenset({"label", "labels", "class", "category", "sentiment", "target", "y"})
# More different labels than this, and than half the rows, is texts read as labels (a file with the label last);
# in a file of at least this many rows, a first row whose label occurs nowhere else is an unnamed header.
MANY_CLASSES = 20
TEXT_COLUMNS = 2
IMAGE_COLUMNS = 1 + 28 * 28
CLASSES_SUFFIX = ".classes.txt"


@dataclass(frozen=True)
class Table:
    """A parsed labelled file: ``texts`` (text files) or ``pixels`` uint8 ``[N, 784]`` (image files)."""

    kind: str
    classes: tuple[str, ...]
    labels: list[int]
    texts: list[str] | None
    pixels: np.ndarray | None


def classes_file_for(path: Path) -> Path:
    """Return the optional side file naming the classes of ``path``: ``<file name>.classes.txt``."""
    return path.with_name(path.name + CLASSES_SUFFIX)


def _read_classes_file(path: Path) -> tuple[str, ...]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read class names ({exc})") from None
    names = tuple(line.strip() for line in lines if line.strip())
    if not names:
        raise DatasetFormatError(f"{path}: file is empty (expected one class name per line)")
    if len(set(names)) != len(names):
        raise DatasetFormatError(f"{path}: repeats a class name")
    return names


def _is_int(text: str) -> bool:
    return text.isascii() and text.isdigit()


def read_table(path: Path, *, delimiter: str, classes: Sequence[str] | None = None) -> Table:
    """Parse a labelled CSV (``delimiter=","``) or TSV (TAB) file, gzipped or not.

    Each row is ``label,text`` (2 columns; text files) or ``label`` followed by 784 integer
    pixels 0..255 (image files); the first row decides which. A first row whose first column
    is ``label`` (or class, category, sentiment, target, y) is a header. Blank lines are
    skipped. CSV follows RFC 4180 quoting; TSV has no quoting (a ``"`` is a character).

    Labels are names. Without ``classes`` the class list is the sorted set of labels
    (numerically when all are integers). With ``classes`` (or a ``<file>.classes.txt`` side
    file, one name per line) a label must be one of the names or an integer id into them.
    Every problem raises :class:`DatasetFormatError` naming the file and line.
    """
    if classes is None and classes_file_for(path).is_file():
        classes = _read_classes_file(classes_file_for(path))
    raw = read_maybe_gzip(path)
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetFormatError(f"{path}: line {line}: not valid UTF-8 ({exc.reason})") from None
    if not content.strip():
        raise DatasetFormatError(f"{path}: file is empty")
    stream = io.StringIO(content, newline="")
    if delimiter == ",":
        reader = csv.reader(stream, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL, strict=True)
    else:
        reader = csv.reader(stream, delimiter=delimiter, quoting=csv.QUOTE_NONE, strict=True)

    rows: list[list[str]] = []
    lines: list[int] = []
    width = 0
    for start, row in csv_records(reader, path):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if not width:
            width = len(row)
            if width not in (TEXT_COLUMNS, IMAGE_COLUMNS):
                raise DatasetFormatError(
                    f"{path}: line {start}: {width} columns; expected {TEXT_COLUMNS} (label, text) "
                    f"or {IMAGE_COLUMNS} (label and 784 pixels)"
                )
            if row[0].strip().lower() in HEADER_LABELS:
                continue
        if len(row) != width:
            raise DatasetFormatError(f"{path}: line {start}: {len(row)} columns, expected {width}")
        if not row[0].strip():
            raise DatasetFormatError(f"{path}: line {start}: empty label")
        rows.append(row)
        lines.append(start)
    if not rows:
        raise DatasetFormatError(f"{path}: no data rows (only a header)")

    names = [row[0].strip() for row in rows]
    if classes is None:
        distinct = set(names)
        if len(rows) >= MANY_CLASSES and names.count(names[0]) == 1 and not _is_int(names[0]):
            raise DatasetFormatError(
                f"{path}: line {lines[0]}: label {names[0]!r} occurs on no other line; if this line is a header, "
                f"name its first column 'label' (or {', '.join(sorted(HEADER_LABELS - {'label'}))})"
            )
        if len(distinct) > max(MANY_CLASSES, len(rows) // 2):
            raise DatasetFormatError(
                f"{path}: {len(distinct)} different labels in {len(rows)} rows: the label must be the first column"
            )
        order = sorted(distinct, key=int) if all(_is_int(n) for n in distinct) else sorted(distinct)
        class_names = tuple(order)
    else:
        class_names = tuple(classes)
    ids = {name: i for i, name in enumerate(class_names)}
    labels: list[int] = []
    for name, number in zip(names, lines, strict=True):
        if name in ids:
            labels.append(ids[name])
        elif _is_int(name) and int(name) < len(class_names):
            labels.append(int(name))
        else:
            raise DatasetFormatError(
                f"{path}: line {number}: unknown label {name!r} (classes: {', '.join(class_names)})"
            )
    if width == TEXT_COLUMNS:
        return Table("text", class_names, labels, [row[1] for row in rows], None)
    pixels = parse_pixel_rows(rows, lines, str(path), first_pixel=1)
    return Table("image", class_names, labels, None, pixels)
