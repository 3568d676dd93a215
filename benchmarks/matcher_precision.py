"""What the re-match actors' encoding precision (`rematch.precision`) costs: `Matcher.match` CPU per pair at fp32
and bf16, on 1 and 2 torch threads, and how far the bf16 features are from the fp32 ones.

    python benchmarks/matcher_precision.py        # ~1 minute; writes benchmarks/results/matcher_precision.md

The demo's re-match settings (block 512, bank 1024, 32 neighbours, evidence gate), the tiny model at its seeded
random init, random 32 px images with fashion-style captions; three warm-up blocks fill the bank, then the median of
three timed blocks (CPU seconds of this process, `time.process_time`). bf16 pays off on CPUs with native bf16
matrix instructions (AVX512-BF16, AMX); elsewhere autocast may be slower than fp32.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otc_ray.config import load_config  # noqa: E402
from otc_ray.model import build_model  # noqa: E402
from otc_ray.rematch.matcher import Matcher  # noqa: E402

NAMES = ["sneaker", "bag", "shirt", "coat", "dress", "boot", "trouser", "pullover", "sandal", "t-shirt"]
BLOCK = 512


def blocks(n: int, seed: int = 0):
    """n blocks of (images (B, 32, 32, 3) uint8, captions, keys, labels)."""
    rng = np.random.default_rng(seed)
    for b in range(n):
        labels = rng.integers(0, len(NAMES), BLOCK)
        yield (rng.integers(0, 256, (BLOCK, 32, 32, 3), dtype=np.uint8),
               [f"a photo of a {NAMES[i]}" for i in labels], [f"b{b}-{i}" for i in range(BLOCK)], labels)


def cpu_ms_per_pair(precision: str, threads: int) -> tuple[float, Matcher]:
    torch.set_num_threads(threads)
    cfg = load_config("demo", ["train.defense=otcclip", f"model.precision={precision}"])
    torch.manual_seed(0)
    matcher = Matcher(build_model(cfg.model), cfg.rematch, cfg.ot)
    data = list(blocks(6))
    for images, captions, keys, labels in data[:3]:
        matcher.match(images, captions, keys, labels=labels)
    times = []
    for images, captions, keys, labels in data[3:]:
        start = time.process_time()
        matcher.match(images, captions, keys, labels=labels)
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times) / BLOCK, matcher


def main() -> int:
    rows, matchers = [], {}
    for threads in (1, 2):
        fp32, matchers["fp32"] = cpu_ms_per_pair("fp32", threads)
        bf16, matchers["bf16"] = cpu_ms_per_pair("bf16", threads)
        rows.append(f"| {threads} | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f} |")
    images, captions, _, _ = next(blocks(1, seed=9))
    (img32, cap32), (img16, cap16) = (matchers[p].encode(images, captions) for p in ("fp32", "bf16"))
    cos_image = float((img32.image * img16.image).sum(-1).min())
    cos_words = float((cap32.words * cap16.words).sum(-1)[cap32.word_mask].min())
    text = "\n".join([
        "# `Matcher.match` at fp32 and bf16 (`rematch.precision`)", "",
        "Command: `python benchmarks/matcher_precision.py` (demo re-match settings, tiny model, blocks of 512 pairs; "
        "CPU of this process, median of 3 blocks after 3 warm-up blocks).", "",
        "| torch threads | fp32 CPU ms / pair | bf16 CPU ms / pair | bf16 / fp32 |", "|---:|---:|---:|---:|", *rows, "",
        f"Smallest cosine between fp32 and bf16 features of one block: image embeddings {cos_image:.4f}, "
        f"word tokens {cos_words:.4f}.", ""])
    print(text)
    (ROOT / "benchmarks" / "results" / "matcher_precision.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
