#!/usr/bin/env bash
# Side-by-side training throughput of diffuse and PyTorch + diffusers on this machine: the same
# UNet (config written by diffuse), batch and thread count, one process per side.
#   tools/bench/compare_train.sh [PYTHON] [DIFFUSE_BINARY] [RUNS] [BATCH]
set -euo pipefail
PYTHON=${1:-python3}
DIFFUSE=${2:-target/release/diffuse}
RUNS=${3:-5}
BATCH=${4:-64}
THREADS=2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
CONFIG=$(mktemp -d)
trap 'rm -rf "$CONFIG"' EXIT
echo "# $(date -u +%FT%TZ) $(uname -m), $(nproc) cores, threads $THREADS, runs $RUNS, batch $BATCH"
for kind in text-to-image pixel; do
  "$DIFFUSE" bench --train $kind --batch "$BATCH" --runs "$RUNS" --save-config "$CONFIG/$kind.json" --profile
  "$PYTHON" tools/bench/pytorch_train.py --kind $kind --config "$CONFIG/$kind.json" --batch "$BATCH" --runs "$RUNS" --threads $THREADS
done
