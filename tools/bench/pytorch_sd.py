"""PyTorch + diffusers side of `diffuse bench`: the same components, configs, sizes, batch and
thread count, with random weights (no hub access needed).

    python tools/bench/pytorch_sd.py --config sd15 --component unet --size 512 --batch 2 --runs 3 --threads 2

Prints median, min and max seconds of N runs after one warm-up, and the process's peak RSS.
Run one component per process so the peak RSS is that component's.
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "diffuse", "configs")


def load_config(family, component):
    with open(os.path.join(CONFIGS, family, component, "config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "architectures"}


def timed(fn, runs):
    with torch.inference_mode():
        fn()  # warm-up
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="sd15", choices=["sd15", "sd21"])
    p.add_argument("--component", default="unet", choices=["text", "unet", "vae"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    latent = args.size // 8
    if args.component == "text":
        config = CLIPTextConfig(**load_config(args.config, "text_encoder"))
        model = CLIPTextModel(config).to(dtype).eval()
        ids = torch.randint(0, config.vocab_size, (args.batch, 77))
        fn = lambda: model(ids)
    elif args.component == "unet":
        model = UNet2DConditionModel(**load_config(args.config, "unet")).to(dtype).eval()
        cross = model.config.cross_attention_dim
        sample = torch.randn(args.batch, 4, latent, latent, dtype=dtype)
        text = torch.randn(args.batch, 77, cross, dtype=dtype)
        t = torch.tensor(500)
        fn = lambda: model(sample, t, encoder_hidden_states=text)
    else:
        model = AutoencoderKL(**load_config(args.config, "vae")).to(dtype).eval()
        latents = torch.randn(1, 4, latent, latent, dtype=dtype)
        fn = lambda: model.decode(latents)
    times = timed(fn, args.runs)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"pytorch {torch.__version__} {args.config} {args.component} {args.size}x{args.size} batch {args.batch if args.component != 'vae' else 1} "
        f"{args.dtype} threads {args.threads}: median {statistics.median(times):.3f}s min {min(times):.3f}s "
        f"max {max(times):.3f}s peak RSS {rss_gb:.2f} GB"
    )


if __name__ == "__main__":
    main()
