"""Core lists as users write them for taskset and cpusets ("0-3,8", "0-10:2"), checked against affinity."""

from __future__ import annotations

import os
import re

from edgetrain.errors import CoresError

_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


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
