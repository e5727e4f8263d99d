"""Balanced synchronous rounds: two agents of unequal speed, equal work per node vs work sized by speed.

One agent shares its core with a busy process (a spinning loop pinned to the same core), so it runs at about
half speed. With equal work every round waits for it; with `--balance` the coordinator sizes each node's
local steps by its measured samples/s (the sample-weighted average stays correct: each update weighs by the
samples it really trained on). Prints median round time, samples/s and final accuracy for both.

    python bench/balance.py                    # tweets, 30 rounds each
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetrain.coordinator.config import CoordinatorConfig  # noqa: E402
from edgetrain.coordinator.run import Coordinator  # noqa: E402

from edgetrain.cores import allowed_cores  # noqa: E402
from edgetrain.spec import RunSpec  # noqa: E402

SPIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def run(balance: bool, rounds: int, limit: int) -> dict[str, float]:
    spec = RunSpec(dataset="tweets", limit=limit, seed=3)
    cfg = CoordinatorConfig(spec=spec, port=0, local_steps=8, rounds=rounds, local_agents=2, eval_every=rounds,
                            balance=balance, progress=False, round_timeout=600)
    result = Coordinator(cfg).run()
    hist = result.history[2:]  # the first rounds measure speeds (and warm up)
    steps = {n: statistics.median(r.nodes[n].samples / 64 for r in hist if n in r.nodes)
             for n in result.nodes}
    assert result.final is not None
    return {
        "round_s": statistics.median(r.duration_seconds for r in hist),
        "samples_per_s": sum(r.samples for r in hist) / sum(r.duration_seconds for r in hist),
        "accuracy": result.final.accuracy,
        "macro_f1": result.final.macro_f1,
        **{f"steps_{n}": s for n, s in steps.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--limit", type=int, default=0, help="tweets used (0: all)")
    args = p.parse_args()
    cores = allowed_cores()
    if len(cores) < 2:
        raise SystemExit("needs 2 cores: one agent per core, one of them shared with a busy process")
    busy = subprocess.Popen([sys.executable, "-c", SPIN, str(cores[1])])  # slows local-1 (pinned to cores[1])
    try:
        equal = run(False, args.rounds, args.limit)
        balanced = run(True, args.rounds, args.limit)
    finally:
        busy.kill()
        busy.wait()
    print(f"{'':10} {'round s':>8} {'samples/s':>10} {'accuracy':>9} {'macro-F1':>9}  steps per node")
    for name, r in (("equal", equal), ("balanced", balanced)):
        steps = ", ".join(f"{k[6:]} {v:.0f}" for k, v in r.items() if k.startswith("steps_"))
        print(f"{name:10} {r['round_s']:8.3f} {r['samples_per_s']:10.0f} {r['accuracy']:9.4f} {r['macro_f1']:9.4f}  "
              f"{steps}")
    print(f"round time balanced / equal: {balanced['round_s'] / equal['round_s']:.2f}; "
          f"samples/s ratio: {balanced['samples_per_s'] / equal['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
