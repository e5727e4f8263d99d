"""Core lists as users write them for taskset and cpusets ("0-3,8", "0-10:2"), checked against affinity.

`--cores auto` takes the cores from the environment instead: the affinity a cpuset or the kubelet's static CPU
manager gave the process, capped by a cgroup CPU quota (see `auto_cores`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgetrain.errors import CoresError

_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")
_AUTO = re.compile(r"^auto(?:-(\d+))?$")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_cores(text: str) -> list[int]:
    """Parse a cpuset-style list into sorted unique core ids.

    Accepts comma-separated items: `N`, `A-B` (inclusive) and `A-B:S` (every S-th from A to B), as in
    taskset(1) and cpuset(7). Raises CoresError naming the bad item.
    """
    text = text.strip()
    if not text:
        raise CoresError("empty core list; give cores like 0-3,8 or 0-10:2")
    cores: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        m = _ITEM.match(item)
        if not m:
            raise CoresError(f"cannot read core list item {item!r}; use N, A-B or A-B:STEP (e.g. 0-3,8)")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        step = int(m.group(3)) if m.group(3) is not None else 1
        if end < start:
            raise CoresError(f"core range {item!r} runs backwards")
        if step < 1:
            raise CoresError(f"core range {item!r} has step {step}; it must be at least 1")
        cores.update(range(start, end + 1, step))
    return sorted(cores)


def format_cores(cores: list[int] | tuple[int, ...] | set[int]) -> str:
    """The shortest cpuset-style string for these cores: [0,1,2,3,8] -> "0-3,8"."""
    out: list[str] = []
    ordered = sorted(set(cores))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def allowed_cores() -> list[int]:
    """Cores this process may run on (affinity and cpusets respected, unlike os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # pragma: no cover - macOS/Windows


def validate_cores(cores: list[int], allowed: list[int] | None = None) -> list[int]:
    """Refuse cores outside this process's affinity, saying which ones and what is allowed."""
    allowed = allowed_cores() if allowed is None else allowed
    outside = sorted(set(cores) - set(allowed))
    if outside:
        raise CoresError(
            f"cores {format_cores(outside)} are not available to this process; "
            f"allowed: {format_cores(allowed)} ({len(allowed)} cores)"
        )
    return cores


def split_cores(cores: list[int], groups: int) -> list[list[int]]:
    """Split cores into `groups` disjoint, near-equal, contiguous groups (first groups get the extra)."""
    if groups < 1:
        raise CoresError(f"cannot split cores into {groups} groups")
    if groups > len(cores):
        raise CoresError(f"{groups} groups need at least {groups} cores; only {len(cores)} given")
    base, extra = divmod(len(cores), groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(cores[start : start + size])
        start += size
    return out


def pin_current_process(cores: list[int]) -> bool:
    """Pin this process to `cores` and cap native thread pools to their count.

    Call before torch creates its thread pools. Returns False (and pins nothing) where the OS has no
    affinity API (macOS): the caller warns and goes on.
    """
    n = str(len(cores))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = n
    if not hasattr(os, "sched_setaffinity"):  # pragma: no cover - macOS
        return False
    os.sched_setaffinity(0, cores)
    # sched_setaffinity(0) moves only the calling thread: move the threads that already exist too
    # (gRPC's, the interpreter's helpers), so the whole process stays on its cores.
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # pragma: no cover - no /proc
        tids = []
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # the thread ended meanwhile
            continue
    return True


def read_affinity(pid: int) -> list[int]:
    """Cores the kernel lets `pid` run on, read from /proc/PID/status (Cpus_allowed_list)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Cpus_allowed_list:"):
                return parse_cores(line.split(":", 1)[1])
    raise CoresError(f"no Cpus_allowed_list in /proc/{pid}/status")


# ---------------------------------------------------------------------------- --cores auto


def _quota_at(folder: Path) -> float | None:
    """CPUs the quota file in one cgroup folder allows (v2 cpu.max, else v1 cfs files); None: no limit there."""
    try:
        if (folder / "cpu.max").exists():  # cgroup v2: "QUOTA PERIOD" in microseconds, QUOTA "max" = none
            quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or "100000")
        if (folder / "cpu.cfs_quota_us").exists():  # cgroup v1: -1 = none
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota_us < 0 else quota_us / period_us
    except (OSError, ValueError):  # unreadable or odd: no limit we can honour
        return None
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs, e.g. 2.0) on this process's cgroup and its parents; None if unlimited.

    Reads `/proc/self/cgroup` for the process's cgroup path: the unified (v2) line `0::/path` with `cpu.max`
    under `root`, else the v1 `cpu` controller's line with `cpu.cfs_quota_us` under `root/cpu`. Inside a
    container the path is usually `/` (a cgroup namespace) and the container's own limit sits at the root.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[tuple[Path, str]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "" and (root / "cgroup.controllers").exists():
            found.append((root, path))
        elif "cpu" in controllers.split(","):
            found.append((root / "cpu", path))
    limits: list[float] = []
    for base, path in found:
        folder = base / path.strip().lstrip("/")
        while True:
            q = _quota_at(folder)
            if q is not None:
                limits.append(q)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


@dataclass(frozen=True)
class AutoCores:
    """What `--cores auto` chose, and the one line that says why."""

    cores: list[int]
    reason: str


def is_auto(text: str) -> bool:
    return text.strip().lower().startswith("auto")


def auto_cores(text: str = "auto", allowed: list[int] | None = None, quota: float | None | str = "read") -> AutoCores:
    """`auto` or `auto-N`: the cores this process may use, capped by its CPU quota, N of them kept free.

    The set is `sched_getaffinity` (what a cpuset or the kubelet's static CPU manager gives). A cgroup quota
    of Q CPUs (e.g. a Kubernetes CPU limit without exclusive cores) keeps floor(Q) of them, at least one:
    torch would otherwise start a thread per core of the host and the quota would throttle them all. `auto-N`
    then leaves the first N cores free for the system (the kernel's housekeeping usually runs on the lowest).
    """
    m = _AUTO.match(text.strip().lower())
    if not m:
        raise CoresError(f"--cores {text!r}: write auto, or auto-N to keep N cores free")
    keep_free = int(m.group(1) or 0)
    allowed = allowed_cores() if allowed is None else sorted(allowed)
    limit = cgroup_cpu_limit() if quota == "read" else quota
    assert not isinstance(limit, str)
    count = len(allowed)
    quota_note = "no cgroup CPU quota"
    if limit is not None:
        count = min(count, max(1, math.floor(limit + 1e-9)))
        quota_note = f"cgroup CPU quota {limit:g} CPUs" + (f" -> {count} of them" if count < len(allowed) else "")
    if count <= keep_free:
        raise CoresError(f"--cores {text}: {count} usable core(s) (affinity {format_cores(allowed)}, {quota_note}) "
                         f"and {keep_free} kept free leave none to train on")
    chosen = allowed[keep_free:count]
    reason = (f"--cores {text}: {format_cores(chosen)} ({len(chosen)} cores, {len(chosen)} torch threads) from "
              f"affinity {format_cores(allowed)}, {quota_note}")
    if keep_free:
        reason += f", first {keep_free} kept free"
    return AutoCores(chosen, reason)


def resolve_cores(text: str) -> tuple[list[int], str | None]:
    """A `--cores` value: an explicit list (no reason to print) or `auto[-N]` (with the line saying why)."""
    if is_auto(text):
        auto = auto_cores(text)
        return auto.cores, auto.reason
    return parse_cores(text), None
