"""Compressed updates: bytes per update and accuracy for float32, float16, bfloat16 and int8 (with error feedback).

Same run (tweets, 2 local agents, K local steps, same seed and rounds) for each wire dtype; compressed updates
travel as deltas against the round's weights, and each agent carries what compression dropped into its next
update (error feedback).

    python bench/compression.py --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgetrain.coordinator.config import CoordinatorConfig  # noqa: E402
from edgetrain.coordinator.run import Coordinator  # noqa: E402

from edgetrain.spec import RunSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--dtypes", default="float32,float16,bfloat16,int8")
    args = p.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        spec = RunSpec(dataset="tweets", seed=0, update_dtype=dtype)
        cfg = CoordinatorConfig(spec=spec, port=0, local_steps=args.local_steps, rounds=args.rounds, local_agents=2,
                                eval_every=args.rounds, progress=False, round_timeout=600)
        result = Coordinator(cfg).run()
        assert result.final is not None
        per_update = statistics.median(n.bytes for r in result.history for n in r.nodes.values())
        per_round = statistics.median(sum(n.bytes for n in r.nodes.values()) for r in result.history)
        rows.append((dtype, per_update, per_round, result.final.accuracy, result.final.macro_f1))
    base = rows[0]
    print(f"{'update dtype':12} {'MB/update':>9} {'MB/round up':>11} {'vs first':>8} {'accuracy':>8} {'macro-F1':>8}")
    for dtype, upd, rnd, acc, f1 in rows:
        print(f"{dtype:12} {upd / 1e6:9.2f} {rnd / 1e6:11.2f} {upd / base[1]:8.2f} {acc:8.4f} {f1:8.4f}")


if __name__ == "__main__":
    main()
