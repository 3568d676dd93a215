"""Cost per training sample of the package's model configs: FLOPs and CPU time of one training step per defense.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/model_cost.py                       # otc-tiny-vit-32 vs otc-fast-vit-32
    PYTHONPATH=$PWD .venv/bin/python benchmarks/model_cost.py --archs a,b --config-dir DIR   # try other JSONs

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one step (the trainer's own
`get_defense(name).batch_loss`: for `none` both towers and L_clip, for `otcclip` also the second views and the OT
losses; then backward and AdamW) on a batch of fashion-like inputs (32 px images, captions like the fashion
templates'); CPU time is
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

from otc_ray.config import load_config, replace
from otc_ray.model import FeatureModel, build_model, images_to_tensor
from otc_ray.train.defenses import get_defense

CAPTIONS = ["a photo of a sneaker", "a grey ankle boot on a plain background", "a close-up photo of a red pullover",
            "a picture of a bag"]


def step_fn(arch: str, defense: str, batch: int, seed: int = 0):
    """(step(), parameter count): one optimizer step of `arch` under `defense` on a fixed random batch."""
    torch.manual_seed(seed)
    cfg = replace(load_config(), model__arch=arch, train__defense=defense, train__batch_size=batch)
    bundle = build_model(cfg.model)
    model = bundle.model.train()
    feature_model, loss_of = FeatureModel(model), get_defense(defense)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None].repeat(3, -1)     # 28 px padded to 32, RGB
    pixels = images_to_tensor(images, bundle.image_size)
    ids = bundle.tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(seed)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_of.batch_loss(feature_model, model, pixels, ids, cfg, 0, gen)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def measure(arch: str, defense: str, batch: int, steps: int) -> dict[str, float]:
    """FLOPs (forward + backward) and CPU milliseconds per sample of one training step of `arch` under `defense`."""
    step, params = step_fn(arch, defense, batch)
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
    parser.add_argument("--defenses", default="none,otcclip")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.config_dir:
        open_clip.add_model_config(Path(args.config_dir))
    archs = args.archs.split(",")
    print(f"batch {args.batch}, {args.threads} thread(s), {args.steps} timed steps (CPU time per sample); "
          f"ratios against {archs[0]} under the same defense")
    print(f"{'arch':<24}{'defense':<10}{'params':>10}{'GFLOP/sample':>14}{'x cheaper':>11}{'CPU ms/sample':>15}"
          f"{'x cheaper':>11}")
    for defense in args.defenses.split(","):
        rows = [(a, measure(a, defense, args.batch, args.steps)) for a in archs]
        base = rows[0][1]
        for arch, m in rows:
            print(f"{arch:<24}{defense:<10}{m['params'] / 1e6:>9.2f}M{m['gflop']:>14.4f}"
                  f"{base['gflop'] / m['gflop']:>11.2f}{m['cpu_ms']:>15.3f}{base['cpu_ms'] / m['cpu_ms']:>11.2f}")


if __name__ == "__main__":
    main()
