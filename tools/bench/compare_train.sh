#!/usr/bin/env bash
# Side-by-side training benchmark of diffuse and PyTorch + diffusers on this machine: the
# kernels' GFLOP/s against the measured peaks, then each `diffuse bench --train` model (f32,
# bf16 mixed precision, gradient checkpointing) beside tools/bench/pytorch_train.py on the same
# config.json, batch 64, 2 threads, interleaved.
#   tools/bench/compare_train.sh [PYTHON] [DIFFUSE_BINARY] [RUNS]
# PYTHON needs torch and diffusers (tools/fixtures/requirements.txt).
set -euo pipefail
PYTHON=${1:-python3}
DIFFUSE=${2:-target/release/diffuse}
RUNS=${3:-5}
THREADS=2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
configs=$(mktemp -d)
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) $(lscpu | grep 'Model name' | tr -s ' '), threads $THREADS, runs $RUNS"
"$DIFFUSE" bench --kernels --runs 3
for kind in text-to-image pixel; do
  for options in "" "--mixed-precision bf16" "--gradient-checkpointing"; do
    echo "## $kind $options"
    # shellcheck disable=SC2086 # the options are words
    "$DIFFUSE" bench --train $kind --batch 64 --runs "$RUNS" --save-config "$configs/$kind.json" $options --profile
    # shellcheck disable=SC2086
    "$PYTHON" tools/bench/pytorch_train.py --kind $kind --config "$configs/$kind.json" --batch 64 --runs "$RUNS" --threads $THREADS $options
  done
done
rm -rf "$configs"
