#!/usr/bin/env bash
# Reproduces the built-in default model (this folder): a text-to-image pipeline in Stable
# Diffusion's layout trained from scratch on the 60,000 Fashion-MNIST training images, padded
# to 32x32: first the autoencoder, then the UNet and the CLIP text encoder in its latents, with
# captions from the class names through varied templates.
#
#   models/fashion-mnist/train.sh [OUTPUT_DIR]
#
# Needs the Debian package dataset-fashion-mnist (or DATA=folder with the four IDX files) and a
# release build (`cargo build --release -p diffuse-cli`). On 2 cores of an AVX2-only AMD EPYC
# it takes about 4 minutes for the autoencoder and 18 for the UNet and text encoder.
# Then the pipeline is fine-tuned from where that run ended (--base: a fresh optimizer, a
# constant learning rate and the EMA), 1,250 more steps of batch 64 (about 23 minutes alone
# on the machine; its two threads slow down badly next to any other busy process).
# The result lands in OUTPUT_DIR/finetune; copy its files here to replace the built-in model.
set -euo pipefail
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${1:-runs/fashion-mnist}
DIFFUSE=${DIFFUSE:-target/release/diffuse}

"$DIFFUSE" train --kind autoencoder --data "$DATA/train-images-idx3-ubyte.gz" --output "$OUT/vae" \
    --channels 3 --resolution 32 --image-fit pad --random-flip \
    --batch-size 32 --steps 1200 --warmup 100 --lr 5e-4 --kl-weight 1e-5 \
    --sample-count 8 --sample-every 300 --checkpoint-every 100 --seed 0

"$DIFFUSE" train --kind text-to-image --vae "$OUT/vae" --data "$DATA/train-images-idx3-ubyte.gz" \
    --class-names fashion-mnist --output "$OUT/pipeline" --resolution 32 --image-fit pad \
    --model-config unet-small --text-encoder-config clip-small --caption-dropout 0.1 \
    --batch-size 64 --steps 1000 --warmup 100 --lr 5e-4 --snr-gamma 5 \
    --sample-count 6 --sample-steps 25 --sample-every 250 --checkpoint-every 50 \
    --export-dtype f16 --seed 0

"$DIFFUSE" train --base "$OUT/pipeline" --data "$DATA/train-images-idx3-ubyte.gz" \
    --class-names fashion-mnist --output "$OUT/finetune" --resolution 32 --image-fit pad --caption-dropout 0.1 \
    --batch-size 64 --steps 1250 --warmup 50 --lr 2e-4 --lr-schedule constant --snr-gamma 5 \
    --sample-count 6 --sample-steps 25 --sample-every 250 --checkpoint-every 50 --export-dtype f16 --seed 1
