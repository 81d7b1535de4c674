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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "diffuse", "configs")


def load_config(family, component):
    # diffuse names the refiner's family sdxl-refiner; its configs live in sdxl_refiner/.
    with open(os.path.join(CONFIGS, family.replace("-", "_"), component, "config.json")) as f:
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
    p.add_argument("--config", default="sd15", choices=["sd15", "sd21", "sdxl", "sdxl-refiner"])
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
        # SDXL base: both encoders, as diffuse bench times them (the refiner's one is bigG).
        encoders = [("text_encoder", CLIPTextModel)]
        if args.config == "sdxl":
            encoders.append(("text_encoder_2", CLIPTextModelWithProjection))
        elif args.config == "sdxl-refiner":
            encoders = [("text_encoder_2", CLIPTextModelWithProjection)]
        models = []
        for folder, cls in encoders:
            config = CLIPTextConfig(**load_config(args.config, folder))
            models.append(cls(config).to(dtype).eval())
        ids = torch.randint(0, 49408, (args.batch, 77))
        fn = lambda: [m(ids) for m in models]
    elif args.component == "unet":
        model = UNet2DConditionModel(**load_config(args.config, "unet")).to(dtype).eval()
        cross = model.config.cross_attention_dim
        sample = torch.randn(args.batch, 4, latent, latent, dtype=dtype)
        text = torch.randn(args.batch, 77, cross, dtype=dtype)
        t = torch.tensor(500)
        kwargs = {}
        if model.config.addition_embed_type == "text_time":
            # Two time ids and the rest as the pooled embedding, as diffuse bench does: only
            # the total width of add_embedding's input matters for the time.
            time_dim = model.config.addition_time_embed_dim
            text_dim = model.config.projection_class_embeddings_input_dim - 2 * time_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(args.batch, text_dim, dtype=dtype),
                "time_ids": torch.full((args.batch, 2), 1024.0, dtype=dtype),
            }
        fn = lambda: model(sample, t, encoder_hidden_states=text, **kwargs)
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
