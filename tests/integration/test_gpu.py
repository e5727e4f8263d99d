"""GPU paths: exercised where a CUDA device exists; on CPU-only machines they skip, saying why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from edgetrain.coordinator.config import CoordinatorConfig
from edgetrain.coordinator.run import Coordinator

from edgetrain.spec import RunSpec

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device on this machine (torch.cuda.is_available() is False)"
)


@needs_cuda
@pytest.mark.gpu
def test_a_local_gpu_worker_joins_the_same_rounds_as_a_cpu_agent(tmp_path: Path) -> None:
    spec = RunSpec(dataset="tweets", limit=3000, seed=4)
    cfg = CoordinatorConfig(
        spec=spec,
        port=0,
        local_steps=4,
        rounds=4,
        local_agents=1,
        local_devices=("cuda:0",),
        eval_every=4,
        run_dir=tmp_path,
        progress=False,
        round_timeout=300,
    )
    result = Coordinator(cfg).run()
    assert result.completed_rounds == 4
    assert set(result.nodes) == {"local-0", "gpu-0"}
    assert all(n.rounds == 4 for n in result.nodes.values())
    assert result.final is not None and 0 < result.final.accuracy <= 1


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given when CUDA is missing")
def test_asking_for_cuda_without_it_is_one_clear_line() -> None:
    agent = subprocess.run(
        [sys.executable, "-m", "edgetrain.agent", "start", "--coordinator", "127.0.0.1:9", "--cores", "0", "--device",
         "cuda:0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert agent.returncode == 1
    assert agent.stderr.strip().splitlines() == [
        "edge-agent: error: device cuda:0 requested, but torch sees no CUDA device here"
    ]
    coord = subprocess.run(
        [sys.executable, "-m", "edgetrain.coordinator", "run", "--rounds", "1", "--local-gpus", "all"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert coord.returncode == 1
    assert coord.stderr.strip().splitlines() == ["coordinator: error: --local-gpus all: torch sees no CUDA device here"]
