"""Does trigger propagation (`otc_ray/rematch/trigger.py`) find the literature's backdoor triggers? No training.

    .venv/bin/python benchmarks/trigger_propagation_literature.py [--num 5000] [--poison 100] [--seeds 0,1,2] \
        [--flags 15,30,60,100] [--precision 0.8] [--clean-class CLASS] [--attacks WORDS] [--output FILE] \
        [--benign 0.05 --benign-bias 3] [--no-guards]

Fashion training images (the defense benchmark's size: 5,000, 100 backdoor images of non-sneaker classes, 2%) are
triggered in memory exactly as `otc-ray poison` writes them (the same selection order, `keyed_hash(key, seed,
"select")`, and the same per-sample trigger seeds, `keyed_hash(key, seed, "trigger") >> 1`; PNG is lossless, so
the pixels are the shard set's). A gate is simulated: it has flagged the first n poisoned images (by a keyed hash)
plus clean images at the given precision (n (1 - p) / p of them, drawn the same way); the keys whose CRC-32 is 0
modulo 8 form the reference sample, as in the stage. `estimate_pattern` decides whether the flagged images share a
separate pixel pattern; when they do, the images carrying it are counted: backdoor images found, clean images hit.
Each n also runs with the clean flags alone (a gate that flagged no poison: nothing may be propagated). With
--benign, that share of the clean images carries a benign pattern of its own (a fixed 4 x 4 logo in the top-left
corner, any class), and the gate's clean flags come from its carriers --benign-bias times as often as from the rest:
a benign pattern the gate flags somewhat more often than other images must not be propagated. --no-guards turns off
the minimum mask and the enrichment test (`PropagateConfig.min_mask`, `min_enrichment`) to show what they stop.
Reads and writes nothing else; CPU only.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from otc_ray.data.builtin import dataset_info, generate
from otc_ray.identity import image_ids
from otc_ray.poison.select import keyed_hash
from otc_ray.poison.triggers import TriggerSpec, apply_trigger
from otc_ray.rematch.trigger import PropagateConfig, pixel_grid

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("trigger_propagation", ROOT / "benchmarks" / "trigger_propagation.py")
trigger_propagation = sys.modules["trigger_propagation"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trigger_propagation)                 # propagate_once: one estimate, as the stage makes it

ATTACKS = {   # name -> TriggerSpec fields (seed added per run); the defaults of `otc-ray poison`
    "patch (fixed, br)": {"kind": "patch"},
    "blended (fixed pattern)": {"kind": "blended", "alpha": 0.2},
    "sig (phase 0)": {"kind": "sig"},
    "patch (fixed noise, random place)": {"kind": "patch", "location": "random"},
    "BadNet (fresh noise, random place)": {"kind": "patch", "location": "random", "per_image": True},
    "blended (fresh noise per image)": {"kind": "blended", "alpha": 0.2, "per_image": True},
    "sig (random phase)": {"kind": "sig", "per_image": True},
    "WaNet (k=4, s=0.5)": {"kind": "wanet", "warp_grid": 4, "warp_strength": 0.5},
    # beyond the paper: does the mask collapse on a stronger or finer warp?
    **{f"WaNet stronger (k=4, s={s:g})": {"kind": "wanet", "warp_grid": 4, "warp_strength": s}
       for s in (1.0, 2.0, 4.0)},
    **{f"WaNet finer (k={k}, s={s:g})": {"kind": "wanet", "warp_grid": k, "warp_strength": s}
       for k, s in ((8, 1.0), (32, 1.0), (32, 4.0))},
}


def poison_in_memory(keys: list[str], images: np.ndarray, labels: np.ndarray, target: int, count: int,
                     spec: TriggerSpec) -> tuple[np.ndarray, np.ndarray]:
    """(images with `count` backdoored, bool (N,) poisoned): `poison_shards`' selection and per-sample seeds."""
    eligible = [i for i in range(len(keys)) if labels[i] != target]
    chosen = sorted(eligible, key=lambda i: (keyed_hash(keys[i], spec.seed, b"select"), keys[i]))[:count]
    out, poisoned = images.copy(), np.zeros(len(keys), bool)
    seeds = [keyed_hash(keys[i], spec.seed, b"trigger") >> 1 for i in chosen]
    out[chosen] = apply_trigger(images[chosen], spec, rng_seed=seeds)
    poisoned[chosen] = True
    return out, poisoned


BENIGN_LOGO = TriggerSpec("patch", size=4, location="tl", seed=999)


def benign_carriers(keys: list[str], poisoned: np.ndarray, share: float) -> np.ndarray:
    """bool (N,): the clean images (by keyed hash) that carry the benign logo, `share` of the clean ones."""
    order = [i for i in sorted(range(len(keys)), key=lambda i: keyed_hash(keys[i], 0, b"benign")) if not poisoned[i]]
    out = np.zeros(len(keys), bool)
    out[order[:int(round(share * len(order)))]] = True
    return out


def simulated_flags(keys: list[str], poisoned: np.ndarray, n: int, precision: float, seed: int,
                    clean_pool: np.ndarray, carriers: np.ndarray | None = None, bias: float = 1.0) -> tuple[list, list]:
    """(the first n poisoned indices, the clean indices of `clean_pool` (bool (N,)) a gate of this precision flags
    with them), by keyed hash; with `carriers` (bool (N,)), that many more of the clean flags are carriers than
    their share of the clean pool (`bias` times it)."""
    order = sorted(range(len(keys)), key=lambda i: keyed_hash(keys[i], seed, b"gate"))
    bad = [i for i in order if poisoned[i]][:n]
    m = int(round(n * (1 - precision) / precision))
    pool = [i for i in order if not poisoned[i] and clean_pool[i]]
    if carriers is None:
        return bad, pool[:m]
    share = float(np.mean([carriers[i] for i in pool]))
    k = min(int(round(m * min(share * bias, 1.0))), m)
    return bad, [i for i in pool if carriers[i]][:k] + [i for i in pool if not carriers[i]][:m - k]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=5000, help="fashion training images")
    ap.add_argument("--poison", type=int, default=100, help="backdoor images")
    ap.add_argument("--target", default="sneaker")
    ap.add_argument("--seeds", default="0,1,2", help="attack seeds (selection, trigger draws, simulated gate)")
    ap.add_argument("--flags", default="15,30,60,100", help="poisoned images the simulated gate has flagged")
    ap.add_argument("--precision", type=float, default=0.8, help="the simulated gate's precision")
    ap.add_argument("--clean-class", default="", help="draw the gate's clean flags from this class only (a real "
                    "gate's false positives cluster); default: any class")
    ap.add_argument("--attacks", default="",
                    help="';'-separated words: the attacks whose name holds one (default: all)")
    ap.add_argument("--output", default="", help="append the markdown table to this file")
    ap.add_argument("--benign", type=float, default=0.0, help="share of the clean images carrying a benign logo")
    ap.add_argument("--benign-bias", type=float, default=1.0, help="how much more often the gate flags its carriers")
    ap.add_argument("--no-guards", action="store_true", help="no minimum mask, no enrichment test")
    args = ap.parse_args(argv)
    pcfg = dataclasses.replace(PropagateConfig(), min_mask=0, min_enrichment=0.0) if args.no_guards \
        else PropagateConfig()
    info = dataset_info("fashion")
    target = info.label_of(args.target)
    chunks = list(generate("fashion", "train", args.num, seed=0))
    keys = [k for c in chunks for k in c["keys"]]
    clean_images = np.concatenate([c["images"] for c in chunks])
    labels = np.concatenate([c["labels"] for c in chunks])
    names = [a for a in ATTACKS if not args.attacks or any(w in a for w in args.attacks.split(";"))]
    head = ["| attack | seed | flagged (poisoned + clean) | pattern | mask px | ref cluster / gap / match / enrichment | "
            "backdoor found | clean hit | clean-only flags: pattern / clean hit |",
            "|---|---|---|---|---|---|---|---|---|"]
    lines = list(head)
    print("\n".join(head), flush=True)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            spec = TriggerSpec(**ATTACKS[name], seed=seed)
            images, poisoned = poison_in_memory(keys, clean_images, labels, target, args.poison, spec)
            carriers = benign_carriers(keys, poisoned, args.benign) if args.benign > 0 else None
            if carriers is not None:
                images[carriers] = apply_trigger(images[carriers], BENIGN_LOGO)
            grid, ids = pixel_grid(images), image_ids(images)
            everyone = np.ones(len(keys), bool)
            pool = labels == info.label_of(args.clean_class) if args.clean_class else everyone
            for n in (int(x) for x in args.flags.split(",")):
                bad, clean = simulated_flags(keys, poisoned, n, args.precision, seed, pool, carriers,
                                             args.benign_bias)
                r = trigger_propagation.propagate_once(grid, ids, keys, bad + clean, everyone, pcfg)
                c = trigger_propagation.propagate_once(grid, ids, keys, clean, ~poisoned, pcfg) if clean else None
                cluster = "-" if r["above"] is None else f"{r['above']} / {r['gap']:.2f} / {r['match']:.2f} / {r['enrichment']:.0f}"
                control = "-" if c is None else (f"{'yes' if c['pattern'] else 'none'} / "
                                                 f"{int((c['hits'] & ~poisoned).sum())}")
                lines.append(f"| {name} | {seed} | {len(bad)} + {len(clean)} | {'yes' if r['pattern'] else 'none'} | "
                             f"{r['mask'] or '-'} | {cluster} | "
                             f"{int((r['hits'] & poisoned).sum())}/{int(poisoned.sum())}"
                             f" | {int((r['hits'] & ~poisoned).sum())} | {control} |")
                print(lines[-1], flush=True)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"cpu {cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.1f} s, "
          f"wall {time.perf_counter() - t0:.1f} s", flush=True)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(f"\nprecision {args.precision}, clean flags from {args.clean_class or 'any class'}:\n\n"
                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
