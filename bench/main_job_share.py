"""Where a run's training phase went, from its run dir: the README job's training share, taken apart.

For each run dir (`coordinator run --run-dir DIR`), from `rounds.jsonl` and `result.json`: the wall time from
the first round's start to the end (the training share's denominator), and its parts: the agents' mean time in
training steps (the share itself), the wait in each round for the slowest agent (its compute minus the mean),
sync (each round's time beyond its slowest agent's compute: the update's trip, aggregation, the next round's
weights), and what came after the last round (the final evaluation and checkpoint). Prints a markdown table.

    for i in 1 2 3; do coordinator run --dataset tweets --local-agents 2 --run-dir /tmp/share-$i; done
    python bench/main_job_share.py /tmp/share-1 /tmp/share-2 /tmp/share-3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parts(run: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines() if line.strip()]
    wall = float(json.loads((run / "result.json").read_text())["wall_seconds"])
    computes = [[n["compute_seconds"] for n in r["nodes"].values()] for r in records]
    mean = sum(sum(c) / len(c) for c in computes)
    slowest = sum(max(c) for c in computes)
    sync = sum(r["sync_overhead_seconds"] for r in records)
    return {"rounds": len(records), "wall": wall, "compute": mean, "wait": slowest - mean, "sync": sync,
            "after": wall - records[-1]["elapsed_seconds"],
            "evaluations": sum(1 for r in records if "accuracy" in r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs of `coordinator run`")
    args = ap.parse_args()
    print("| run | rounds | wall since round 1 s | training (share) | wait for the slowest | sync | after the last "
          "round | evaluations |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        p = parts(run)
        w = p["wall"]
        print(f"| {run} | {p['rounds']:.0f} | {w:.2f} | {p['compute']:.2f} s ({p['compute'] / w:.1%}) | "
              f"{p['wait']:.2f} s ({p['wait'] / w:.1%}) | {p['sync']:.2f} s ({p['sync'] / w:.1%}) | "
              f"{p['after']:.2f} s | {p['evaluations']:.0f} |")


if __name__ == "__main__":
    main()
