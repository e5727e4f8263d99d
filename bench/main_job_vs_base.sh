#!/usr/bin/env bash
# The README's main job (`coordinator run --dataset tweets --local-agents 2`) with this checkout's defaults
# against those of another revision (default: main), alternating, in one session: wall time of the whole
# command, training time, test accuracy. Run it under the bench lock:
#
#   flock /tmp/edgetrain-bench.lock bench/main_job_vs_base.sh [REVISION] [PAIRS]
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-main}
PAIRS=${2:-2}
PY=${PYTHON:-$(command -v python)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/base" && git archive "$REV" | tar -x -C "$work/base"
for i in $(seq 1 "$PAIRS"); do
  for which in base here; do
    if [[ $which == base ]]; then dir=$work/base; else dir=$PWD; fi
    rd=$work/run-$which-$i
    t0=$(date +%s.%N)
    (cd "$dir" && "$PY" -c "from coordinator.cli import main; main()" run --dataset tweets --local-agents 2 \
      --port 0 --no-progress --run-dir "$rd" > "$rd.out" 2>&1)
    t1=$(date +%s.%N)
    "$PY" - "$rd" "$which" "$i" "$(echo "$t1 - $t0" | bc)" <<'PYEOF'
import json, sys
from pathlib import Path
rd, which, i, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
log = [json.loads(line) for line in (rd / "rounds.jsonl").read_text().splitlines()]
last = log[-1]
kept = ""
if (rd / "result.json").exists():
    r = json.loads((rd / "result.json").read_text())
    kept = f"; kept round {r['round']} (on val): test accuracy {100 * r['test']['accuracy']:.1f} %"
print(f"{which} {i}: wall {wall:.0f} s, {len(log)} rounds, training {last['elapsed_seconds']:.1f} s, "
      f"last round's test accuracy {100 * last['accuracy']:.1f} %{kept}", flush=True)
PYEOF
  done
done
