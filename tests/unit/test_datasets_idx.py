"""IDX parsing and the MNIST loader, on tiny IDX files written here."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetrain.datasets import DatasetFormatError, load_dataset
from edgetrain.datasets import mnist as mnist_module
from edgetrain.datasets.base import MNIST_MEAN, MNIST_STD
from edgetrain.datasets.idx import MAGIC_IMAGES, MAGIC_LABELS, parse_idx, read_maybe_gzip
from edgetrain.errors import ChecksumError, DatasetError


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def test_parse_images_and_labels() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    got = parse_idx(idx_bytes(images), source="x", magic=MAGIC_IMAGES, dims=(2, 28, 28))
    assert got.dtype == np.uint8 and np.array_equal(got, images)
    assert got.flags.writeable
    labels = np.array([5, 0, 4], dtype=np.uint8)
    assert parse_idx(idx_bytes(labels), source="y", magic=MAGIC_LABELS).tolist() == [5, 0, 4]


def test_parse_big_endian_int32() -> None:
    data = np.array([[1, -2], [70000, 3]], dtype=">i4")
    got = parse_idx(idx_bytes(data, 0x0C), source="z")
    assert got.tolist() == [[1, -2], [70000, 3]] and got.dtype == np.int32


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        (b"\x00\x00", {}, "truncated: 2 bytes"),
        (b"\x1f\x8b\x08\x03" + bytes(8), {}, "bad magic number 0x1f8b0803"),
        (b"\x00\x00\x07\x01" + bytes(8), {}, "bad magic number"),
        (idx_bytes(np.zeros(3, np.uint8)), {"magic": MAGIC_IMAGES}, "bad magic number 2049 .* expected 2051"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:10], {}, "truncated header"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-1], {}, r"truncated: header promises \(2, 28, 28\)"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8)) + b"xx", {}, "2 unexpected trailing bytes"),
        (
            idx_bytes(np.zeros((2, 27, 28), np.uint8)),
            {"dims": (None, 28, 28)},
            "dimension 1 is 27, expected 28",
        ),
        (idx_bytes(np.zeros((2, 28), np.uint8)), {"dims": (None, 28, 28)}, "has 2 dimensions, expected 3"),
    ],
)
def test_parse_errors_name_the_file(data: bytes, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(DatasetFormatError, match=match) as info:
        parse_idx(data, source="train-images-idx3-ubyte", **kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith("train-images-idx3-ubyte: ")


def test_read_maybe_gzip(tmp_path: Path) -> None:
    (tmp_path / "raw").write_bytes(b"abc")
    (tmp_path / "z.bin").write_bytes(gzip.compress(b"abc"))  # gzip detected by content, not name
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"abc" * 1000)[:-20])
    assert read_maybe_gzip(tmp_path / "raw") == b"abc"
    assert read_maybe_gzip(tmp_path / "z.bin") == b"abc"
    with pytest.raises(DatasetFormatError, match="bad.gz: corrupt or truncated gzip"):
        read_maybe_gzip(tmp_path / "bad.gz")
    with pytest.raises(DatasetFormatError, match="cannot read"):
        read_maybe_gzip(tmp_path / "missing")


# --------------------------------------------------------------------------- a tiny fake MNIST


TRAIN_N, TEST_N = 12, 5


def fake_mnist(folder: Path, monkeypatch: pytest.MonkeyPatch, *, gz: bool = True) -> dict[str, bytes]:
    """Write four small IDX files and make the loader accept their md5 and counts."""
    rng = np.random.default_rng(0)
    contents = {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (TRAIN_N, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(TRAIN_N, dtype=np.uint8) % 10),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (TEST_N, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": idx_bytes(np.array([7, 2, 1, 0, 4], dtype=np.uint8)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in contents.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / name).write_bytes(raw)
    monkeypatch.setattr(mnist_module, "MNIST_RAW_MD5", {n: hashlib.md5(r).hexdigest() for n, r in contents.items()})
    monkeypatch.setattr(mnist_module, "MNIST_COUNTS", {"train": TRAIN_N, "test": TEST_N})
    return contents


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> None:
    contents = fake_mnist(tmp_path / "mnist", monkeypatch, gz=gz)
    data = load_dataset("mnist", data_dir=tmp_path / "mnist", cache_dir=tmp_path / "cache", download=False)
    assert data.kind == "image" and data.default_model == "mnist-cnn" and data.num_classes == 10
    assert data.val is None and data.vocab is None
    assert data.train.x.shape == (TRAIN_N, 1, 28, 28) and data.train.x.dtype == torch.float32
    assert data.test.y.tolist() == [7, 2, 1, 0, 4]
    pixels = np.frombuffer(contents["train-images-idx3-ubyte"], np.uint8, offset=16).reshape(TRAIN_N, 28, 28)
    expected = (torch.from_numpy(pixels.copy()).float() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(data.train.x[:, 0], expected, atol=1e-6)
    assert not (tmp_path / "cache").exists(), "a data dir must not touch the cache"


def test_mnist_fingerprint_and_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mnist(tmp_path / "a", monkeypatch)
    fake_mnist(tmp_path / "b", monkeypatch, gz=False)
    a = load_dataset("mnist", data_dir=tmp_path / "a")
    b = load_dataset("mnist", data_dir=tmp_path / "b")
    assert a.fingerprint == b.fingerprint  # same content, gz or not
    small = load_dataset("mnist", data_dir=tmp_path / "a", limit=3)
    assert len(small.train) == 3 and len(small.test) == 3
    assert torch.equal(small.train.y, a.train.y[:3])
    assert small.fingerprint != a.fingerprint


def test_mnist_missing_file_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mnist(tmp_path, monkeypatch)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="has no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_md5_of_decompressed_content_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = fake_mnist(tmp_path, monkeypatch)
    raw = bytearray(contents["train-labels-idx1-ubyte"])
    raw[-1] = (raw[-1] + 1) % 10  # still a valid IDX file, different content
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ChecksumError, match=r"train-labels-idx1-ubyte.gz: md5 of the decompressed content"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_truncated_file_says_truncated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = fake_mnist(tmp_path, monkeypatch)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(contents["t10k-images-idx3-ubyte"][:-100]))
    with pytest.raises(DatasetFormatError, match=r"t10k-images-idx3-ubyte.gz: truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_wrong_count_and_label_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mnist(tmp_path, monkeypatch)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(DatasetFormatError, match="dimension 0 is 4, expected 5"):
        load_dataset("mnist", data_dir=tmp_path)
    bad = np.array([7, 2, 1, 0, 12], dtype=np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(bad)))
    monkeypatch.setitem(mnist_module.MNIST_RAW_MD5, "t10k-labels-idx1-ubyte", hashlib.md5(idx_bytes(bad)).hexdigest())
    with pytest.raises(DatasetFormatError, match="label 12 outside 0..9"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_offline_without_cache_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"download is off; pass data_dir \(--data-dir\)"):
        load_dataset("mnist", cache_dir=tmp_path, download=False)
