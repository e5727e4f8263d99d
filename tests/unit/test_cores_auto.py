"""`--cores auto`: affinity capped by a cgroup CPU quota, read from fake cgroup trees and from this process itself."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetrain.cores import auto_cores, cgroup_cpu_limit, format_cores, resolve_cores
from edgetrain.errors import CoresError

REPO = Path(__file__).resolve().parents[2]


def fake_v2(tmp_path: Path, path: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree under tmp_path: `limits` maps a cgroup folder to its cpu.max."""
    root = tmp_path / "cgroup"
    (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for folder, text in limits.items():
        (root / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / folder.lstrip("/") / "cpu.max").write_text(text + "\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def test_v2_quota_is_quota_over_period(tmp_path: Path) -> None:
    root, proc = fake_v2(tmp_path, "/", {"/": "200000 100000"})
    assert cgroup_cpu_limit(root, proc) == 2.0


def test_v2_max_means_no_limit(tmp_path: Path) -> None:
    root, proc = fake_v2(tmp_path, "/", {"/": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None


def test_v2_tightest_limit_along_the_path_wins(tmp_path: Path) -> None:
    # a kubepods-like tree: the pod's parent allows 3.5 CPUs, the container 1.5, a sibling's limit is not ours
    root, proc = fake_v2(tmp_path, "/kubepods/pod1/ctr", {
        "/kubepods": "max 100000", "/kubepods/pod1": "350000 100000", "/kubepods/pod1/ctr": "150000 100000",
        "/kubepods/pod2": "50000 100000"})
    assert cgroup_cpu_limit(root, proc) == 1.5
    (root / "kubepods/pod1/ctr/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, proc) == 3.5


def test_v1_cfs_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    folder = root / "cpu" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("150000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_limit(root, proc) == 1.5
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


def test_quota_caps_the_affinity_so_a_64_core_host_with_2_cpus_gets_2_threads() -> None:
    chosen = auto_cores("auto", allowed=list(range(64)), quota=2.0)
    assert chosen.cores == [0, 1]
    assert "2 cores, 2 torch threads" in chosen.reason and "quota 2 CPUs -> 2 of them" in chosen.reason


def test_a_fractional_quota_rounds_down_but_keeps_one_core() -> None:
    assert auto_cores("auto", allowed=list(range(8)), quota=2.5).cores == [0, 1]
    assert auto_cores("auto", allowed=list(range(8)), quota=0.5).cores == [0]


def test_a_quota_above_the_affinity_changes_nothing() -> None:
    chosen = auto_cores("auto", allowed=[2, 3, 5], quota=16.0)
    assert chosen.cores == [2, 3, 5]
    assert "affinity 2-3,5" in chosen.reason


def test_auto_n_keeps_the_first_n_cores_free() -> None:
    assert auto_cores("auto-1", allowed=[0, 1, 2, 3], quota=None).cores == [1, 2, 3]
    assert auto_cores("AUTO-2", allowed=[4, 5, 6, 7], quota=3.0).cores == [6]
    assert "first 1 kept free" in auto_cores("auto-1", allowed=[0, 1], quota=None).reason


@pytest.mark.parametrize(("text", "allowed", "quota"), [
    ("auto-1", [0], None), ("auto-2", [0, 1], None), ("auto-1", list(range(8)), 1.0), ("auto", [], None)])
def test_nothing_left_to_train_on_is_refused_in_one_line(text: str, allowed: list[int], quota: float | None) -> None:
    with pytest.raises(CoresError, match="leave none to train on") as err:
        auto_cores(text, allowed=allowed, quota=quota)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["auto-", "auto-x", "automatic", "auto-1-2"])
def test_bad_auto_spellings_are_refused(text: str) -> None:
    with pytest.raises(CoresError, match="write auto, or auto-N"):
        auto_cores(text, allowed=[0, 1], quota=None)


def test_resolve_reads_lists_as_before_and_auto_from_this_process() -> None:
    assert resolve_cores("0") == ([0], None)
    cores, why = resolve_cores("auto")
    allowed = sorted(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    assert cores == (allowed if limit is None else allowed[: max(1, int(limit))])
    assert why is not None and format_cores(cores) in why


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_auto_follows_the_real_affinity_taskset_gives() -> None:
    """The kernel's affinity, not the machine's cores: run under `taskset -c <one allowed core>`."""
    core = max(os.sched_getaffinity(0))
    code = "from edgetrain.cores import resolve_cores; print(resolve_cores('auto')[0])"
    out = subprocess.run(["taskset", "-c", str(core), sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == f"[{core}]"
    refused = subprocess.run(["taskset", "-c", str(core), sys.executable, "-m", "edgetrain.agent", "start",
                              "--coordinator",
                              "127.0.0.1:1", "--cores", "auto-1"], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-agent: error: --cores auto-1: 1 usable core(s)"), lines
