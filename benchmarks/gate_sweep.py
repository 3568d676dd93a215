"""Tune the re-matching gate on a validation split: detection precision / recall and damage of gate settings,
scored with trained checkpoints, without training.

    .venv/bin/python benchmarks/gate_sweep.py --checkpoint runs/.../checkpoint_X/model.pt [--checkpoint ...]

The validation split is the defense benchmark's data (jobs/configs/defense-bench.yaml) drawn with another seed
(data.seed = poison.seed = 1: other images, other poisoned samples, other target images), so settings chosen
here are not fitted to the benchmark's own runs. Its rows are shuffled once (the training stream mixes
shards) and re-matched block by block by `Matcher` in this process, exactly as one re-match actor does, for
every gate setting of the grid; flags are scored against the poison manifest, backdoor and targeted apart,
and damage counts clean pairs given a caption from a sample of another class. Writes
benchmarks/results/gate_sweep.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from otc_ray.config import load_config  # noqa: E402
from otc_ray.evaluate.detection import damage_metrics, detection_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRID = {"gate_threshold": (-2.0, -2.5, -3.0, -4.0), "duplicate_similarity": (0.995, 2.0)}


def validation_split(out_dir: str, overrides: list[str]):
    """(rows sorted by key, poisoned-key -> attack) of the validation split, generated once under out_dir."""
    from otc_ray.data.class_file import shard_set_classes
    from otc_ray.pipelines.evaluate import load_eval_set
    from otc_ray.pipelines.prepare import prepare_data
    from otc_ray.pipelines.runtime import init_ray
    from otc_ray.poison.manifest import read_manifest

    cfg = load_config(ROOT / "jobs" / "configs" / "defense-bench.yaml",
                      [f"output_dir={out_dir}", "data.seed=1", "poison.seed=1", *overrides])
    init_ray(cfg.ray)
    data = prepare_data(cfg, progress=False)
    classes = shard_set_classes(data.train, cfg.eval.classes, cfg.data.s3).classes
    rows = load_eval_set(data.train, cfg.data, 10 ** 9, classes)
    manifest = read_manifest(data.manifest, cfg.data.s3).select(["key", "attack"]).to_pydict()
    return cfg, rows, dict(zip(manifest["key"], manifest["attack"]))


def sweep_one(matcher, rows, order: np.ndarray, attacks: dict[str, str], block: int) -> dict[str, float]:
    flags, sources = np.zeros(len(order), bool), np.zeros(len(order), np.int64)
    for start in range(0, len(order), block):
        idx = order[start:start + block]
        m = matcher.match(rows.images[idx], [rows.captions[i] for i in idx], rows.keys[idx].tolist(),
                          labels=rows.labels[idx].tolist())
        flags[start:start + len(idx)] = m.result.flagged.numpy()
        sources[start:start + len(idx)] = m.source_label
    keys, labels = rows.keys[order], rows.labels[order]
    kind = np.asarray([attacks.get(k, "") for k in keys])
    poisoned = kind != ""
    out = {k: v for k, v in detection_metrics(flags, poisoned).items() if k in ("detect_precision", "detect_recall",
                                                                                 "detect_flag_rate")}
    for attack in ("backdoor", "targeted"):
        if (kind == attack).any():
            out[f"recall_{attack}"] = float(flags[kind == attack].mean())
    out |= damage_metrics(~poisoned & (labels >= 0) & (sources >= 0), labels, sources)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="model.pt of a training run (repeat)")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "gate-sweep"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gate_sweep.md"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    from otc_ray.model_checkpoint import load_checkpoint_model
    from otc_ray.rematch.matcher import Matcher

    cfg, rows, attacks = validation_split(args.out_dir, overrides)
    order = np.random.default_rng(0).permutation(len(rows.keys))
    n_bd = sum(a == "backdoor" for a in attacks.values())
    lines = ["# Gate sweep on the validation split\n",
             f"{len(order)} pairs ({n_bd} backdoor, {len(attacks) - n_bd} targeted copies), block "
             f"{cfg.rematch.block_size}, bank {cfg.rematch.bank_size}, k {cfg.rematch.k}, neighbours "
             f"{cfg.rematch.neighbours}; one pass per setting (sticky flags not applied).\n",
             "| checkpoint | threshold | copies | flagged | P | R | R backdoor | R targeted | damage | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ckpt in args.checkpoint:
        bundle = load_checkpoint_model(ckpt, cfg.model)
        label = "/".join(Path(ckpt).parts[-3:-1])
        for threshold in GRID["gate_threshold"]:
            for dup in GRID["duplicate_similarity"]:
                rcfg = dataclasses.replace(cfg.rematch, gate_threshold=threshold, duplicate_similarity=dup, sticky=False,
                                            propagate=False)
                start = time.perf_counter()
                m = sweep_one(Matcher(bundle, rcfg, cfg.ot), rows, order, attacks, rcfg.block_size)
                line = (f"| {label} | {threshold} | {'one witness' if dup <= 1 else 'counted'} | "
                        f"{m['detect_flag_rate']:.3f} | {m['detect_precision']:.3f} | {m['detect_recall']:.3f} | "
                        f"{m.get('recall_backdoor', float('nan')):.3f} | {m.get('recall_targeted', float('nan')):.3f} | "
                        f"{m['damage']:.4f} | {time.perf_counter() - start:.0f} |")
                print(line, flush=True)
                lines.append(line)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
