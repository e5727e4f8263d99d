"""Downloads against a real HTTP server on 127.0.0.1 (port 0), started and stopped by a fixture."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edgetrain.datasets import DownloadError, default_cache_dir, load_dataset
from edgetrain.datasets import mnist as mnist_module
from edgetrain.datasets.base import DatasetFormatError
from edgetrain.datasets.download import download_file, sha256_verifier
from edgetrain.datasets.tweets import MANIFEST, TWEETEVAL_FILES
from edgetrain.errors import ChecksumError, DatasetError


@dataclass
class FileServer:
    """What the server serves and how it misbehaves; records each request's path and Range."""

    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before hanging up (once)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    base_url: str = ""


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence the log
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state.requests.append((self.path, self.headers.get("Range")))
            body = state.files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and not state.ignore_range:
                start = int(match.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            cut = state.cut_after.pop(self.path, None)
            if cut is not None:
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="test-http", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


BLOB = bytes(range(256)) * 400  # 102,400 bytes: several read chunks
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


def test_download_verifies_and_renames(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob"] = BLOB
    dest = tmp_path / "c" / "blob"
    download_file(f"{server.base_url}/blob", dest, verify=sha256_verifier(BLOB_SHA))
    assert dest.read_bytes() == BLOB
    assert listing(dest.parent) == ["blob"]
    assert server.requests == [("/blob", None)]


def test_download_resumes_existing_part(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob"] = BLOB
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(BLOB[:30000])
    download_file(f"{server.base_url}/blob", dest, verify=sha256_verifier(BLOB_SHA))
    assert dest.read_bytes() == BLOB
    assert server.requests == [("/blob", "bytes=30000-")]
    assert listing(tmp_path) == ["blob"]


def test_interrupted_download_keeps_part_then_resumes(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob"] = BLOB
    server.cut_after["/blob"] = 40000
    dest = tmp_path / "blob"
    with pytest.raises(DownloadError, match="run again to resume"):
        download_file(f"{server.base_url}/blob", dest, verify=sha256_verifier(BLOB_SHA))
    assert not dest.exists(), "nothing under the final name after a failure"
    assert (tmp_path / "blob.part").stat().st_size == 40000
    download_file(f"{server.base_url}/blob", dest, verify=sha256_verifier(BLOB_SHA))
    assert dest.read_bytes() == BLOB
    assert server.requests == [("/blob", None), ("/blob", "bytes=40000-")]
    assert listing(tmp_path) == ["blob"]


def test_server_ignoring_range_restarts_cleanly(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob"] = BLOB
    server.ignore_range = True
    (tmp_path / "blob.part").write_bytes(b"garbage" * 10)
    download_file(f"{server.base_url}/blob", tmp_path / "blob", verify=sha256_verifier(BLOB_SHA))
    assert (tmp_path / "blob").read_bytes() == BLOB


def test_complete_part_finishes_on_416(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob"] = BLOB
    (tmp_path / "blob.part").write_bytes(BLOB)  # stopped between the last byte and the rename
    download_file(f"{server.base_url}/blob", tmp_path / "blob", verify=sha256_verifier(BLOB_SHA))
    assert (tmp_path / "blob").read_bytes() == BLOB
    assert server.requests == [("/blob", f"bytes={len(BLOB)}-")]


def test_oversized_part_is_discarded(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob"] = BLOB
    (tmp_path / "blob.part").write_bytes(BLOB + b"extra")
    download_file(f"{server.base_url}/blob", tmp_path / "blob", verify=sha256_verifier(BLOB_SHA))
    assert (tmp_path / "blob").read_bytes() == BLOB
    assert [r for _, r in server.requests] == [f"bytes={len(BLOB) + 5}-", None]


def test_checksum_failure_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob"] = BLOB
    with pytest.raises(ChecksumError, match="blob: sha256 is .* expected 0+"):
        download_file(f"{server.base_url}/blob", tmp_path / "blob", verify=sha256_verifier("0" * 64))
    assert listing(tmp_path) == []


def test_http_errors_and_refused_connections(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.base_url}/nope", tmp_path / "nope")
    with pytest.raises(DownloadError, match="cannot connect"):
        download_file("http://127.0.0.1:9/x", tmp_path / "x", timeout=5)  # discard port: refused
    assert listing(tmp_path) == []


def test_progress_bar_shows_the_file_and_its_bytes(
        server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.files["/blob"] = BLOB
    download_file(f"{server.base_url}/blob", tmp_path / "blob", progress=True)
    assert (tmp_path / "blob").read_bytes() == BLOB
    shown = capsys.readouterr().out
    assert "blob" in shown and f"{len(BLOB) / 1000:.1f}/{len(BLOB) / 1000:.1f} kB" in shown, shown


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGETRAIN_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("EDGETRAIN_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "edgetrain"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "edgetrain"


# --------------------------------------------------------------------------- MNIST through mirrors


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


@pytest.fixture
def tiny_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    raw = {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte": _idx(np.array([5, 0, 4, 1, 9, 2], dtype=np.uint8)),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": _idx(np.array([7, 2, 1], dtype=np.uint8)),
    }
    monkeypatch.setattr(mnist_module, "MNIST_RAW_MD5", {n: hashlib.md5(b).hexdigest() for n, b in raw.items()})
    monkeypatch.setattr(mnist_module, "MNIST_COUNTS", {"train": 6, "test": 3})
    return raw


def test_mnist_download_falls_back_to_next_mirror(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist: dict[str, bytes]
) -> None:
    for name, raw in tiny_mnist.items():
        server.files[f"/bad/{name}.gz"] = gzip.compress(raw[:-1] + b"\xff")  # wrong content
        server.files[f"/good/{name}.gz"] = gzip.compress(raw, 9)  # recompressed: only the raw md5 matches
    monkeypatch.setenv("EDGETRAIN_MNIST_MIRRORS", f"{server.base_url}/bad/, {server.base_url}/good/")
    data = load_dataset("mnist", cache_dir=tmp_path)
    assert data.train.y.tolist() == [5, 0, 4, 1, 9, 2] and data.test.y.tolist() == [7, 2, 1]
    assert listing(tmp_path / "mnist") == sorted(f"{n}.gz" for n in tiny_mnist)
    # second load: served from the cache, no new requests
    before = len(server.requests)
    again = load_dataset("mnist", cache_dir=tmp_path, download=False)
    assert again.fingerprint == data.fingerprint and len(server.requests) == before


def test_mnist_download_all_mirrors_bad(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist: dict[str, bytes]
) -> None:
    for name, raw in tiny_mnist.items():
        server.files[f"/bad/{name}.gz"] = gzip.compress(raw + b"\x00")
    monkeypatch.setenv("EDGETRAIN_MNIST_MIRRORS", f"{server.base_url}/bad/")
    with pytest.raises(ChecksumError, match=r"could not download train-images-idx3-ubyte.gz .*md5"):
        load_dataset("mnist", cache_dir=tmp_path)
    assert listing(tmp_path / "mnist") == []
    monkeypatch.setenv("EDGETRAIN_MNIST_MIRRORS", f"{server.base_url}/missing/")
    with pytest.raises(DownloadError, match=r"HTTP 404.*--data-dir"):
        load_dataset("mnist", cache_dir=tmp_path)


def test_corrupted_cache_file_is_reported(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist: dict[str, bytes]
) -> None:
    for name, raw in tiny_mnist.items():
        (tmp_path / "mnist").mkdir(exist_ok=True)
        (tmp_path / "mnist" / f"{name}.gz").write_bytes(gzip.compress(raw))
    tampered = bytearray(tiny_mnist["train-images-idx3-ubyte"])
    tampered[100] ^= 1
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(tampered)))
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz: md5 .* delete it to download again"):
        load_dataset("mnist", cache_dir=tmp_path, download=False)


def test_a_damaged_cached_file_is_downloaded_again_alone(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, raw in tiny_mnist.items():
        server.files[f"/good/{name}.gz"] = gzip.compress(raw)
    monkeypatch.setenv("EDGETRAIN_MNIST_MIRRORS", f"{server.base_url}/good/")
    first = load_dataset("mnist", cache_dir=tmp_path)
    cached = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    cached.write_bytes(cached.read_bytes()[:-5])  # truncated, as by a disk error
    with pytest.raises(DatasetFormatError, match=r"t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip .*"
                       r"damaged cached download: delete it to download again"):
        load_dataset("mnist", cache_dir=tmp_path, download=False)
    assert cached.exists()  # offline, nothing is deleted
    before = len(server.requests)
    with caplog.at_level("WARNING", logger="edgetrain.datasets"):
        again = load_dataset("mnist", cache_dir=tmp_path)
    assert again.fingerprint == first.fingerprint
    assert [path for path, _ in server.requests[before:]] == ["/good/t10k-labels-idx1-ubyte.gz"]  # that file only
    assert "cached" in caplog.text and "t10k-labels-idx1-ubyte.gz is damaged" in caplog.text


# --------------------------------------------------------------------------- TweetEval


TWEETS = {
    "train": [("I love it", 2), ("meh ok", 1), ("I hate it", 0), ("love love", 2), ("hate hate", 0)],
    "val": [("love it", 2), ("ok", 1)],
    "test": [("hate it", 0), ("ok ok", 1), ("so much love", 2)],
}


def tweeteval_files() -> dict[str, bytes]:
    files = {"mapping.txt": b"0\tnegative\n1\tneutral\n2\tpositive\n"}
    for split, rows in TWEETS.items():
        files[f"{split}_text.txt"] = "".join(f"{t} \n" for t, _ in rows).encode()
        files[f"{split}_labels.txt"] = "".join(f"{label}\n" for _, label in rows).encode()
    return files


@pytest.fixture
def tweeteval_server(server: FileServer, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    for name, body in tweeteval_files().items():
        server.files[f"/te/{name}"] = body
    monkeypatch.setenv("EDGETRAIN_TWEETEVAL_URL", f"{server.base_url}/te/")
    return server


def test_tweeteval_download_manifest_and_reuse(tweeteval_server: FileServer, tmp_path: Path) -> None:
    data = load_dataset("tweeteval-sentiment", cache_dir=tmp_path)
    assert (len(data.train), len(data.val or []), len(data.test)) == (5, 2, 3)
    assert data.classes == ("negative", "neutral", "positive") and data.kind == "text"
    folder = tmp_path / "tweeteval-sentiment"
    assert listing(folder) == sorted([*TWEETEVAL_FILES, MANIFEST])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert (
        manifest["files"]["train_text.txt"]["sha256"] == hashlib.sha256(tweeteval_files()["train_text.txt"]).hexdigest()
    )
    before = len(tweeteval_server.requests)
    again = load_dataset("tweeteval-sentiment", cache_dir=tmp_path, download=False)
    assert again.fingerprint == data.fingerprint and len(tweeteval_server.requests) == before
    # a file damaged in the cache: offline, the error says what to do; online, that file alone comes again
    (folder / "test_labels.txt").write_bytes(b"0\n1\n1\n")
    with pytest.raises(ChecksumError, match=r"test_labels.txt: sha256 .* MANIFEST.json recorded .*delete .* again"):
        load_dataset("tweeteval-sentiment", cache_dir=tmp_path, download=False)
    before = len(tweeteval_server.requests)
    mended = load_dataset("tweeteval-sentiment", cache_dir=tmp_path)
    assert mended.fingerprint == data.fingerprint
    assert [path for path, _ in tweeteval_server.requests[before:]] == ["/te/test_labels.txt"]
    assert json.loads((folder / MANIFEST).read_text()) == manifest
    # the source now serves other bytes (another mirror): a mended file must be what the manifest recorded
    (folder / "test_labels.txt").write_bytes(b"0\n1\n1\n")
    tweeteval_server.files["/te/test_labels.txt"] = b"1\n1\n1\n"
    with pytest.raises(ChecksumError, match="test_labels.txt: sha256 is"):
        load_dataset("tweeteval-sentiment", cache_dir=tmp_path)
    assert MANIFEST in listing(folder) and "test_labels.txt" not in listing(folder)  # the pin stays; no bad file
    tweeteval_server.files["/te/test_labels.txt"] = tweeteval_files()["test_labels.txt"]
    assert load_dataset("tweeteval-sentiment", cache_dir=tmp_path).fingerprint == data.fingerprint
    # an unreadable manifest: nothing can be trusted, everything comes again
    (folder / MANIFEST).write_text("{")
    before = len(tweeteval_server.requests)
    assert load_dataset("tweeteval-sentiment", cache_dir=tmp_path).fingerprint == data.fingerprint
    assert sorted(path for path, _ in tweeteval_server.requests[before:]) == sorted(f"/te/{n}" for n in TWEETEVAL_FILES)


def test_tweeteval_resumes_after_interruption(tweeteval_server: FileServer, tmp_path: Path) -> None:
    tweeteval_server.cut_after["/te/train_text.txt"] = 10
    with pytest.raises(DownloadError, match="run again to resume"):
        load_dataset("tweeteval-sentiment", cache_dir=tmp_path)
    folder = tmp_path / "tweeteval-sentiment"
    assert MANIFEST not in listing(folder) and "train_text.txt.part" in listing(folder)
    load_dataset("tweeteval-sentiment", cache_dir=tmp_path)
    assert ("/te/train_text.txt", "bytes=10-") in tweeteval_server.requests
    assert MANIFEST in listing(folder) and not any(n.endswith(".part") for n in listing(folder))


def test_tweeteval_bad_download_is_not_kept(tweeteval_server: FileServer, tmp_path: Path) -> None:
    tweeteval_server.files["/te/val_labels.txt"] = b"<html>\n</html>\n"  # a proxy's error page
    with pytest.raises(DatasetError, match="val_labels.txt: line 1: label '<html>' is not a class id 0..2"):
        load_dataset("tweeteval-sentiment", cache_dir=tmp_path)
    assert listing(tmp_path / "tweeteval-sentiment") == []


def test_tweeteval_offline_or_unreachable_says_pass_data_dir(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DatasetError, match=r"download is off; pass data_dir \(--data-dir\)"):
        load_dataset("tweeteval-sentiment", cache_dir=tmp_path, download=False)
    monkeypatch.setenv("EDGETRAIN_TWEETEVAL_URL", f"{server.base_url}/nothing-here/")
    with pytest.raises(DownloadError, match=r"HTTP 404.*pass data_dir \(--data-dir\)"):
        load_dataset("tweeteval-sentiment", cache_dir=tmp_path)
    assert listing(tmp_path / "tweeteval-sentiment") == []


def test_unwritable_cache_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match="cannot write to the cache .* set EDGETRAIN_CACHE"):
        load_dataset("mnist", cache_dir=blocker)


def test_stale_part_failing_the_checksum_is_fetched_again_whole(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob"] = BLOB
    (tmp_path / "blob.part").write_bytes(b"\xff" * 1000)  # left by another mirror or an older file
    download_file(f"{server.base_url}/blob", tmp_path / "blob", verify=sha256_verifier(BLOB_SHA))
    assert (tmp_path / "blob").read_bytes() == BLOB
    assert [r for _, r in server.requests] == ["bytes=1000-", None]
    assert listing(tmp_path) == ["blob"]


def test_a_mirror_that_is_not_a_url_is_one_error_and_the_next_is_tried(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist: dict[str, bytes]
) -> None:
    for name, raw in tiny_mnist.items():
        server.files[f"/good/{name}.gz"] = gzip.compress(raw)
    monkeypatch.setenv("EDGETRAIN_MNIST_MIRRORS", "mirror.example/mnist/")
    with pytest.raises(DownloadError, match=r"mirror.example/mnist/train-images-idx3-ubyte.gz: not a URL"):
        load_dataset("mnist", cache_dir=tmp_path)
    monkeypatch.setenv("EDGETRAIN_MNIST_MIRRORS", f"mirror.example/mnist/, {server.base_url}/good/")
    assert load_dataset("mnist", cache_dir=tmp_path).test.y.tolist() == [7, 2, 1]
