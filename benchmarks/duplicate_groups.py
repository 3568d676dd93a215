"""Can duplicate groups catch a targeted attack's augmented copies? No training (a checkpoint is optional).

    .venv/bin/python benchmarks/duplicate_groups.py [--dataset fashion] [--num 5000] [--targets 64] [--copies 11] \
        [--checkpoint runs/.../model.pt --arch otc-fast-vit-32] [--output FILE]

The re-match gate judges a target image's copies as one sample (a duplicate group: the same pixel hash or pixel
signature cosine >= `rematch.duplicate_similarity`, 0.995; `otc_ray.identity`). The attack's copies can instead be
augmented (`poison.copy_augment`: flipped, cropped to 75-95% and resized, shifted by up to 2 px, Gaussian noise
std 4; `poison.copy_jitter` 2: shifted and noised by up to 2). For `--targets` images of the data set and
`--copies` copies of each, made by the attack's own functions (`augmented_copy`, `jittered_copy`), this prints, per
similarity measure, the cosine of each copy to its original against the cosine of each clean image to its nearest
other clean image, and how many copies a threshold could group while grouping at most 1% of the clean images with a
neighbour (the threshold at the clean nearest-neighbour cosines' 99th percentile). Measures: the duplicate test's
own signature (grey 16 x 16, centred), coarser grey signatures with the better of the image and its mirror image
(invariant to a flip, less sensitive to a shift), and a checkpoint's image embeddings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from otc_ray.config import DataConfig
from otc_ray.data.builtin import generate
from otc_ray.data.decode import DecodeLimits, decode_image
from otc_ray.data.shards import encode_image
from otc_ray.identity import pixel_signatures
from otc_ray.poison.rewrite import augment_params, augmented_copy, jittered_copy

Similarity = Callable[[np.ndarray, np.ndarray], torch.Tensor]      # (A, H, W, 3), (B, H, W, 3) -> (A, B)


def grey_signature(images: np.ndarray, side: int) -> torch.Tensor:
    """uint8 (B, H, W, C) -> (B, side * side): grey area means, centred, unit norm."""
    x = torch.as_tensor(np.ascontiguousarray(images)).float().mean(-1).unsqueeze(1)
    s = torch.nn.functional.adaptive_avg_pool2d(x, side).flatten(1)
    return torch.nn.functional.normalize(s - s.mean(1, keepdim=True), dim=1)


def flip_tolerant(side: int) -> Similarity:
    """The better cosine of b and of b mirrored, on `side` x `side` grey signatures."""
    def sim(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        sa = grey_signature(a, side)
        return torch.maximum(sa @ grey_signature(b, side).T, sa @ grey_signature(b[:, :, ::-1], side).T)
    return sim


def embedding_similarity(checkpoint: str, arch: str) -> Similarity:
    from otc_ray.config import ModelConfig
    from otc_ray.evaluate.model_encoder import ModelEncoder
    from otc_ray.model_checkpoint import load_checkpoint_model

    encoder = ModelEncoder(load_checkpoint_model(checkpoint, ModelConfig(arch=arch)))
    return lambda a, b: encoder.encode_images(a) @ encoder.encode_images(b).T


def copies_of(targets: np.ndarray, copies: int, kind: str, seed: int) -> np.ndarray:
    """(T * copies, H, W, 3): the attack's copies of each target, target-major."""
    rng, limits, out = np.random.default_rng(seed), DecodeLimits.from_config(DataConfig()), []
    for image in targets:
        for _ in range(copies):
            h = int(rng.integers(2 ** 62))
            if kind == "augmented":
                out.append(augmented_copy(image, augment_params(h, image.shape[0])))
            else:
                decoded, err = decode_image(jittered_copy(encode_image(image, "png"), 2, h, limits), limits)
                assert not err, err
                out.append(decoded)
    return np.stack(out)


def measure(sim: Similarity, images: np.ndarray, targets: np.ndarray, copies: np.ndarray, per: int) -> dict:
    """Copy-to-original cosines against clean nearest-neighbour cosines (images split in halves)."""
    owner = torch.arange(len(targets)).repeat_interleave(per)
    own = sim(targets, copies)[owner, torch.arange(len(copies))]
    half = len(images) // 2
    nearest = sim(images[:half], images[half:]).max(1).values
    bar = float(torch.quantile(nearest, 0.99))
    return {"own_p5": float(torch.quantile(own, 0.05)), "own_median": float(own.median()),
            "nearest_median": float(nearest.median()), "bar": bar, "grouped": float((own >= bar).float().mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion")
    ap.add_argument("--num", type=int, default=5000, help="clean training images")
    ap.add_argument("--targets", type=int, default=64)
    ap.add_argument("--copies", type=int, default=11, help="copies per target besides the original")
    ap.add_argument("--checkpoint", default="", help="a model.pt whose image embeddings are one more measure")
    ap.add_argument("--arch", default="otc-tiny-vit-32", help="the checkpoint's model.arch")
    ap.add_argument("--output", default="", help="append the markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    images = np.concatenate([c["images"] for c in generate(args.dataset, "train", args.num, seed=0)])
    targets = images[np.random.default_rng(1).choice(len(images), args.targets, replace=False)]
    measures: dict[str, Similarity] = {
        "pixel signature 16x16 (the duplicate test)": lambda a, b: pixel_signatures(a) @ pixel_signatures(b).T,
        "grey 8x8, flip-tolerant": flip_tolerant(8),
        "grey 4x4, flip-tolerant": flip_tolerant(4)}
    if args.checkpoint:
        measures[f"image embedding ({Path(args.checkpoint).parent.name})"] = embedding_similarity(args.checkpoint,
                                                                                                args.arch)
    lines = [f"{args.dataset}, {args.num} clean images, {args.targets} targets x {args.copies} copies",
             "", "| copies | measure | copy-to-original cosine p5 / median | clean nearest-neighbour cosine median "
             "/ p99 (the bar) | copies at or above the bar |", "|---|---|---|---|---|"]
    for kind in ("augmented", "jittered"):
        copies = copies_of(targets, args.copies, kind, seed=2)
        for name, sim in measures.items():
            m = measure(sim, images, targets, copies, args.copies)
            lines.append(f"| {kind} | {name} | {m['own_p5']:.3f} / {m['own_median']:.3f} | "
                         f"{m['nearest_median']:.3f} / {m['bar']:.3f} | {m['grouped']:.1%} |")
            print(lines[-1], flush=True)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
