"""Defense benchmark: defenses x attacks x data sets x seeds, plus a clean reference, against the targets of
the defense issue; writes benchmarks/results/defense.md.

    .venv/bin/python benchmarks/defense_bench.py                                   # the full matrix (days on 2 cores)
    .venv/bin/python benchmarks/defense_bench.py --datasets fashion --seeds 0 \\
        --attacks patch+targeted,blended                                           # what a 2-core session affords

Every cell is one `otc-ray train` run (jobs/configs/defense-bench.yaml plus the cell's overrides) in the MLflow
experiment `otc-ray-defense-bench` under --out-dir; a cell's run name carries the digest of its settings, so an
interrupted benchmark resumes where it stopped and finished cells are reused. Attacks:

    patch     backdoor, 4x4 noise patch, 1% of the pairs, captions of the target class
    blended   backdoor, full-image noise blended at alpha 0.2, same count
    targeted  T test images x K copies captioned with the adversarial class
    A+B       both attacks in one run on the same data (one training per defense instead of two)

The clean reference trains `none` on the unpoisoned data of each data set and seed. Figures per cell are the
final model's (zero-shot, linear probe, ASRs) and the last epoch's re-matching (detection P/R, damage) as
rank 0 saw its shard. Targets are checked on the means over seeds; a missed target is reported as missed.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

from otc_ray.config import Config, content_digest, load_config, replace  # noqa: E402
from otc_ray.track import metric_names as N  # noqa: E402
from otc_ray.track.compare import group_runs, render  # noqa: E402
from otc_ray.track.mlflow_logger import search_runs, training_digest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "jobs" / "configs" / "defense-bench.yaml"
EXPERIMENT = "otc-ray-defense-bench"
DEFENSES = ("none", "roclip", "safeclip", "otcclip")
ATTACKS = ("patch", "blended", "targeted")
DATASETS = ("fashion", "shapes")
ATTACK_OVERRIDES = {
    "patch": {"poison.trigger": "patch"},
    "blended": {"poison.trigger": "blended"},
    "targeted": {},
}
# the target class and adversarial class of each data set (class names of otc_ray/data/classes/*.json)
CLASS_OVERRIDES = {
    "fashion": {"poison.target": "sneaker", "poison.adversarial": "bag"},
    "shapes": {"poison.target": "circle", "poison.adversarial": "square"},
}
TARGETS = {"no_defense_asr": 0.70, "otcclip_asr": 0.05, "zeroshot_gap": 0.02, "over_roclip": 0.02,
           "recall": 0.95, "precision": 0.80, "damage": 0.02}


@dataclass(frozen=True)
class Cell:
    dataset: str
    attack: str          # "clean", one of ATTACKS, or "a+b"
    defense: str
    seed: int

    @property
    def parts(self) -> tuple[str, ...]:
        """The cell's attack label split: backdoor trigger names and/or "targeted" (() for the clean cell)."""
        return () if self.attack == "clean" else tuple(self.attack.split("+"))

    def overrides(self) -> dict[str, str | int | tuple[str, ...]]:
        out = {"data.dataset": self.dataset, "train.defense": self.defense, "train.seed": self.seed,
               "poison.seed": self.seed, "data.seed": self.seed, **CLASS_OVERRIDES[self.dataset]}
        parts = self.parts
        backdoors = [p for p in parts if p != "targeted"]
        if len(backdoors) > 1:
            raise ValueError(f"one backdoor trigger per run, got {self.attack!r}")
        out["poison.attack"] = (("backdoor",) if backdoors else ()) + (("targeted",) if "targeted" in parts else ())
        for p in backdoors:
            out |= ATTACK_OVERRIDES[p]
        return out


def cells(datasets, attacks, defenses, seeds) -> list[Cell]:
    out = []
    for dataset in datasets:
        for seed in seeds:
            out.append(Cell(dataset, "clean", "none", seed))
            out += [Cell(dataset, attack, defense, seed) for attack in attacks for defense in defenses]
    return out


def cell_config(base: Config, cell: Cell) -> Config:
    cfg = replace(base, **{k.replace(".", "__"): v for k, v in cell.overrides().items()})
    return replace(cfg, name=f"bench-{cell.dataset}-{cell.attack}-{cell.defense}-s{cell.seed}-{training_digest(cfg)}")


def run_cells(base: Config, todo: list[Cell]) -> dict[Cell, str]:
    """Train every cell in turn (finished cells are reused by name); returns cell -> MLflow run id."""
    from otc_ray.pipelines.train import run_training
    from otc_ray.track.run_context import finish_parent_run, start_parent_run

    ids, durations = {}, []
    parent = start_parent_run(base, f"bench-{content_digest(sorted(map(str, todo)))}", "benchmark")
    try:
        _train_cells(base, todo, parent, ids, durations, run_training)
    except BaseException:
        finish_parent_run(base, parent, "FAILED")
        raise
    finish_parent_run(base, parent)
    return ids


def _train_cells(base: Config, todo: list[Cell], parent: str, ids: dict, durations: list, run_training) -> None:
    """Train the cells in turn as children of the benchmark's parent run, filling ids and durations."""
    for i, cell in enumerate(todo):
        eta = f" ETA {np.mean(durations) * (len(todo) - i) / 60:.0f} min" if durations else ""
        print(f"[bench {i + 1}/{len(todo)}] {cell}{eta}", flush=True)
        start = time.perf_counter()
        result = run_training(cell_config(base, cell), progress=False, parent_run_id=parent)
        durations.append(time.perf_counter() - start)
        ids[cell] = result.run_id
        m = result.metrics
        print(f"    zero-shot {m.get(N.FINAL_ZEROSHOT_TOP1, math.nan):.3f}  backdoor ASR "
              f"{m.get(N.FINAL_BACKDOOR_ASR, math.nan):.3f}  targeted ASR {m.get(N.FINAL_TARGETED_ASR, math.nan):.3f}"
              f"  ({durations[-1] / 60:.1f} min)", flush=True)


# ----------------------------------------------------------------------------------------- targets
def _mean(rows, dataset: str, attack: str, defense: str, metric: str) -> float:
    vals = [v for (d, a, f), r in rows.items() if (d, a, f) == (dataset, attack, defense)
            for v in r.get(metric, []) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def target_lines(values: dict, datasets, attacks) -> list[str]:
    """One line per target and (data set, attack): the figure and met / missed."""
    t, lines = TARGETS, []
    for ds in datasets:
        clean = _mean(values, ds, "clean", "none", N.FINAL_ZEROSHOT_TOP1)
        for attack in attacks:
            m = lambda defense, metric: _mean(values, ds, attack, defense, metric)  # noqa: E731
            parts = attack.split("+")                 # the cell label: trigger names and/or "targeted"
            if parts != ["targeted"]:
                asr = m("none", N.FINAL_BACKDOOR_ASR)
                lines.append(f"- {ds} / {attack}: no-defense backdoor ASR {asr:.3f} (target >= {t['no_defense_asr']}): "
                             f"{_verdict(None if math.isnan(asr) else asr >= t['no_defense_asr'])}")
                asr = m("otcclip", N.FINAL_BACKDOOR_ASR)
                lines.append(f"- {ds} / {attack}: OTCCLIP backdoor ASR {asr:.3f} (target <= {t['otcclip_asr']}): "
                             f"{_verdict(None if math.isnan(asr) else asr <= t['otcclip_asr'])}")
            if "targeted" in parts:
                tasr = m("otcclip", N.FINAL_TARGETED_ASR)
                lines.append(f"- {ds} / {attack}: OTCCLIP targeted ASR {tasr:.3f} (target 0): "
                             f"{_verdict(None if math.isnan(tasr) else tasr == 0.0)}")
            zs, ro = m("otcclip", N.FINAL_ZEROSHOT_TOP1), m("roclip", N.FINAL_ZEROSHOT_TOP1)
            lines.append(f"- {ds} / {attack}: OTCCLIP zero-shot {zs:.3f} vs clean {clean:.3f} (within "
                         f"{t['zeroshot_gap']}): {_verdict(None if math.isnan(zs + clean) else zs >= clean - t['zeroshot_gap'])}"
                         f"; vs RoCLIP {ro:.3f} (>= +{t['over_roclip']}): "
                         f"{_verdict(None if math.isnan(zs + ro) else zs >= ro + t['over_roclip'])}")
            p, r = m("otcclip", N.REMATCH_DETECT_PRECISION), m("otcclip", N.REMATCH_DETECT_RECALL)
            lines.append(f"- {ds} / {attack}: OTCCLIP detection P {p:.3f} / R {r:.3f} (R >= {t['recall']} at "
                         f"P >= {t['precision']}): "
                         f"{_verdict(None if math.isnan(p + r) else (r >= t['recall'] and p >= t['precision']))}")
            dmg = m("otcclip", N.REMATCH_DAMAGE)
            lines.append(f"- {ds} / {attack}: OTCCLIP damage {dmg:.4f} (target <= {t['damage']}): "
                         f"{_verdict(None if math.isnan(dmg) else dmg <= t['damage'])}")
    return lines


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, no GPU, Python {platform.python_version()}"


def report(uri: str, ids: dict[Cell, str], datasets, attacks, command: str, minutes: float) -> str:
    runs = [r for r in search_runs(uri, EXPERIMENT) if r.run_id in set(ids.values())]
    by_id = {r.run_id: r for r in runs}
    values: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for cell, run_id in ids.items():
        slot = values.setdefault((cell.dataset, cell.attack, cell.defense), {})
        for k, v in by_id[run_id].metrics.items():
            slot.setdefault(k, []).append(v)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = [f"# Defense benchmark\n",
           f"Command: `{command}`  ",
           f"Machine: {machine()}  ",
           f"Date: {datetime.date.today()}, commit {commit or 'unknown'}, {len(ids)} runs, {minutes:.0f} min in all.\n",
           "Every row is one (data set, defense, attack, trigger, poison) group; `seeds` runs each, mean ± std.",
           "Zero-shot and linear probe on the clean test split; ASRs on triggered / target test images; detection and",
           "damage from the last epoch's re-matching (otcclip, roclip); samples/s of the training worker.\n"]
    for ds in datasets:
        rows = group_runs([by_id[i] for c, i in ids.items() if c.dataset == ds])
        out += [f"## {ds}\n", render(rows, "markdown"), ""]
    out += ["## Targets\n"] + target_lines(values, datasets, attacks) + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma list of patch|blended|targeted|A+B")
    parser.add_argument("--defenses", default=",".join(DEFENSES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "defense-bench"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "defense.md"))
    args, overrides = parser.parse_known_args(argv)
    datasets, attacks = args.datasets.split(","), args.attacks.split(",")
    for a in attacks:
        if any(p not in ATTACKS for p in a.split("+")):
            parser.error(f"unknown attack {a!r}; use {', '.join(ATTACKS)} or A+B")
    base = load_config(BASE, [f"output_dir={args.out_dir}", f"tracking.experiment={EXPERIMENT}", *overrides])
    todo = cells(datasets, attacks, args.defenses.split(","), [int(s) for s in args.seeds.split(",")])
    start = time.perf_counter()
    ids = run_cells(base, todo)
    from otc_ray.track.mlflow_logger import tracking_uri

    command = "python benchmarks/defense_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(tracking_uri(base), ids, datasets, attacks, command.strip(), (time.perf_counter() - start) / 60)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
