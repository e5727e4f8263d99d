"""--workers auto and --local-agents auto for real: pinned probe processes on this machine's cores, the cache, the CLIs.

These check what the probe does (every candidate measured in fresh pinned processes, the rule applied to what was
measured, the answer cached and reused); which split is faster is a benchmark's business (docs/performance.md).
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.run import Coordinator

from edgetrain.spec import DataLocation, RunSpec
from edgetrain.split import MAX_STEPS, MIN_STEPS, ROUNDS, cache_key, cached_split, candidates, choose_split, pick

REPO = Path(__file__).resolve().parents[2]
CORES = sorted(os.sched_getaffinity(0))
SPEC = RunSpec(dataset="tweets", model="text-bag", limit=600, batch_size=16, seed=3)
pytestmark = pytest.mark.skipif(len(CORES) < 2, reason="one core has no split to choose")


def test_probe_measures_every_candidate_picks_by_the_rule_and_caches(tmp_path: Path) -> None:
    cores = CORES[:2]
    said: list[str] = []
    left: list[bool] = []
    split = choose_split(SPEC, DataLocation(), cores, mode="ddp", cache_dir=tmp_path, say=said.append,
                         before_probe=lambda: left.append(True))
    assert left == [True] and not split.cached
    assert [(t.processes, t.threads) for t in split.trials] == candidates(2)
    assert len(said) == 2 * ROUNDS and "probing 1x2" in said[0] and "probing 1x2" in said[-1]  # A B B A
    for t in split.trials:
        assert t.samples_per_s > 0 and t.seconds > 0 and MIN_STEPS <= t.steps <= MAX_STEPS
    best = pick(split.trials)
    assert (split.processes, split.threads) == (best.processes, best.threads)
    assert split.probe_seconds > sum(t.seconds for t in split.trials)  # the wall time includes the start-ups
    hit = cached_split(cache_key(SPEC, cores, "ddp", 1), tmp_path)
    assert hit is not None and hit.trials == split.trials
    t0 = time.perf_counter()
    again = choose_split(SPEC, DataLocation(), cores, mode="ddp", cache_dir=tmp_path,
                         before_probe=lambda: left.append(True))
    assert again.cached and (again.processes, again.threads) == (split.processes, split.threads)
    assert left == [True] and time.perf_counter() - t0 < 2.0  # no second probe


def test_local_agents_auto_starts_the_chosen_number_and_the_next_start_is_cached(tmp_path: Path) -> None:
    env = dict(os.environ, EDGETRAIN_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "edgetrain.coordinator", "run", "--dataset", "tweets", "--model", "text-bag",
           "--limit", "600",
           "--batch-size", "16", "--local-agents", "auto", "--rounds", "2", "--local-steps", "2", "--port", "0",
           "--no-progress"]
    first = subprocess.run([*cmd, "--run-dir", str(tmp_path / "a")], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "--local-agents auto" in first.stderr and "probing 1x" in first.stderr
    hit = cached_split(cache_key(RunSpec(dataset="tweets", model="text-bag", limit=600, batch_size=16), CORES,
                                 "lockstep", 2), tmp_path / "cache")
    assert hit is not None
    nodes = [line for line in first.stdout.splitlines() if line.strip().startswith("│ local-")]
    assert len(nodes) == hit.processes, first.stdout  # one summary row per local agent started
    second = subprocess.run([*cmd, "--run-dir", str(tmp_path / "b")], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cached" in second.stderr and "probing" not in second.stderr


def test_an_agent_with_workers_auto_leaves_probes_and_joins_again_with_the_chosen_count(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(spec=SPEC, port=0, local_steps=2, rounds=2, min_agents=1, progress=False,
                            round_timeout=120, join_timeout=300)
    coord = Coordinator(cfg)
    coord.start()
    runner = threading.Thread(target=coord.run)
    runner.start()
    env = dict(os.environ, EDGETRAIN_CACHE=str(tmp_path / "cache"))
    try:
        agent = subprocess.run(
            [sys.executable, "-m", "edgetrain.agent", "start", "--coordinator", f"127.0.0.1:{coord.port}", "--cores",
             "auto",
             "--workers", "auto", "--name", "prober", "--give-up-after", "60"],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        runner.join(120)
        assert agent.returncode == 0, agent.stderr[-2000:]
        assert "--cores auto:" in agent.stdout
        assert "--workers auto: measuring" in agent.stderr
        hit = cached_split(cache_key(SPEC, CORES, "ddp", 1), tmp_path / "cache")
        assert hit is not None
        assert coord.engine is not None and coord.engine.completed_rounds == 2
        # the rounds were trained by the chosen number of workers: each worker's batch counts
        records = [line for line in (agent.stderr + agent.stdout).splitlines() if "starting" in line]
        assert any(f"starting {hit.processes} worker(s)" in line for line in records), records
    finally:
        coord.stop.set()
        runner.join(60)
