"""Processes x threads inside one agent: 1 worker with all cores as threads vs one worker per core (gloo).

The paper found that how cores are grouped matters more than how many there are. One agent on all allowed
cores trains the same rounds with `--workers 1` (one process, N torch threads) and `--workers N` (N pinned
processes, 1 thread each, gradients all-reduced every step); samples/s and accuracy are printed per model.

    python bench/multiworker.py --rounds 20 --models text-gru,text-cnn
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetrain.coordinator.config import CoordinatorConfig  # noqa: E402
from edgetrain.coordinator.run import Coordinator  # noqa: E402

from edgetrain.cores import allowed_cores  # noqa: E402
from edgetrain.spec import RunSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--models", default="text-gru,text-cnn")
    args = p.parse_args()
    n = len(allowed_cores())
    print(f"{'model':9} {'layout':22} {'samples/s':>9} {'accuracy':>8}")
    for model in args.models.split(","):
        rates = {}
        for workers in (1, n):
            spec = RunSpec(dataset="tweets", model=model, seed=0)
            cfg = CoordinatorConfig(spec=spec, port=0, local_steps=8, rounds=args.rounds, local_agents=1,
                                    local_workers=workers, eval_every=args.rounds, progress=False, round_timeout=600)
            result = Coordinator(cfg).run()
            assert result.final is not None
            hist = result.history[1:]
            rate = sum(r.samples for r in hist) / sum(r.duration_seconds for r in hist)
            rates[workers] = rate
            layout = f"1 worker x {n} threads" if workers == 1 else f"{n} workers x 1 thread"
            print(f"{model:9} {layout:22} {rate:9.0f} {result.final.accuracy:8.4f}", flush=True)
        print(f"{model:9} {n} workers / 1 worker: {rates[n] / rates[1]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
