"""Does trigger propagation find the rest of a backdoor from the gate's real flags, and stay silent without one?

    .venv/bin/python benchmarks/trigger_propagation.py --data runs/defense-bench/data/poisoned-backdoor-XXXX \
        --journal runs/defense-bench/rematch/flags-bench-...txt [--flags 15,30,60,100,300] [--output X.md]

The journal is a training run's flag store file: the keys its gate flagged, in the order it flagged them (sticky
flags, every epoch). For each n, the first n journal keys play the gate's flags so far (copies of one image weigh
1 / their number, as in the stage), the keys whose CRC-32 is 0 modulo 8 the reference sample, and
`otc_ray.rematch.trigger.estimate_pattern` decides whether they share a separate pixel pattern; when they do, the
images that carry it are counted: backdoor pairs found, clean pairs hit. Each n is run twice: on the shard set, and
on its clean pairs alone with the journal's clean keys (a run whose gate flagged only clean pairs: nothing may be
propagated). Data are read in this process (no Ray).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from otc_ray.config import load_config
from otc_ray.identity import image_ids
from otc_ray.rematch.trigger import PropagateConfig, estimate_pattern, in_reference_sample, pattern_match, pixel_grid

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gate_signals", ROOT / "benchmarks" / "gate_signals.py")
gate_signals = sys.modules["gate_signals"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate_signals)                        # its shard reader (read_rows)


def propagate_once(grid: torch.Tensor, ids: torch.Tensor, keys: list[str], flagged: list[int], keep: np.ndarray,
                   cfg: PropagateConfig) -> dict:
    """One estimate from the flagged rows (indices into the shard set) over the kept rows; returns the pattern's
    verdict and the kept rows it hits."""
    reference = [i for i, k in enumerate(keys) if keep[i] and in_reference_sample(k)]
    f = torch.as_tensor(flagged, dtype=torch.long)
    _, inverse, counts = torch.unique(ids[f], return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse].float()
    pat = estimate_pattern((w.unsqueeze(1) * grid[f]).sum(0), float(w.sum()), grid[reference].round(), cfg)
    hits = np.zeros(len(keys), bool)
    if pat is not None:
        hits = (pattern_match(grid, pat) >= pat.match).numpy() & keep
    return {"weight": float(w.sum()), "pattern": pat is not None, "mask": 0 if pat is None else int((pat.pattern != 0).sum()),
            "above": None if pat is None else pat.above, "gap": None if pat is None else pat.gap,
            "match": None if pat is None else pat.match,
            "enrichment": None if pat is None else pat.enrichment, "hits": hits}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a poisoned shard set (with its _poison_manifest.parquet)")
    ap.add_argument("--journal", required=True, help="a run's flag journal (one key per line, in flag order)")
    ap.add_argument("--flags", default="15,30,60,100,300", help="numbers of journal keys to try")
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "defense-bench.yaml"))
    ap.add_argument("--output", default="", help="append the markdown table to this file")
    ap.add_argument("overrides", nargs="*", help="config overrides (the data section is read)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    pcfg = PropagateConfig()
    rows = gate_signals.read_rows(args.data, cfg.data)
    keys = [str(k) for k in rows.keys]
    grid, ids = pixel_grid(rows.images), image_ids(rows.images)
    position = {k: i for i, k in enumerate(keys)}
    journal = [k for k in Path(args.journal).read_text(encoding="utf-8").split() if k in position]
    backdoor, poisoned = rows.kind == "backdoor", rows.kind != ""
    lines = [f"### {Path(args.data).name} with {Path(args.journal).name}\n",
             "| data | first n flags | flagged poisoned | weight | pattern | mask px | ref cluster / gap / match | backdoor found | clean hit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for clean_only in (False, True):
        keep = ~poisoned if clean_only else np.ones(len(keys), bool)
        for n in (int(x) for x in args.flags.split(",")):
            flagged = [position[k] for k in journal[:n] if keep[position[k]]]
            if not flagged:
                continue
            r = propagate_once(grid, ids, keys, flagged, keep, pcfg)
            found = f"{int((r['hits'] & backdoor).sum())}/{int(backdoor.sum())}" if not clean_only else "-"
            counts = ("-" if r["above"] is None
                      else f"{r['above']} / {r['gap']:.2f} / {r['match']:.2f}")
            lines.append(f"| {'clean pairs only' if clean_only else 'shard set'} | {n} | "
                         f"{int(poisoned[flagged].sum())}/{len(flagged)} | {r['weight']:.0f} | "
                         f"{'yes' if r['pattern'] else 'none'} | {r['mask'] or '-'} | "
                         f"{counts} | {found} | "
                         f"{int((r['hits'] & ~poisoned).sum())} |")
            print(lines[-1], flush=True)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
