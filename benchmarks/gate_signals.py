"""Which evidence separates poisoned pairs, and at what operating point: the gate's signals on trained checkpoints.

    .venv/bin/python benchmarks/gate_signals.py --data runs/data/poisoned-targeted-XXXX \
        --checkpoint none/e1=runs/ray_results/val-none/checkpoint_A/model.pt --checkpoint ... \
        [--config otc_ray/configs/demo.yaml] [key=value ...]

Each checkpoint re-matches the whole (poisoned) shard set block by block, in a seeded shuffled order, with
`Matcher` exactly as one re-match actor does (gate `evidence` over every signal, bank as
configured, sticky flags off). Per sample it keeps the raw signals (global cosine, neighbour agreement, OT plan
concentration, pixel-neighbour agreement) and their caption-calibrated z-scores, then reports, backdoor and
targeted pairs apart against the clean ones: the AUROC of every raw signal, every calibrated z and its absolute
value (an outlier either way), and for each combination of signals (min = union of outliers, mean) the flag rate,
precision and recall at several thresholds; and the four-signal gate's own flags, precision, recall and damage
(clean pairs re-captioned with another class's caption); and the configured gate's own mean z at deeper thresholds and
with the flags capped to the lowest share of each block. Data are read in this process (no Ray). Writes a
markdown table (--output) and one JSON line per checkpoint (--json) as each finishes.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from otc_ray.config import load_config
from otc_ray.data.decode import DecodeLimits, decode_caption, decode_image, decode_meta
from otc_ray.data.shards import iter_rows, list_shards
from otc_ray.poison.manifest import read_manifest
from otc_ray.evaluate.detection import detection_auroc
from otc_ray.rematch.signals import SIGNALS

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (-1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0)


@dataclasses.dataclass
class ShardRows:
    """Decoded good samples of a shard set: keys (n,), images uint8 (n, H, W, 3), captions, labels (n,) (-1 =
    unknown), kind (n,) "" / "backdoor" / "targeted" from the poison manifest. labels is the class the caption names
    (the attack's class for a poisoned pair), image_labels the class of the image (its original class)."""

    keys: np.ndarray
    images: np.ndarray
    captions: list[str]
    labels: np.ndarray
    kind: np.ndarray
    image_labels: np.ndarray


def read_rows(folder: str, data_cfg) -> ShardRows:
    """The good samples of a poisoned shard set (tar or parquet, local or s3://), decoded by the project's own
    reader and decoder (`shards.iter_rows`, `decode.*`), in this process; the bad ones are skipped, as training does."""
    keys, images, captions, labels = [], [], [], []
    limits = DecodeLimits.from_config(data_cfg)
    fs, paths, fmt = list_shards(folder, data_cfg.format, data_cfg.s3)
    for path in paths:
        for row in iter_rows(fs, path, fmt):
            image, bad_image = decode_image(row["image_bytes"], limits)
            caption, bad_caption = decode_caption(row["caption_raw"], limits)
            meta, bad_meta = decode_meta(row["meta"])
            if row["error"] or bad_image or bad_caption or bad_meta:
                continue
            keys.append(row["key"])
            images.append(image)
            captions.append(caption)
            labels.append(int(meta.get("label", -1)))
    manifest = read_manifest(folder, data_cfg.s3)
    attack = dict(zip(manifest.column("key").to_pylist(), manifest.column("attack").to_pylist()))
    caption_class = dict(zip(manifest.column("key").to_pylist(), manifest.column("target_label").to_pylist()))
    kind = np.asarray([attack.get(k, "") for k in keys])
    original = dict(zip(manifest.column("key").to_pylist(), manifest.column("original_label").to_pylist()))
    image_labels = np.asarray([original.get(k, lab) for k, lab in zip(keys, labels)], dtype=np.int64)
    # the class a pair's caption names: the image's label for clean pairs, the attack's target for poisoned ones
    labels = np.asarray([caption_class.get(k, lab) for k, lab in zip(keys, labels)], dtype=np.int64)
    return ShardRows(np.asarray(keys), np.stack(images), captions, labels, kind, image_labels)


def run_matcher(matcher, rows: ShardRows, order: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """Per sample (in `order`): raw signals (n, S), calibrated z (n, S), flags, source class, group size."""
    out = {"signals": [], "signal_z": [], "flagged": [], "recaptioned": [], "source_label": [], "group": []}
    for start in range(0, len(order), block):
        idx = order[start:start + block]
        m = matcher.match(rows.images[idx], [rows.captions[i] for i in idx], rows.keys[idx].tolist(),
                          labels=rows.labels[idx].tolist())
        r = m.result
        out["signals"].append(r.signals.numpy())
        out["signal_z"].append(r.signal_z.numpy())
        out["flagged"].append(r.flagged.numpy())
        out["recaptioned"].append(r.recaptioned.numpy())
        out["source_label"].append(np.asarray(m.source_label))
        out["group"].append(r.group_size.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def auroc(score: np.ndarray, positive: np.ndarray, clean: np.ndarray) -> float:
    """AUROC of `score` (higher = more suspicious) for positive vs clean rows; NaN scores count as least suspicious."""
    rows = positive | clean
    s = np.nan_to_num(score[rows], nan=-1e9)
    return detection_auroc(s, positive[rows])["detect_auroc"]


CAPS = (0.002, 0.005, 0.01, 0.02, 0.05)
DEEP_THRESHOLDS = (-5.0, -8.0, -12.0)


def _point(flag: np.ndarray, kind: np.ndarray, **where) -> dict:
    clean = kind == ""
    return where | {"flag_rate": float(flag.mean()), "precision": int((flag & ~clean).sum()) / max(1, int(flag.sum())),
                    "recall_backdoor": float(flag[kind == "backdoor"].mean()) if (kind == "backdoor").any() else np.nan,
                    "recall_targeted": float(flag[kind == "targeted"].mean()) if (kind == "targeted").any() else np.nan,
                    "clean_flagged": float(flag[clean].mean())}


def operating_points(z: np.ndarray, kind: np.ndarray) -> list[dict]:
    return [_point(z < t, kind, threshold=t) for t in THRESHOLDS]


def capped_points(z: np.ndarray, kind: np.ndarray, block: int, threshold: float) -> list[dict]:
    """Operating points of one combined z (n,) in block order: below deeper thresholds, and capped, i.e. of each
    block of `block` rows only the lowest share `cap` that is also below `threshold` (a bound on the flags a block
    may cost when the gate's z has a heavy clean tail)."""
    pts = [_point(z < t, kind, rule=f"z < {t}") for t in DEEP_THRESHOLDS]
    for cap in CAPS:
        flag = np.zeros(len(z), bool)
        for start in range(0, len(z), block):
            part = z[start:start + block]
            lowest = np.argsort(part)[:max(1, int(round(cap * len(part))))]
            flag[start + lowest[part[lowest] < threshold]] = True
        pts.append(_point(flag, kind, rule=f"lowest {cap:.1%} of each block, z < {threshold}"))
    return pts


def _accuracy(res: dict, image_labels: np.ndarray, rows: np.ndarray) -> float:
    changed = rows & res["recaptioned"]
    return float((res["source_label"][changed] == image_labels[changed]).mean()) if changed.any() else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="poisoned shard folder (tar) with _poison_manifest.parquet")
    parser.add_argument("--checkpoint", action="append", required=True, help="label=path/to/model.pt (repeat)")
    parser.add_argument("--config", default=str(ROOT / "otc_ray" / "configs" / "demo.yaml"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gate_signals.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gate_signals.jsonl"))
    parser.add_argument("--seed", type=int, default=0, help="block order")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    from otc_ray.model_checkpoint import load_checkpoint_model
    from otc_ray.rematch.matcher import Matcher

    cfg = load_config(args.config, ["rematch.gate=evidence", "rematch.sticky=false", "rematch.propagate=false",
                                     *overrides])
    # every signal is measured: the gate averages all of them (the matcher's own flags below are that gate's)
    rcfg = dataclasses.replace(cfg.rematch, gate_signals=SIGNALS)
    rows = read_rows(args.data, cfg.data)
    order = np.random.default_rng(args.seed).permutation(len(rows.keys))
    kind, labels = rows.kind[order], rows.labels[order]
    n_bd, n_tg = int((kind == "backdoor").sum()), int((kind == "targeted").sum())
    lines = ["# Gate signals on a poisoned shard set\n",
             f"`{args.data}`: {len(order)} pairs ({n_bd} backdoor, {n_tg} targeted); block {rcfg.block_size}, "
             f"bank {rcfg.bank_size}, neighbours {rcfg.neighbours}, reference {rcfg.gate_reference}, eps "
             f"{cfg.ot.eps}, {cfg.ot.iters} iterations, special tokens {cfg.ot.special_tokens}. AUROC: poisoned vs "
             "clean (higher = the signal ranks poison as more suspicious).\n",
             "| checkpoint | attack | " + " | ".join(f"{s} raw" for s in SIGNALS) + " | "
             + " | ".join(f"{s} z" for s in SIGNALS) + " | " + " | ".join(f"{s} abs z" for s in SIGNALS)
             + " | min z | mean z |",
             "|---|---|" + "---|" * (3 * len(SIGNALS) + 2)]
    points = ["\n## Operating points (combined z < threshold, or for `high` -z < threshold: the signal's high side; "
              "no duplicate-group averaging here)\n",
              "| checkpoint | signals | combine | threshold | flagged | P | R backdoor | R targeted | clean flagged |",
              "|---|---|---|---|---|---|---|---|---|"]
    capped = ["\n## The configured gate's mean z (`rematch.gate_signals`) at deeper thresholds, and capped per block\n",
              "| checkpoint | signals | rule | flagged | P | R backdoor | R targeted | clean flagged |",
              "|---|---|---|---|---|---|---|---|"]
    for spec in args.checkpoint:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec).parent.name, spec)
        start = time.perf_counter()
        res = run_matcher(Matcher(load_checkpoint_model(path, cfg.model), rcfg, cfg.ot), rows, order, rcfg.block_size)
        seconds = time.perf_counter() - start
        z = res["signal_z"]
        record = {"checkpoint": name, "path": path, "seconds": seconds, "auroc": {}, "points": []}
        for attack in ("backdoor", "targeted"):
            pos = kind == attack
            if not pos.any():
                continue
            raw = [auroc(-res["signals"][:, i], pos, kind == "") for i in range(len(SIGNALS))]
            cal = [auroc(-z[:, i], pos, kind == "") for i in range(len(SIGNALS))]
            # two-sided: an outlier either way (a pair the model fits unusually well once it has learnt a trigger)
            both = [auroc(np.abs(z[:, i]), pos, kind == "") for i in range(len(SIGNALS))]
            mins, means = auroc(-np.nanmin(z, 1), pos, kind == ""), auroc(-np.nanmean(z, 1), pos, kind == "")
            record["auroc"][attack] = {"raw": dict(zip(SIGNALS, raw)), "z": dict(zip(SIGNALS, cal)),
                                       "abs_z": dict(zip(SIGNALS, both)), "min": mins, "mean": means}
            lines.append(f"| {name} | {attack} | " + " | ".join(f"{v:.3f}" for v in raw + cal + both + [mins, means])
                         + " |")
        for size in range(1, len(SIGNALS) + 1):
            for combo in itertools.combinations(range(len(SIGNALS)), size):
                for how in (("min", "high") if size == 1 else ("min", "mean")):
                    sub = z[:, combo]
                    # "high": the signal's high side (a pair fitted unusually well), flagged as -z < threshold
                    comb = -sub[:, 0] if how == "high" else sub.min(1) if how == "min" else sub.mean(1)
                    for p in operating_points(comb, kind):
                        p |= {"signals": [SIGNALS[i] for i in combo], "combine": how}
                        record["points"].append(p)
                        points.append(f"| {name} | {'+'.join(p['signals'])} | {how} | {p['threshold']} | "
                                      f"{p['flag_rate']:.3f} | {p['precision']:.3f} | {p['recall_backdoor']:.3f} | "
                                      f"{p['recall_targeted']:.3f} | {p['clean_flagged']:.3f} |")
        gate = [SIGNALS.index(sig) for sig in cfg.rematch.gate_signals]
        record["capped"] = capped_points(np.nanmean(z[:, gate], 1), kind, rcfg.block_size, rcfg.gate_threshold)
        for p in record["capped"]:
            capped.append(f"| {name} | {'+'.join(cfg.rematch.gate_signals)} | {p['rule']} | {p['flag_rate']:.4f} | "
                          f"{p['precision']:.3f} | {p['recall_backdoor']:.3f} | {p['recall_targeted']:.3f} | "
                          f"{p['clean_flagged']:.4f} |")
        clean = kind == ""
        flagged = res["flagged"]
        record["matcher"] = {"flag_rate": float(flagged.mean()), "precision": float((flagged & ~clean).sum() / max(1, flagged.sum())),
                             "recall_backdoor": float(flagged[kind == "backdoor"].mean()),
                             "recall_targeted": float(flagged[kind == "targeted"].mean()) if n_tg else None,
                             "damage": float((res["source_label"][clean] != labels[clean]).mean()),
                             # of the flagged pairs that got a new caption, the share whose caption names the image's class
                             "caption_accuracy_poisoned": _accuracy(res, rows.image_labels[order], flagged & ~clean),
                             "caption_accuracy_clean": _accuracy(res, rows.image_labels[order], flagged & clean),
                             "overrides": overrides,
                             "threshold": rcfg.gate_threshold}
        print(json.dumps({k: v for k, v in record.items() if k != "points"}), flush=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(lines + capped + points) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
