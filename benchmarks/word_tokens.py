"""Does D_OT tell a matched caption from a mismatched one better without SOT / EOT in the word set?

    .venv/bin/python benchmarks/word_tokens.py --data runs/data/fashion-train-... --checkpoint e3=.../model.pt [...]

For `--pairs` clean pairs of a shard set (read in this process), D_OT(image, own caption) against D_OT(image, a
caption of another class), with the OT word set with and without the special tokens (`ot.special_tokens`). Prints
the AUROC (matched pairs should have the lower distance) and the mean gap, per checkpoint; eps and iterations from
the config (the defaults of docs/method.md, OT distance).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from otc_ray.config import load_config
from otc_ray.evaluate.detection import detection_auroc
from otc_ray.model import features, images_to_tensor
from otc_ray.model_checkpoint import load_checkpoint_model
from otc_ray.ot import ot_distance

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    import gate_signals

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint", action="append", required=True, help="label=path/to/model.pt (repeat)")
    parser.add_argument("--config", default=str(ROOT / "otc_ray" / "configs" / "demo.yaml"))
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides)
    rows = gate_signals.read_rows(args.data, cfg.data)
    rng = np.random.default_rng(0)
    clean = np.flatnonzero((rows.kind == "") & (rows.labels >= 0))
    pick = rng.choice(clean, size=min(args.pairs, len(clean)), replace=False)
    other = np.array([rng.choice(clean[rows.labels[clean] != rows.labels[i]]) for i in pick])
    print(f"{len(pick)} clean pairs of {args.data}; eps {cfg.ot.eps}, {cfg.ot.iters} iterations")
    print("| checkpoint | word set | AUROC matched vs mismatched | mean D_OT gap (mismatched - matched) |")
    print("|---|---|---|---|")
    for spec in args.checkpoint:
        name, path = spec.split("=", 1)
        bundle = load_checkpoint_model(path, cfg.model)
        model = bundle.model.eval()
        pixels = images_to_tensor(rows.images[pick], bundle.image_size)
        for special in (True, False):
            with torch.inference_mode():
                ids_own = bundle.tokenizer([rows.captions[i] for i in pick])
                ids_other = bundle.tokenizer([rows.captions[j] for j in other])
                f_own = features(model, pixels, ids_own, special)
                f_other = features(model, pixels, ids_other, special)
                d_own, _ = ot_distance(f_own.patches, f_own.words, None, f_own.word_mask, cfg.ot.eps, cfg.ot.iters)
                d_oth, _ = ot_distance(f_other.patches, f_other.words, None, f_other.word_mask, cfg.ot.eps,
                                       cfg.ot.iters)
            scores = torch.cat([d_own, d_oth]).numpy()              # higher distance = "mismatched"
            truth = np.r_[np.zeros(len(pick), bool), np.ones(len(pick), bool)]
            auroc = detection_auroc(scores, truth)["detect_auroc"]
            label = "with SOT/EOT" if special else "words only"
            print(f"| {name} | {label} | {auroc:.3f} | {float((d_oth - d_own).mean()):.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
