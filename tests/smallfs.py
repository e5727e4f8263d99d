"""A real small filesystem that fills up: a tmpfs the test mounts (as root), and a ballast file to fill it.

Where mounting is not permitted (not root, no mount(8), a container without CAP_SYS_ADMIN) the test is skipped
with the reason; under ``CI=true`` it fails instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _cannot(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires the disk-fault tests to run (as root)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted at `path` (made if needed), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        _cannot("mounting a small tmpfs needs root")
    if shutil.which("mount") is None:
        _cannot("no mount(8) on this machine")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        _cannot(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)  # a child still in it


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> Path:
    """A ballast file in `path`'s filesystem that leaves about `leave` bytes free (whole pages); delete it to free."""
    ballast = path / "ballast"
    chunk = b"\xa5" * (1 << 16)
    with open(ballast, "ab", buffering=0) as fh:  # unbuffered: a failed write leaves nothing to flush at close
        while (room := free_bytes(path) - leave) > 0:
            try:
                fh.write(chunk[:room])
            except OSError:  # ENOSPC a little early (page rounding): full enough
                break
    return ballast
