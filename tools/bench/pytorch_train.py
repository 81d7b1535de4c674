"""PyTorch + diffusers side of `diffuse bench --train`: one training step (forward, MSE loss,
backward, AdamW) of the same UNet, built from the config.json that `diffuse bench --train KIND
--save-config FILE` writes, with the same batch and thread count, on random data.

    python tools/bench/pytorch_train.py --kind text-to-image --config unet.json --batch 64 --runs 5 --threads 2

`--mixed-precision bf16` runs the forward pass and the loss under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as accelerate's `mixed_precision="bf16"` does
(f32 weights and optimizer), beside `diffuse bench --train KIND --mixed-precision bf16`;
`--gradient-checkpointing` calls the model's `enable_gradient_checkpointing()`, beside
`diffuse bench --train KIND --gradient-checkpointing`. `--profile` prints torch.profiler's
per-operator table over the timed steps, beside `diffuse bench --train KIND --profile`.

Prints the median, min and max seconds per step after one warm-up, images per second, and the
process's peak RSS.
"""

import argparse
import contextlib
import json
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel, UNet2DModel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["text-to-image", "pixel"], required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the per-operator profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.config) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    b = args.batch
    timesteps = torch.tensor([(i * 397) % 1000 for i in range(b)])
    if args.kind == "text-to-image":
        model = UNet2DConditionModel(**config)
        sample, noise = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)
        text = torch.randn(b, 77, config["cross_attention_dim"])
        forward = lambda: model(sample, timesteps, encoder_hidden_states=text).sample
    else:
        model = UNet2DModel(**config)
        sample, noise = torch.randn(b, 1, 32, 32), torch.randn(b, 1, 32, 32)
        labels = torch.tensor([i % 10 for i in range(b)])
        forward = lambda: model(sample, timesteps, class_labels=labels).sample
    model.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            loss = torch.nn.functional.mse_loss(forward().float(), noise)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else contextlib.nullcontext() as profiler:
        for _ in range(args.runs):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    if args.profile:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    median = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    parameters = sum(p.numel() for p in model.parameters())
    precision = "fp32" if args.mixed_precision == "no" else "bf16 mixed"
    if args.gradient_checkpointing:
        precision += ", gradient checkpointing"
    print(f"pytorch {torch.__version__} train {args.kind}: {parameters} parameters, batch {b}, {precision}, threads {args.threads}: "
          f"median {median:.3f}s min {min(times):.3f}s max {max(times):.3f}s ({b / median:.1f} images/s) peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
