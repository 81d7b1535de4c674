"""Checks that a folder written by `diffuse train` loads in diffusers and samples as diffuse does.

A StableDiffusionPipeline folder (`--kind text-to-image`, and the built-in default model in
models/fashion-mnist) is loaded with StableDiffusionPipeline.from_pretrained (each model with
output_loading_info, so that a missing or unexpected tensor fails the check) and run with
`--prompt` and its default scheduler and guidance; `diffuse generate` runs the same.

A DDPMPipeline folder (`--kind pixel`) is loaded with DDPMPipeline.from_pretrained (and the UNet with
output_loading_info, so that a missing or unexpected tensor fails the check), samples one image
with DDPMPipeline's loop (class-conditional models: the same loop with class_labels, which
DDPMPipeline itself does not pass), runs `diffuse generate` with the same seed and steps, and
compares the two 8-bit images.

With `--lora FILE` (a LoRA written by `diffuse train --lora-rank`, in diffusers' or kohya's
format), diffusers loads it into the pipeline with `load_lora_weights` (every layer of the file
must become a peft layer) and fuses it, and `diffuse generate --lora FILE` runs the same.

Run by hand (not in CI), from the repository root:

    /work/pyenv/bin/python tools/check_diffusers_load.py OUTPUT_DIR [--steps 50] [--seed 0] \
        [--class-label 3 | --prompt "a photo of a sneaker"] [--lora FILE] [--diffuse target/debug/diffuse]

Exits non-zero when the folder does not load or the images differ (PSNR below 40 dB).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


def diffusers_sample(folder, steps, seed, class_label):
    unet, info = UNet2DModel.from_pretrained(os.path.join(folder, "unet"), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"diffusers loaded the UNet with problems: {problems}")
    pipeline = DDPMPipeline.from_pretrained(folder)
    print(f"diffusers loaded {folder}: {type(pipeline.unet).__name__} "
          f"({sum(p.numel() for p in pipeline.unet.parameters())} parameters), {type(pipeline.scheduler).__name__}")
    generator = torch.Generator("cpu").manual_seed(seed)
    if class_label is None:
        image = pipeline(batch_size=1, generator=generator, num_inference_steps=steps, output_type="np").images
    else:
        # DDPMPipeline.__call__ with class_labels passed to the UNet.
        unet, scheduler = pipeline.unet, pipeline.scheduler
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        sample = randn_tensor((1, unet.config.in_channels, *size), generator=generator, dtype=unet.dtype)
        scheduler.set_timesteps(steps)
        labels = torch.tensor([class_label])
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_output = unet(sample, t, class_labels=labels).sample
                sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
        image = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image[0] * 255).round().astype("uint8")


def lora_layer_count(model):
    return sum(1 for name, _ in model.named_modules() if name.split(".")[-2:-1] == ["lora_A"])


def text_to_image_sample(folder, steps, seed, prompt, lora=None):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    for name, cls in [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)]:
        _, info = cls.from_pretrained(os.path.join(folder, name), output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            sys.exit(f"{name} loaded with problems: {problems}")
    pipeline = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    print(f"diffusers loaded {folder}: UNet {sum(p.numel() for p in pipeline.unet.parameters())} parameters, "
          f"text encoder {sum(p.numel() for p in pipeline.text_encoder.parameters())}, {type(pipeline.scheduler).__name__}")
    if lora is not None:
        from safetensors import safe_open

        pipeline.load_lora_weights(lora)
        with safe_open(lora, "pt") as f:
            keys = [k for k in f.keys() if not k.endswith(".alpha")]
        layers = lora_layer_count(pipeline.unet) + lora_layer_count(pipeline.text_encoder)
        print(f"diffusers loaded {lora}: {len(keys)} matrices -> {lora_layer_count(pipeline.unet)} UNet and "
              f"{lora_layer_count(pipeline.text_encoder)} text encoder LoRA layers")
        if 2 * layers != len(keys):
            sys.exit("diffusers did not take every layer of the LoRA")
        pipeline.fuse_lora()
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipeline(prompt, num_inference_steps=steps, generator=generator, output_type="np").images
    return (image[0] * 255).round().astype("uint8")


def diffuse_sample(binary, folder, steps, seed, class_label, prompt=None, lora=None):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sample.png")
        command = [binary, "generate", "--model", folder, "--steps", str(steps), "--seed", str(seed), "--quiet", "--output", out]
        if class_label is not None:
            command += ["--class-label", str(class_label)]
        if prompt is not None:
            command += ["--prompt", prompt]
        if lora is not None:
            command += ["--lora", lora]
        subprocess.run(command, check=True)
        image = np.array(Image.open(out))
    return image if image.ndim == 3 else image[:, :, None]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-label", type=int)
    parser.add_argument("--prompt", default="a photo of a sneaker")
    parser.add_argument("--lora", help="a LoRA file to load into the pipeline")
    parser.add_argument("--diffuse", default="target/debug/diffuse")
    args = parser.parse_args()

    with open(os.path.join(args.folder, "model_index.json")) as f:
        text_to_image = json.load(f)["_class_name"] == "StableDiffusionPipeline"
    with open(os.path.join(args.folder, "unet", "config.json")) as f:
        config = json.load(f)
    class_label = args.class_label
    if text_to_image:
        expected = text_to_image_sample(args.folder, args.steps, args.seed, args.prompt, args.lora)
        actual = diffuse_sample(args.diffuse, args.folder, args.steps, args.seed, None, args.prompt, args.lora)
    elif args.lora:
        sys.exit("--lora is for StableDiffusionPipeline folders")
    else:
        if class_label is None and config.get("num_class_embeds"):
            class_label = 0
        expected = diffusers_sample(args.folder, args.steps, args.seed, class_label)
        actual = diffuse_sample(args.diffuse, args.folder, args.steps, args.seed, class_label)
    if expected.shape != actual.shape:
        sys.exit(f"shapes differ: diffusers {expected.shape}, diffuse {actual.shape}")
    difference = np.abs(expected.astype(np.int32) - actual.astype(np.int32))
    mse = float((difference.astype(np.float64) ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    label = f", prompt {args.prompt!r}" if text_to_image else "" if class_label is None else f", class {class_label}"
    print(f"{args.steps} steps, seed {args.seed}{label}: image {expected.shape}, "
          f"max |difference| {difference.max()}, pixels differing {int((difference > 0).sum())}/{difference.size}, PSNR {psnr:.1f} dB")
    if psnr < 40:
        sys.exit("the images differ (PSNR below 40 dB)")
    print("ok")


if __name__ == "__main__":
    main()
