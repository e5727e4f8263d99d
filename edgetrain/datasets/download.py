"""Cache directory, resumable HTTP downloads, checksums and atomic writes.

Guarantees: a file under its final name in the cache is always complete and verified.
Downloads stream into ``<name>.part``; an interrupted transfer keeps the ``.part`` so the
next attempt resumes it with an HTTP ``Range`` request; a finished transfer is verified
and only then renamed into place (``os.replace``, atomic on POSIX). A failed verification
deletes the ``.part``. Loaders never read ``.part`` files.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from edgetrain.datasets.base import DownloadError
from edgetrain.errors import ChecksumError, DatasetError

try:  # POSIX advisory locks; elsewhere concurrent downloads of one file are not guarded.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

Verifier = Callable[[Path], None]
_CHUNK = 1 << 16
_USER_AGENT = "edgetrain-datasets/1 (+https://pypi.org/project/edgetrain)"
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def default_cache_dir() -> Path:
    """Cache root: ``$EDGETRAIN_CACHE``, else ``$XDG_CACHE_HOME/edgetrain``, else ``~/.cache/edgetrain``."""
    explicit = os.environ.get("EDGETRAIN_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "edgetrain"
    return Path.home() / ".cache" / "edgetrain"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bytes_digest(data: bytes, algorithm: str = "sha256") -> str:
    """Hex digest of ``data``."""
    return hashlib.new(algorithm, data).hexdigest()


def sha256_verifier(expected: str) -> Verifier:
    """Return a verifier that raises :class:`ChecksumError` unless the file's sha256 is ``expected``."""

    def verify(path: Path) -> None:
        got = file_digest(path)
        if got != expected:
            raise ChecksumError(f"sha256 is {got}, expected {expected}")

    return verify


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``directory/.lock`` (creates the directory).

    Serialises downloads into one cache directory between processes on one machine.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = (directory / ".lock").open("a")
    except OSError as exc:
        raise DatasetError(
            f"{directory}: cannot write to the cache ({exc.strerror or exc}); "
            "set EDGETRAIN_CACHE or pass cache_dir (--cache-dir) to a writable folder"
        ) from None
    with handle:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def download_file(
    url: str,
    dest: Path,
    *,
    verify: Verifier | None = None,
    progress: bool = False,
    timeout: float = 60.0,
) -> None:
    """Download ``url`` to ``dest``, resuming ``dest.part`` when a previous attempt left one.

    ``verify`` (raising :class:`DatasetError`) runs on the complete ``.part`` before the
    atomic rename; if it raises, the ``.part`` is deleted and the error is re-raised with
    the URL in front (so a verifier's message need not name the file). Network
    failures raise :class:`DownloadError` and keep the ``.part`` for the next attempt.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = _download_to_part(url, part, progress=progress, timeout=timeout, label=dest.name)
    if verify is not None:
        try:
            verify(part)
        except DatasetError as exc:
            part.unlink(missing_ok=True)
            if not resumed:
                raise type(exc)(f"{url}: {exc}") from None
            # The kept prefix may be stale (another mirror, an older file): one clean retry from byte 0.
            _download_to_part(url, part, progress=progress, timeout=timeout, label=dest.name)
            try:
                verify(part)
            except DatasetError as again:
                part.unlink(missing_ok=True)
                raise type(again)(f"{url}: {again}") from None
    os.replace(part, dest)
    _fsync_dir(dest.parent)


def _download_to_part(url: str, part: Path, *, progress: bool, timeout: float, label: str) -> bool:
    """Complete ``part`` from ``url``; True when it kept bytes from an earlier attempt."""
    for attempt in range(2):  # the second attempt only after discarding an unusable .part
        offset = part.stat().st_size if part.exists() else 0
        try:
            return _transfer(url, part, offset, progress=progress, timeout=timeout, label=label)
        except _RestartError:
            part.unlink(missing_ok=True)
            if attempt:
                break
    raise DownloadError(f"{url}: the server's byte ranges make no sense; giving up")


class _RestartError(Exception):
    """The partial file cannot be resumed: delete it and start over."""


def _transfer(url: str, part: Path, offset: int, *, progress: bool, timeout: float, label: str) -> bool:
    """Fetch ``url`` into ``part`` from byte ``offset``; True when the existing bytes were kept."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        request = urllib.request.Request(url, headers=headers)
    except ValueError as exc:  # no scheme: a mirror or URL set in the environment
        raise DownloadError(f"{url}: not a URL ({exc})") from None
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Range not satisfiable: either the .part is already complete (we stopped
            # between the last byte and the rename) or it is longer than the file.
            match = _CONTENT_RANGE_RE.fullmatch((exc.headers.get("Content-Range") or "").strip())
            exc.close()
            if match and match.group(3) != "*" and int(match.group(3)) == offset:
                return True
            raise _RestartError from None
        exc.close()
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect: {reason}") from None
    with response:
        status = response.status
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if offset and status == 206:
            match = _CONTENT_RANGE_RE.fullmatch((response.headers.get("Content-Range") or "").strip())
            if not match or match.group(1) is None or int(match.group(1)) != offset:
                raise _RestartError
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        elif status == 200:
            offset, mode = 0, "wb"  # the server ignored Range (or none was sent): start over
            total = length
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {status}")
        if total is None and length is not None:
            total = offset + length
        try:
            with part.open(mode) as out:
                written = _copy(response, out, offset, total, progress=progress, label=label, url=url)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:  # disk full, permissions: the network is not to blame
            raise DatasetError(f"{part}: cannot write ({exc.strerror or exc})") from None
    if total is not None and written != total:
        raise DownloadError(
            f"{url}: connection closed after {written} of {total} bytes; run again to resume from {part.name}"
        )
    return mode == "ab"


def _copy(
    response: IO[bytes],
    out: IO[bytes],
    offset: int,
    total: int | None,
    *,
    progress: bool,
    label: str,
    url: str,
) -> int:
    written = offset
    bar = _progress_bar(label, total, offset) if progress else None
    try:
        while True:
            try:
                block = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, short reads mid-stream
                raise DownloadError(
                    f"{url}: transfer interrupted after {written} bytes ({exc}); run again to resume"
                ) from None
            if not block:
                return written
            out.write(block)
            written += len(block)
            if bar is not None:
                bar.advance(len(block))
    finally:
        if bar is not None:
            bar.stop()


class _Bar:
    """A one-task rich progress bar (only created when progress=True)."""

    def __init__(self, label: str, total: int | None, done: int) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._progress.add_task(label, total=total, completed=done)
        self._progress.start()

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def stop(self) -> None:
        self._progress.stop()


def _progress_bar(label: str, total: int | None, done: int) -> _Bar:
    return _Bar(label, total, done)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
