#!/usr/bin/env bash
# The paper's CPU-affinity sweep (its Table 1) and the processes x threads layouts, as run for
# docs/benchmarks.md on a 2-core machine. On a bigger machine, leave out --affinity to sweep
# 1, 2, 4, 8, ... cores, and add layouts such as 1x8,2x4,4x2,8x1. FULL=1: whole data sets.
#
#   bench/paper_affinity.sh
#   FULL=1 bench/paper_affinity.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST_DIR=${MNIST_DIR:-/work/shared/data/mnist}
OUT=${OUT:-bench/results}
if [[ "${FULL:-0}" == 1 ]]; then
  size=(--epochs 1 --repeats 3)
  gru_size=(--epochs 1 --repeats 3)
  mnist_size=(--epochs 1 --repeats 3)
  sweep=()  # default: powers of two up to the allowed cores
else
  size=(--epochs 0.5 --repeats 3)
  gru_size=(--epochs 0.25 --repeats 3)
  mnist_size=(--limit 12000 --epochs 1 --repeats 3)
  sweep=(--affinity 1,2 --layout 1x2,2x1)
fi

python bench/quiet.py --max-wait 900
coordinator bench affinity --dataset tweets --model text-cnn "${size[@]}" "${sweep[@]}" --quiet-wait 300 --max-other-load 10 --retries 5 --out "$OUT/affinity-tweets-cnn"
mv "$OUT/affinity-tweets-cnn/affinity.png" docs/img/affinity-tweets-cnn.png

# the bidirectional GRU of the issue (2 threads slower than 1 here): the paper's non-monotonic effect
python bench/quiet.py --max-wait 900
coordinator bench affinity --dataset tweets --model text-gru "${gru_size[@]}" "${sweep[@]}" --quiet-wait 300 --max-other-load 10 --retries 5 \
  --out "$OUT/affinity-tweets-gru"
mv "$OUT/affinity-tweets-gru/affinity.png" docs/img/affinity-tweets-gru.png

python bench/quiet.py --max-wait 900
coordinator bench affinity --dataset mnist --data-dir "$MNIST_DIR" "${mnist_size[@]}" "${sweep[@]}" --quiet-wait 300 --max-other-load 10 --retries 5 \
  --out "$OUT/affinity-mnist"
mv "$OUT/affinity-mnist/affinity.png" docs/img/affinity-mnist.png
