"""End to end, process start to PNG: an SD 1.5 text-to-image run in PyTorch + diffusers and in
`diffuse generate`, on a full-size SD 1.5 pipeline with random weights (written once by this
script into --folder in diffusers' layout, real CLIP vocabulary), the same seed, size, steps and
thread count. Also reports each side's bf16-vs-f32 PSNR on that image.

Recipes (--recipes):
  guided          --steps guided PNDM steps (guidance 7.5): two UNet passes a step.
  lcm-lora        LCM-LoRA's: a random rank-64 LoRA on LCM-LoRA's layers (attention, feed-forward,
                  resnets, samplers), fused as it loads on both sides, LCMScheduler, 4 steps,
                  guidance 1 (one UNet pass a step).
  lcm-lora-taesd  the same, decoded by a random full-size TAESD (AutoencoderTiny) as `vae=`.
  turbo           SDXL-Turbo's recipe on SD 1.5: 1 trailing Euler-ancestral step, guidance 0.

--family sdxl: the same for a full-size SDXL base with random weights (stored in bf16, 7 GB;
StableDiffusionXLPipeline, guidance 5, EulerDiscrete, default 1024x1024; recipe guided only).

    python tools/bench/end_to_end.py --diffuse target/release/diffuse --steps 20 --dtypes bf16
    python tools/bench/end_to_end.py --diffuse target/release/diffuse --steps 8 --dtypes f32 bf16 --psnr
    python tools/bench/end_to_end.py --recipes lcm-lora lcm-lora-taesd turbo --dtypes f32 bf16
    python tools/bench/end_to_end.py --family sdxl --folder /work/sdxl-random --steps 4 --dtypes bf16

Each run is its own process (timed from its start; its peak RSS from the OS, through a small
wrapper process of its own); the PyTorch side runs
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
CONFIGS = os.path.join(ROOT, "crates", "diffuse", "configs")
VOCAB = os.path.join(ROOT, "crates", "diffuse", "tests", "fixtures", "tokenizer", "sd15")
PROMPT = "a watercolor painting of a fox in the snow"


def config(component, name="config.json", family="sd15"):
    with open(os.path.join(CONFIGS, family, component, name)) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "architectures"}


def write_sdxl_folder(folder):
    """A full-size SDXL base with random weights, in bf16 (7 GB rather than 14)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    sdxl = lambda component: config(component, family="sdxl")
    models = {
        "unet": lambda: UNet2DConditionModel(**sdxl("unet")),
        "vae": lambda: AutoencoderKL(**sdxl("vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**sdxl("text_encoder"))),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**sdxl("text_encoder_2"))),
    }
    for name, make in models.items():
        if not os.path.isdir(os.path.join(folder, name)):
            make().to(torch.bfloat16).save_pretrained(os.path.join(folder, name))
    scheduler = config("scheduler", "scheduler_config.json", family="sdxl")
    EulerDiscreteScheduler.from_config(scheduler).save_pretrained(os.path.join(folder, "scheduler"))
    # tokenizer_2 pads with "!", as SD 2.x's tokenizer config says.
    for name, special in [("tokenizer", "sd15"), ("tokenizer_2", "sd21")]:
        shutil.copytree(VOCAB, os.path.join(folder, name), dirs_exist_ok=True)
        for file in ["special_tokens_map.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(CONFIGS, special, "tokenizer", file), os.path.join(folder, name, file))
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)


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


# LCM-LoRA's layers (latent-consistency/lcm-lora-sdv1-5's adapter config).
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def write_lcm_lora(folder):
    """A random rank-64 LoRA on LCM-LoRA's layers, in diffusers' PEFT format."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=LCM_LORA_TARGETS, init_lora_weights="gaussian"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    StableDiffusionPipeline.save_lora_weights(os.path.join(folder, "lcm-lora"), unet_lora_layers=get_peft_model_state_dict(unet))


def write_taesd(folder):
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(2)
    AutoencoderTiny().save_pretrained(os.path.join(folder, "taesd"))


def pytorch_run(args):
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(args.folder, torch_dtype=dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.folder, torch_dtype=dtype, safety_checker=None)
    steps, guidance = args.steps, 5.0 if args.family == "sdxl" else 7.5
    if args.recipe.startswith("lcm-lora"):
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(os.path.join(args.folder, "lcm-lora"))
        pipe.fuse_lora()
        steps, guidance = 4, 1.0
        if args.recipe == "lcm-lora-taesd":
            from diffusers import AutoencoderTiny

            pipe.vae = AutoencoderTiny.from_pretrained(os.path.join(args.folder, "taesd"), torch_dtype=dtype)
    elif args.recipe == "turbo":
        from diffusers import EulerAncestralDiscreteScheduler

        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        steps, guidance = 1, 0.0
    with torch.inference_mode():
        image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=args.size, width=args.size,
                     generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    image.save(args.output)


def diffuse_flags(args, recipe):
    if recipe == "guided":
        return ["--steps", str(args.steps), "--guidance-scale", "5" if args.family == "sdxl" else "7.5"]
    if recipe.startswith("lcm-lora"):
        flags = ["--scheduler", "lcm", "--steps", "4", "--guidance-scale", "1",
                 "--lora", os.path.join(args.folder, "lcm-lora", "pytorch_lora_weights.safetensors")]
        return flags + (["--vae", os.path.join(args.folder, "taesd")] if recipe == "lcm-lora-taesd" else [])
    if recipe == "turbo":
        return ["--scheduler", "euler-ancestral", "--scheduler-config", "timestep_spacing=trailing", "--steps", "1", "--guidance-scale", "0"]
    raise SystemExit(f"unknown recipe {recipe}")


# Runs a command and prints its peak RSS in KB: a process of its own per run, since the OS
# reports the largest of all children a process waited for.
PEAK_RSS = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def timed(command, env):
    """Seconds from the command's start to its end, and its peak RSS in GB."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], check=True, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(out.stdout.strip()) / 1024**2


def psnr(a_path, b_path):
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(a_path).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(b_path).convert("RGB"), dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--folder", default="/tmp/sd15-random")
    p.add_argument("--diffuse", default=os.path.join(ROOT, "target", "release", "diffuse"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, help="default 512 (SDXL: 1024)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["bf16"])
    p.add_argument("--sides", nargs="+", default=["pytorch", "diffuse"])
    p.add_argument("--recipes", nargs="+", default=["guided"], choices=["guided", "lcm-lora", "lcm-lora-taesd", "turbo"])
    p.add_argument("--repeat", type=int, default=1, help="runs of each (recipe, dtype, side), interleaved")
    p.add_argument("--recipe", default="guided", help=argparse.SUPPRESS)
    p.add_argument("--psnr", action="store_true", help="also the bf16-vs-f32 PSNR of each side (needs both dtypes)")
    p.add_argument("--pytorch-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.size = args.size or (1024 if args.family == "sdxl" else 512)
    if args.pytorch_run:
        return pytorch_run(args)
    if args.family == "sdxl" and args.recipes != ["guided"]:
        raise SystemExit("--family sdxl runs the guided recipe only")
    if not os.path.exists(os.path.join(args.folder, "model_index.json")):
        (write_sdxl_folder if args.family == "sdxl" else write_folder)(args.folder)
    if any(r.startswith("lcm-lora") for r in args.recipes) and not os.path.isdir(os.path.join(args.folder, "lcm-lora")):
        write_lcm_lora(args.folder)
    if "lcm-lora-taesd" in args.recipes and not os.path.isdir(os.path.join(args.folder, "taesd")):
        write_taesd(args.folder)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads))
    outputs = {}
    for _ in range(args.repeat):
        for recipe in args.recipes:
            for dtype in args.dtypes:
                for side in args.sides:
                    out = f"/tmp/end-to-end-{recipe}-{side}-{dtype}.png"
                    if side == "pytorch":
                        command = [sys.executable, __file__, "--pytorch-run", "--family", args.family, "--recipe", recipe, "--folder", args.folder, "--dtype", dtype,
                                   "--steps", str(args.steps), "--size", str(args.size), "--seed", str(args.seed), "--threads", str(args.threads),
                                   "--output", out]
                    else:
                        command = [args.diffuse, "--threads", str(args.threads), "generate", "--model", args.folder, "--prompt", PROMPT,
                                   "--width", str(args.size), "--height", str(args.size), "--seed", str(args.seed), "--dtype", dtype,
                                   "--output", out, *diffuse_flags(args, recipe)]
                    seconds, peak_gb = timed(command, env)
                    print(f"{recipe:14} {side:8} {dtype:5} {args.size}x{args.size}, {args.threads} threads: {seconds:.1f} s, peak RSS {peak_gb:.2f} GB", flush=True)
                    outputs[(recipe, side, dtype)] = out
        for recipe in args.recipes:
            for dtype in args.dtypes:
                if (recipe, "pytorch", dtype) in outputs and (recipe, "diffuse", dtype) in outputs:
                    print(f"{recipe:14} {dtype:5} diffuse vs PyTorch PSNR: {psnr(outputs[(recipe, 'diffuse', dtype)], outputs[(recipe, 'pytorch', dtype)]):.2f} dB")
    if args.psnr:
        for recipe in args.recipes:
            for side in args.sides:
                if (recipe, side, "f32") in outputs and (recipe, side, "bf16") in outputs:
                    print(f"{recipe:14} {side:8} bf16 vs f32 PSNR: {psnr(outputs[(recipe, side, 'bf16')], outputs[(recipe, side, 'f32')]):.2f} dB")


if __name__ == "__main__":
    main()
