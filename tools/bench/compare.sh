#!/usr/bin/env bash
# Side-by-side benchmark of diffuse and PyTorch + diffusers on this machine, same configs,
# sizes, batch and thread count, one component per process (so peak RSS is that component's).
#   tools/bench/compare.sh [PYTHON] [DIFFUSE_BINARY] [RUNS]
# PYTHON needs torch, diffusers and transformers (tools/fixtures/requirements.txt).
set -euo pipefail
PYTHON=${1:-python3}
DIFFUSE=${2:-target/release/diffuse}
RUNS=${3:-3}
THREADS=2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
echo "# $(date -u +%FT%TZ) $(uname -m), $(nproc) cores, threads $THREADS, runs $RUNS"
for config in sd15; do
  for size in 512 256; do
    for component in text unet vae; do
      "$PYTHON" tools/bench/pytorch_sd.py --config $config --component $component --size $size --batch 2 --runs "$RUNS" --threads $THREADS
      "$DIFFUSE" bench --config $config --component $component --size $size --batch 2 --runs "$RUNS" --profile
    done
  done
done
