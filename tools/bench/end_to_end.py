"""End to end, process start to PNG: a guided SD 1.5 text-to-image run in PyTorch + diffusers
and in `diffuse generate`, on a full-size SD 1.5 pipeline with random weights (written once by
this script into --folder in diffusers' layout, real CLIP vocabulary), the same seed, size,
steps and thread count. Also reports each side's bf16-vs-f32 PSNR on that image.

    python tools/bench/end_to_end.py --diffuse target/release/diffuse --steps 20 --dtypes bf16
    python tools/bench/end_to_end.py --diffuse target/release/diffuse --steps 8 --dtypes f32 bf16 --psnr

Each run is its own process (timed from its start, peak RSS from the OS); the PyTorch side runs
tools/bench/end_to_end.py --pytorch-run, which imports torch and diffusers inside the timing.
"""

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
CONFIGS = os.path.join(ROOT, "crates", "diffuse", "configs", "sd15")
VOCAB = os.path.join(ROOT, "crates", "diffuse", "tests", "fixtures", "tokenizer", "sd15")
PROMPT = "a watercolor painting of a fox in the snow"


def config(component, name="config.json"):
    with open(os.path.join(CONFIGS, component, name)) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "architectures"}


def write_folder(folder):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    models = {
        "unet": lambda: UNet2DConditionModel(**config("unet")),
        "vae": lambda: AutoencoderKL(**config("vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**config("text_encoder"))),
        # The config file carries keys of other schedulers (SD 1.5's own does): from_config skips them.
        "scheduler": lambda: PNDMScheduler.from_config(config("scheduler", "scheduler_config.json")),
    }
    for name, make in models.items():
        if not os.path.isdir(os.path.join(folder, name)):
            make().save_pretrained(os.path.join(folder, name))
    shutil.copytree(VOCAB, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)


def pytorch_run(args):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(args.folder, torch_dtype=dtype, safety_checker=None)
    with torch.inference_mode():
        image = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                     generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    image.save(args.output)


def timed(command, env):
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def psnr(a_path, b_path):
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(a_path).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(b_path).convert("RGB"), dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--folder", default="/tmp/sd15-random")
    p.add_argument("--diffuse", default=os.path.join(ROOT, "target", "release", "diffuse"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["bf16"])
    p.add_argument("--sides", nargs="+", default=["pytorch", "diffuse"])
    p.add_argument("--psnr", action="store_true", help="also the bf16-vs-f32 PSNR of each side (needs both dtypes)")
    p.add_argument("--pytorch-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pytorch_run:
        return pytorch_run(args)
    if not os.path.exists(os.path.join(args.folder, "model_index.json")):
        write_folder(args.folder)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads))
    outputs = {}
    for dtype in args.dtypes:
        for side in args.sides:
            out = f"/tmp/end-to-end-{side}-{dtype}.png"
            if side == "pytorch":
                command = [sys.executable, __file__, "--pytorch-run", "--folder", args.folder, "--dtype", dtype, "--steps", str(args.steps),
                           "--size", str(args.size), "--seed", str(args.seed), "--threads", str(args.threads), "--output", out]
            else:
                command = [args.diffuse, "--threads", str(args.threads), "generate", "--model", args.folder, "--prompt", PROMPT,
                           "--steps", str(args.steps), "--guidance-scale", "7.5", "--width", str(args.size), "--height", str(args.size),
                           "--seed", str(args.seed), "--dtype", dtype, "--output", out]
            seconds, _ = timed(command, env)
            # ru_maxrss of children is the largest so far; measure each run's own with /usr/bin/time where needed.
            print(f"{side:8} {dtype:5} {args.size}x{args.size} {args.steps} steps, {args.threads} threads: {seconds:.1f} s", flush=True)
            outputs[(side, dtype)] = out
    if args.psnr:
        for side in args.sides:
            if (side, "f32") in outputs and (side, "bf16") in outputs:
                print(f"{side:8} bf16 vs f32 PSNR: {psnr(outputs[(side, 'bf16')], outputs[(side, 'f32')]):.2f} dB")


if __name__ == "__main__":
    main()
