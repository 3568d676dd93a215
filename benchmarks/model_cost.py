"""Cost per training sample of the package's model configs: FLOPs and CPU time of one `none` training step.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/model_cost.py                       # otc-tiny-vit-32 vs otc-fast-vit-32
    PYTHONPATH=$PWD .venv/bin/python benchmarks/model_cost.py --archs a,b --config-dir DIR   # try other JSONs

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one step (both towers forward, the CLIP loss,
backward) on a batch of fashion-like inputs (32 px images, captions of the fashion templates); CPU time is
`time.process_time` of this process over `--steps` steps after two warm-up steps, with `--threads` intra-op
threads (CPU time, not wall: the fair cost on a shared machine). Prints one table with the ratio to the first arch.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

from otc_ray.config import ModelConfig
from otc_ray.losses import clip_loss
from otc_ray.model import build_model, features, images_to_tensor

CAPTIONS = ["a photo of a sneaker", "a grey ankle boot on a plain background", "a close-up photo of a red pullover",
            "a picture of a bag"]


def step_fn(arch: str, batch: int, seed: int = 0):
    """(step(), trainable params): one optimizer step of `arch` on a fixed random batch."""
    torch.manual_seed(seed)
    bundle = build_model(ModelConfig(arch=arch))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None].repeat(3, -1)     # 28 px padded to 32, RGB
    pixels = images_to_tensor(images, bundle.image_size)
    ids = bundle.tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    opt = torch.optim.AdamW(bundle.model.parameters(), lr=1e-4)

    def step() -> None:
        f = features(bundle.model, pixels, ids)
        loss = clip_loss(f.image, f.text, f.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in bundle.model.parameters())


def measure(arch: str, batch: int, steps: int) -> dict[str, float]:
    """FLOPs (forward + backward) and CPU seconds per sample of one training step of `arch`."""
    step, params = step_fn(arch, batch)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    step()
    t0 = time.process_time()
    for _ in range(steps):
        step()
    cpu = (time.process_time() - t0) / steps / batch
    return {"params": params, "gflop": counter.get_total_flops() / batch / 1e9, "cpu_ms": cpu * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="otc-tiny-vit-32,otc-fast-vit-32")
    parser.add_argument("--config-dir", help="extra open_clip model JSONs to register (candidates)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.config_dir:
        open_clip.add_model_config(Path(args.config_dir))
    rows = [(a, measure(a, args.batch, args.steps)) for a in args.archs.split(",")]
    base = rows[0][1]
    print(f"batch {args.batch}, {args.threads} thread(s), {args.steps} timed steps (CPU time per sample)")
    print(f"{'arch':<24}{'params':>10}{'GFLOP/sample':>14}{'x cheaper':>11}{'CPU ms/sample':>15}{'x cheaper':>11}")
    for arch, m in rows:
        print(f"{arch:<24}{m['params'] / 1e6:>9.2f}M{m['gflop']:>14.4f}{base['gflop'] / m['gflop']:>11.2f}"
              f"{m['cpu_ms']:>15.3f}{base['cpu_ms'] / m['cpu_ms']:>11.2f}")


if __name__ == "__main__":
    main()
