"""Defense benchmark: defenses x attacks x data sets x seeds, plus a clean reference and named variants; its cell
files are the one results store, and `report` rebuilds docs/results.md (every table and plot) from them.

    python benchmarks/defense_bench.py report                                  # docs/results.md from the cell files
    python benchmarks/defense_bench.py run --datasets fashion --seeds 0 \\
        --attacks patch+targeted,blended                                       # train the cells a sitting affords
    python benchmarks/defense_bench.py run --attacks patch+targeted --defenses otcclip \\
        --variants no-propagate                                                # a variant: benchmarks/variants/*.yaml
    python benchmarks/defense_bench.py run --attacks patch+targeted --defenses none \\
        --variants fast-model                                                  # the fast experiment model (fast_model.md)
    python benchmarks/defense_bench.py table --base jobs/configs/literature-bench.yaml \
        --cells benchmarks/results/literature/cells                           # a store's rows, mean ± std over seeds 0-2

Every cell is one `otc-ray train` run: jobs/configs/defense-bench.yaml, the cell's data set / attack / defense /
seed, and the overrides of its variant file (none for the default configuration), in the MLflow experiment
`otc-ray-defense-bench` under --out-dir. A finished cell is one small JSON file,
benchmarks/results/cells/<data set>/<attack>-<defense>[-<variant>]-s<seed>.json (`otc_ray.track.cells`): the
digest of its full training config, the commit that measured it, its final metrics and per-epoch curves. A cell is
current when its digest equals the digest of the config the current code builds for it: `run` reuses current cells
and trains the others (an interrupted run resumes from its last checkpoint), so a matrix can be completed over
several sittings or machines (copy the files back); `report` uses current cells only and names the others as left
out. Cells of superseded configurations live in git history (docs/results.md names the archive tag), not here.

Attacks (data set classes from otc_ray/data/classes/*.json):

    patch     backdoor, 4x4 noise patch, 100 pairs (2%), captions of the target class
    blended   backdoor, full-image noise blended at alpha 0.3, same count
    sig       backdoor, a sinusoidal signal over the whole image (SIG), amplitude 80, same count
              (smaller sizes are not learnt at this scale: benchmarks/results/attack_sizing.md)
    targeted  T test images x K copies captioned with the adversarial class
    A+B       both attacks in one run on the same data

A variant is a file benchmarks/variants/<name>.yaml of plain config overrides (nested like a config file) whose
first line says what it tests. One that changes `poison.*` is a harder attack (a stress row); any other changes the
defense (an ablation row). The report compares each variant with the measured configuration it extends most
closely: the default, or the variant whose overrides are a subset of its own. Figures per cell are the final
model's (zero-shot, linear probe, ASRs) and the re-matching of the last epoch that re-matched (detection P/R,
damage; RoCLIP re-matches every K epochs) as rank 0 saw its shard. Targets are checked on the means over seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from otc_ray.config import Config, ConfigError, content_digest, load_config, replace  # noqa: E402
from otc_ray.track import compare  # noqa: E402
from otc_ray.track import metric_names  # noqa: E402
from otc_ray.track.cells import CellResult, cell_from_run, read_cell, write_cell  # noqa: E402
from otc_ray.track.compare import Row  # noqa: E402
from otc_ray.track.mlflow_logger import RunRecord, training_digest  # noqa: E402
from otc_ray.track.plots import plot_compare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "jobs" / "configs" / "defense-bench.yaml"
LITERATURE_BASE = ROOT / "jobs" / "configs" / "literature-bench.yaml"
VARIANTS = ROOT / "benchmarks" / "variants"
CELLS = ROOT / "benchmarks" / "results" / "cells"
TEMPLATE = ROOT / "benchmarks" / "results_template.md"
RESULTS = ROOT / "docs" / "results.md"
ARCHIVE_TAG = "results-archive-2026-12-07"      # the superseded regimes' cells, reports and notes
EXPERIMENT = "otc-ray-defense-bench"
DEFENSES = ("none", "roclip", "safeclip", "otcclip")
ATTACKS = ("patch", "blended", "sig", "targeted")
# the literature's backdoors (CleanCLIP's code, WaNet): a random part per image, no pixel fixed across images; run
# at the literature's rates on 60,000 pairs (LITERATURE_BASE), not in the default matrix
LITERATURE_ATTACKS = ("badnet", "blend-noise", "sig-phase", "wanet")
DATASETS = ("fashion", "shapes")
# the matrix the targets are set for: each of its rows is listed under Targets, run or not
MATRIX = {"fashion": ("patch+targeted", "blended", "sig"), "shapes": ("patch+targeted",)}
ATTACK_OVERRIDES = {
    "patch": {"poison.trigger": "patch"},
    "blended": {"poison.trigger": "blended", "poison.blend_alpha": 0.3},   # at 0.2 `none` learnt nothing (0.053)
    "sig": {"poison.trigger": "sig", "poison.sig_delta": 80.0},            # at 20-40 `none` learnt nothing (<= 0.08)
    "targeted": {},
    "badnet": {"poison.trigger": "patch", "poison.trigger_location": "random", "poison.trigger_per_image": True},
    "blend-noise": {"poison.trigger": "blended", "poison.blend_alpha": 0.2, "poison.trigger_per_image": True},
    "sig-phase": {"poison.trigger": "sig", "poison.sig_delta": 80.0, "poison.trigger_per_image": True},
    "wanet": {"poison.trigger": "wanet"},
}
# the target class and adversarial class of each data set (class names of otc_ray/data/classes/*.json)
CLASS_OVERRIDES = {
    "fashion": {"poison.target": "sneaker", "poison.adversarial": "bag"},
    "shapes": {"poison.target": "circle", "poison.adversarial": "square"},
}
TARGETS = {"no_defense_asr": 0.90, "otcclip_asr": 0.05, "targeted_asr": 1 / 16, "zeroshot_gap": 0.02,
           "over_baselines": 0.02, "recall": 0.95, "precision": 0.80, "damage": 0.02}
BASELINES = ("roclip", "safeclip")
TABLE_METRICS = (("zero-shot", metric_names.FINAL_ZEROSHOT_TOP1),
                 ("lin-probe", metric_names.FINAL_LINEAR_PROBE_SPLIT_ACC),
                 ("backdoor ASR", metric_names.FINAL_BACKDOOR_ASR), ("targeted ASR", metric_names.FINAL_TARGETED_ASR),
                 ("det P", metric_names.REMATCH_DETECT_PRECISION), ("det R", metric_names.REMATCH_DETECT_RECALL),
                 ("damage", metric_names.REMATCH_DAMAGE))
EFFECT_METRICS = TABLE_METRICS[:1] + TABLE_METRICS[2:4]     # zero-shot and the two ASRs


# ----------------------------------------------------------------------------------------- variants
def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def known_variants(folder: Path = VARIANTS) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def load_variant(name: str, folder: Path = VARIANTS) -> dict[str, Any]:
    """{'section.key': value} of benchmarks/variants/<name>.yaml; ConfigError naming the file when it is missing or
    not a mapping of config sections. "A+B" is A's overrides, then B's (B wins where both set a key)."""
    if "+" in name:
        return {k: v for part in name.split("+") for k, v in load_variant(part, folder).items()}
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown variant {name!r}: no {path} (known: {', '.join(known_variants(folder))})")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"variant file {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict) or not tree or not all(isinstance(v, dict) for v in tree.values()):
        raise ConfigError(f"variant file {path} must hold config sections of overrides (e.g. `rematch: {{...}}`)")
    return _flatten(tree)


def variant_description(name: str, folder: Path = VARIANTS) -> str:
    """The variant file's first-line comment (what it tests); of "A+B", A's and B's."""
    if "+" in name:
        return "; ".join(variant_description(part, folder) for part in name.split("+"))
    first = (Path(folder) / f"{name}.yaml").read_text().splitlines()[0]
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def is_stress(name: str, folder: Path = VARIANTS) -> bool:
    """A variant that changes the attack (`poison.*`) rather than the defense."""
    return any(k.startswith("poison.") for k in load_variant(name, folder))


def extended_variant(name: str, folder: Path = VARIANTS) -> str:
    """The measured configuration a variant is compared with: the variant whose overrides are the largest proper
    subset of its own ("" = the default configuration)."""
    mine = load_variant(name, folder).items()
    below = [(len(load_variant(o, folder)), o) for o in known_variants(folder)
             if o != name and load_variant(o, folder).items() < mine]
    return max(below)[1] if below else ""


# ----------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    dataset: str
    attack: str          # "clean", one of ATTACKS, or "a+b"
    defense: str
    seed: int
    variant: str = ""    # a file name of benchmarks/variants ("" = the default configuration)

    @property
    def parts(self) -> tuple[str, ...]:
        """The cell's attack label split: backdoor trigger names and/or "targeted" (() for the clean cell)."""
        return () if self.attack == "clean" else tuple(self.attack.split("+"))

    def overrides(self, variants: Path = VARIANTS) -> dict[str, Any]:
        out = {"data.dataset": self.dataset, "train.defense": self.defense, "train.seed": self.seed,
               "poison.seed": self.seed, "data.seed": self.seed, **CLASS_OVERRIDES[self.dataset]}
        parts = self.parts
        backdoors = [p for p in parts if p != "targeted"]
        if len(backdoors) > 1:
            raise ValueError(f"one backdoor trigger per run, got {self.attack!r}")
        out["poison.attack"] = (("backdoor",) if backdoors else ()) + (("targeted",) if "targeted" in parts else ())
        if not parts:           # the clean reference scores the targets an attack would pick: the rate without poison
            out["eval.targeted_base_rate"] = True
        for p in backdoors:
            out |= ATTACK_OVERRIDES[p]
        if self.variant:
            out |= load_variant(self.variant, variants)
        return out

    @property
    def label(self) -> str:
        """The file and run name part: attack-defense[-variant]."""
        return f"{self.attack}-{self.defense}" + (f"-{self.variant}" if self.variant else "")


def cells(datasets, attacks, defenses, seeds, variants=(), clean_defenses=None) -> list[Cell]:
    """Without variants: per data set and seed, the clean references (no poison) of `clean_defenses` (default:
    every defense; `none` is the reference of the targets), then attacks x defenses. With variants: attacks x
    defenses x seeds of each variant, no clean references."""
    out = []
    for dataset in datasets:
        for seed in seeds:
            if not variants:
                clean = defenses if clean_defenses is None else clean_defenses
                out += [Cell(dataset, "clean", d, seed) for d in clean]
            out += [Cell(dataset, attack, defense, seed, variant) for variant in (variants or ("",))
                    for attack in attacks for defense in defenses]
    return out


def cell_config(base: Config, cell: Cell, variants: Path = VARIANTS) -> tuple[Config, str]:
    """(the cell's config, its digest): base plus the cell's overrides, named after the cell and the digest."""
    cfg = replace(base, **{k.replace(".", "__"): v for k, v in cell.overrides(variants).items()})
    digest = training_digest(cfg)
    return replace(cfg, name=f"bench-{cell.dataset}-{cell.label}-s{cell.seed}-{digest}"), digest


def cell_path(folder: Path, cell: Cell) -> Path:
    return Path(folder) / cell.dataset / f"{cell.label}-s{cell.seed}.json"


def cell_of(result: CellResult) -> Cell:
    """The matrix coordinates a cell file records."""
    c = result.cell
    return Cell(c["dataset"], c["attack"], c["defense"], int(c["seed"]), c.get("variant", ""))


def current_cell(folder: Path, base: Config, cell: Cell, variants: Path = VARIANTS) -> CellResult | None:
    """The cell's file when its digest is that of the config the current code builds for the cell, else None."""
    path = cell_path(folder, cell)
    if not path.exists():
        return None
    done = read_cell(path)
    return done if done.digest == cell_config(base, cell, variants)[1] else None


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def run_cells(base: Config, todo: list[Cell], folder: Path) -> dict[Cell, CellResult]:
    """Train every cell without a current file, in turn, as children of the benchmark's parent MLflow run, writing
    each cell file as it lands; returns every cell's result."""
    from otc_ray.track.run_context import finish_parent_run, start_parent_run

    results: dict[Cell, CellResult] = {}
    done = {c: current_cell(folder, base, c) for c in todo}
    if all(r is not None for r in done.values()):
        return done
    # named after the cells and their config digests: the same cells under other overrides are another parent run
    parent = start_parent_run(base, f"bench-{content_digest(sorted(f'{c}:{cell_config(base, c)[1]}' for c in todo))}",
                              "benchmark")
    try:
        _train_cells(base, todo, folder, parent, results)
    except BaseException:
        finish_parent_run(base, parent, "FAILED")
        raise
    finish_parent_run(base, parent)
    return results


def _train_cells(base: Config, todo: list[Cell], folder: Path, parent: str, results: dict) -> None:
    """Train the cells without a current file in turn (children of `parent`), filling results."""
    from otc_ray.pipelines.train import run_training
    from otc_ray.track.mlflow_logger import tracking_uri

    durations: list[float] = []
    for i, cell in enumerate(todo):
        done = current_cell(folder, base, cell)
        if done is not None:
            results[cell] = done
            print(f"[bench {i + 1}/{len(todo)}] {cell}: reused {cell_path(folder, cell)} ({done.commit})", flush=True)
            continue
        left = sum(current_cell(folder, base, c) is None for c in todo[i:])
        eta = f" ETA {np.mean(durations) * left / 60:.0f} min" if durations else ""
        print(f"[bench {i + 1}/{len(todo)}] {cell}{eta}", flush=True)
        start = time.perf_counter()
        cfg, digest = cell_config(base, cell)
        result = run_training(cfg, progress=False, parent_run_id=parent)
        durations.append(time.perf_counter() - start)
        results[cell] = cell_from_run(tracking_uri(cfg), result.run_id, dataclasses.asdict(cell), digest,
                                      git_commit(), EXPERIMENT)
        write_cell(cell_path(folder, cell), results[cell])
        m = result.metrics
        print(f"    zero-shot {m.get(metric_names.FINAL_ZEROSHOT_TOP1, math.nan):.3f}  backdoor ASR "
              f"{m.get(metric_names.FINAL_BACKDOOR_ASR, math.nan):.3f}  targeted ASR "
              f"{m.get(metric_names.FINAL_TARGETED_ASR, math.nan):.3f}  ({durations[-1] / 60:.1f} min)", flush=True)


# ----------------------------------------------------------------------------------------- targets
def _mean(rows, dataset: str, attack: str, defense: str, metric: str) -> float:
    vals = [v for (d, a, f), r in rows.items() if (d, a, f) == (dataset, attack, defense)
            for v in r.get(metric, []) if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _verdict(ok: bool | None) -> str:
    """met / missed; None where a figure it needs has no cell yet."""
    return "not run yet (no cell files)" if ok is None else ("met" if ok else "**missed**")


def significance(a: list[float], b: list[float]) -> str:
    """The difference of means a - b and whether it exceeds two standard deviations (of the pooled seeds' spread;
    with one seed per side there is no spread to compare against)."""
    a, b = [v for v in a if not math.isnan(v)], [v for v in b if not math.isnan(v)]
    if not a or not b:
        return "no figures"
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return f"difference {diff:+.3f}, one seed: no spread to judge it by"
    spread = float(np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2))
    return f"difference {diff:+.3f}" + (" > 2 std" if abs(diff) > 2 * spread else f", within 2 std ({2 * spread:.3f}): none")


def target_lines(values: dict, datasets, attacks) -> list[str]:
    """One line per target and (data set, attack) of the MATRIX or with cells: the figure and met / missed."""
    t, lines = TARGETS, []
    for ds in datasets:
        clean = _mean(values, ds, "clean", "none", metric_names.FINAL_ZEROSHOT_TOP1)
        for attack in attacks:
            if not any(key[:2] == (ds, attack) for key in values):
                if attack in MATRIX.get(ds, ()):
                    lines.append(f"- {ds} / {attack}: not run yet (no cell files)")
                continue
            m = lambda defense, metric: _mean(values, ds, attack, defense, metric)  # noqa: E731
            parts = attack.split("+")                 # the cell label: trigger names and/or "targeted"
            if parts != ["targeted"]:
                asr = m("none", metric_names.FINAL_BACKDOOR_ASR)
                lines.append(f"- {ds} / {attack}: no-defense backdoor ASR {asr:.3f} (target >= {t['no_defense_asr']}): "
                             f"{_verdict(None if math.isnan(asr) else asr >= t['no_defense_asr'])}")
                asr = m("otcclip", metric_names.FINAL_BACKDOOR_ASR)
                lines.append(f"- {ds} / {attack}: OTCCLIP backdoor ASR {asr:.3f} (target <= {t['otcclip_asr']}): "
                             f"{_verdict(None if math.isnan(asr) else asr <= t['otcclip_asr'])}")
            if "targeted" in parts:
                tasr = m("otcclip", metric_names.FINAL_TARGETED_ASR)
                lines.append(f"- {ds} / {attack}: OTCCLIP targeted ASR {tasr:.3f} (target <= {t['targeted_asr']:.4f}): "
                             f"{_verdict(None if math.isnan(tasr) else tasr <= t['targeted_asr'] + 1e-9)}")
            zs = m("otcclip", metric_names.FINAL_ZEROSHOT_TOP1)
            lines.append(f"- {ds} / {attack}: OTCCLIP zero-shot {zs:.3f} vs clean {clean:.3f} (within "
                         f"{t['zeroshot_gap']}): {_verdict(None if math.isnan(zs + clean) else zs >= clean - t['zeroshot_gap'])}")
            for baseline in BASELINES:
                bz, basr = m(baseline, metric_names.FINAL_ZEROSHOT_TOP1), m(baseline, metric_names.FINAL_BACKDOOR_ASR)
                if math.isnan(bz + zs):
                    continue
                stops = parts == ["targeted"] or basr <= t["otcclip_asr"]
                diff = significance(values.get((ds, attack, "otcclip"), {}).get(metric_names.FINAL_ZEROSHOT_TOP1, []),
                                    values.get((ds, attack, baseline), {}).get(metric_names.FINAL_ZEROSHOT_TOP1, []))
                verdict = _verdict(zs >= bz + t["over_baselines"]) if stops else "n/a (it does not stop the attack)"
                lines.append(f"- {ds} / {attack}: OTCCLIP zero-shot {zs:.3f} vs {baseline} {bz:.3f} (>= "
                             f"+{t['over_baselines']} where it stops the attack; {diff}): {verdict}")
            p, r = m("otcclip", metric_names.REMATCH_DETECT_PRECISION), m("otcclip", metric_names.REMATCH_DETECT_RECALL)
            lines.append(f"- {ds} / {attack}: OTCCLIP detection P {p:.3f} / R {r:.3f} (R >= {t['recall']} at "
                         f"P >= {t['precision']}): "
                         f"{_verdict(None if math.isnan(p + r) else (r >= t['recall'] and p >= t['precision']))}")
            dmg = m("otcclip", metric_names.REMATCH_DAMAGE)
            lines.append(f"- {ds} / {attack}: OTCCLIP damage {dmg:.4f} (target <= {t['damage']}): "
                         f"{_verdict(None if math.isnan(dmg) else dmg <= t['damage'])}")
    return lines


def detection_lines(results: dict[Cell, CellResult]) -> list[str]:
    """Per-epoch recall of the gate's new flags (backdoor, targeted) and their precision, mean over seeds, for each
    (data set, attack) group of re-matching cells."""
    keys = (("backdoor recall", metric_names.rematch_gate("recall_backdoor")),
            ("targeted recall", metric_names.rematch_gate("recall_targeted")),
            ("precision", metric_names.rematch_gate("precision")))
    groups: dict[tuple[str, str, str], list[CellResult]] = {}
    for cell, r in results.items():
        if any(k in r.history for _, k in keys):
            groups.setdefault((cell.dataset, cell.attack, cell.defense), []).append(r)
    lines = ["| data | attack | defense | seeds | " + " | ".join(name + " by epoch" for name, _ in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for (ds, attack, defense), members in sorted(groups.items()):
        cols = []
        for _, key in keys:
            curves = [dict(r.history.get(key, [])) for r in members]
            epochs = sorted(set().union(*curves))
            cols.append(" ".join(f"{np.nanmean([c.get(e, math.nan) for c in curves]):.2f}" for e in epochs) or "-")
        lines.append(f"| {ds} | {attack} | {defense} | {len(members)} | " + " | ".join(cols) + " |")
    return lines if groups else []




# ----------------------------------------------------------------------------------------- tables
def at_last_rematch(result: CellResult) -> CellResult:
    """The cell with its detection and damage figures from the last epoch that re-matched (`compare.at_last_rematch`:
    RoCLIP's final epoch re-matches nothing)."""
    record = compare.at_last_rematch(result.record, lambda run, key: result.history.get(key, []))
    return result if record is result.record else dataclasses.replace(result, record=record)


def read_store(folder: Path, base: Config, variants: Path = VARIANTS
               ) -> tuple[dict[Cell, CellResult], list[tuple[Path, str]]]:
    """(the current cells of the store, keyed by their coordinates; the files left out, each with why): a file is left
    out when its digest is not that of the config the current code builds for its cell, when that config no longer
    builds (a removed variant or key), or when its name is not its cell's."""
    current: dict[Cell, CellResult] = {}
    left_out: list[tuple[Path, str]] = []
    for path in sorted(Path(folder).rglob("*.json")) if Path(folder).is_dir() else []:
        result = read_cell(path)
        cell = cell_of(result)
        try:
            want = cell_config(base, cell, variants)[1]
        except (ConfigError, ValueError) as e:
            left_out.append((path, f"its configuration does not build today ({e})"))
            continue
        if path != cell_path(folder, cell):
            left_out.append((path, f"it records the cell {cell_path(folder, cell).name}"))
        elif result.digest != want:
            left_out.append((path, f"config digest {result.digest}, the current config's is {want}"))
        else:
            current[cell] = at_last_rematch(result)
    return current, left_out


def _row(members: list[CellResult], absent: set[str] = frozenset()) -> list[str]:
    """seeds, mean ± std of each TABLE_METRICS figure ('-' where absent), the commits that measured the cells."""
    row = Row((), len(members), [m.record for m in members],
              {k: [r.record.metrics[k] for r in members if k in r.record.metrics] for _, k in TABLE_METRICS})
    commits = ", ".join(sorted({m.commit for m in members}))
    return [str(len(members))] + ["-" if k in absent else row.cell(k) for _, k in TABLE_METRICS] + [commits]


def _absent(attack: str) -> set[str]:
    """Figures a cell of this attack measures but does not have: the backdoor ASR of a targeted-only attack (the
    rate of triggered images without a backdoor) and the targeted ASR of a backdoor-only one."""
    parts = set(attack.split("+"))
    return ({metric_names.FINAL_BACKDOOR_ASR} if parts == {"targeted"} else set()) | \
        ({metric_names.FINAL_TARGETED_ASR} if attack != "clean" and "targeted" not in parts else set())


def _order(cell: Cell) -> tuple:
    attacks = ["clean", *MATRIX.get(cell.dataset, ())]
    return (cell.dataset, attacks.index(cell.attack) if cell.attack in attacks else len(attacks), cell.attack,
            DEFENSES.index(cell.defense) if cell.defense in DEFENSES else len(DEFENSES), cell.defense)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


METRIC_HEADER = [name for name, _ in TABLE_METRICS] + ["measured by"]


def matrix_table(results: dict[Cell, CellResult], dataset: str) -> list[str]:
    """One row per (attack, defense) of the default configuration on `dataset`, mean ± std over its seeds."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in sorted((c for c in results if c.dataset == dataset and not c.variant), key=_order):
        groups.setdefault((cell.attack, cell.defense), []).append(cell)
    rows = [[attack, defense] + _row([results[c] for c in members], _absent(attack))
            for (attack, defense), members in groups.items()]
    return _table(["attack", "defense", "seeds", *METRIC_HEADER], rows) if rows else []


def _scope(cells_: list[Cell]) -> str:
    """The `run` flags that train exactly these cells' data sets, attacks, defenses and seeds."""
    def join(values, order=()):
        return ",".join(sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v)))
    attacks = [c.attack for c in cells_ if c.attack != "clean"]
    flags = f"--datasets {join(c.dataset for c in cells_)} --attacks {join(attacks) or shlex.quote('')}"
    flags += f" --defenses {join((c.defense for c in cells_ if c.attack != 'clean'), DEFENSES) or 'none'}"
    clean = {c.defense for c in cells_ if c.attack == "clean"}
    all_defenses = {c.defense for c in cells_ if c.attack != "clean"}
    if clean != all_defenses and not any(c.variant for c in cells_):
        flags += f" --clean-defenses {join(clean, DEFENSES) or shlex.quote('')}"
    return flags + f" --seeds {join(str(c.seed) for c in cells_)}"


def run_command(cells_: list[Cell]) -> str:
    """The commands that train (or, when current, reuse) these cells: one per scope, its variants in one list."""
    by_variant: dict[str, list[Cell]] = {}
    for c in cells_:
        by_variant.setdefault(c.variant, []).append(c)
    by_scope: dict[str, list[str]] = {}
    for variant, members in sorted(by_variant.items()):
        by_scope.setdefault(_scope(members), []).append(variant)
    return "\n".join("python benchmarks/defense_bench.py run " + scope +
                     (f" --variants {shlex.quote(','.join(names))}" if any(names) else "")
                     for scope, names in by_scope.items())


def variant_rows(results: dict[Cell, CellResult], names: list[str], variants: Path = VARIANTS) -> list[str]:
    """One row per (variant, data set, attack, defense), mean ± std over its seeds, after the row of the
    configuration it extends on the same seeds (`extended_variant`), where that was measured."""
    groups: dict[tuple[str, str, str, str], list[Cell]] = {}
    for cell in sorted((c for c in results if c.variant in names), key=_order):
        groups.setdefault((cell.variant, cell.dataset, cell.attack, cell.defense), []).append(cell)
    rows, shown = [], set()
    for (variant, ds, attack, defense), members in sorted(groups.items(), key=lambda kv: (names.index(kv[0][0]),
                                                                                          _order(kv[1][0]))):
        base = extended_variant(variant, variants)
        ref = [c for c in (dataclasses.replace(m, variant=base) for m in members) if c in results]
        if ref and (base, ds, attack, defense) not in shown and base not in names:
            rows.append([base or "(default)", "", ds, attack, defense] +
                        _row([results[c] for c in ref], _absent(attack)))
            shown.add((base, ds, attack, defense))
        rows.append([variant, base or "(default)", ds, attack, defense] +
                    _row([results[c] for c in members], _absent(attack)))
    return _table(["variant", "extends", "data", "attack", "defense", "seeds", *METRIC_HEADER], rows) if rows else []


def variant_effects(results: dict[Cell, CellResult], names: list[str], variants: Path = VARIANTS) -> list[str]:
    """One line per variant and (data set, attack, defense): the variant's mean minus that of the configuration it
    extends, on the seeds both have, for zero-shot and the two ASRs; a difference within 2 std is none."""
    lines = []
    for name in names:
        base = extended_variant(name, variants)
        groups: dict[tuple[str, str, str], list[tuple[CellResult, CellResult]]] = {}
        for cell in sorted((c for c in results if c.variant == name), key=_order):
            ref = dataclasses.replace(cell, variant=base)
            if ref in results:
                groups.setdefault((cell.dataset, cell.attack, cell.defense), []).append((results[cell], results[ref]))
        for (ds, attack, defense), pairs in groups.items():
            parts = [f"{label} " + significance([v.record.metrics.get(k, math.nan) for v, _ in pairs],
                                                [r.record.metrics.get(k, math.nan) for _, r in pairs])
                     for label, k in EFFECT_METRICS if k not in _absent(attack)]
            lines.append(f"- {name} vs {base or 'the default'} ({ds} / {attack} / {defense}, {len(pairs)} "
                         f"seed{'s' * (len(pairs) > 1)}): " + "; ".join(parts))
    return lines


def learnt_lines(results: dict[Cell, CellResult], names: list[str]) -> list[str]:
    """One line per stress variant and (data set, attack): whether `none` learnt the attack, by the mean over its
    seeds: backdoor ASR >= TARGETS no_defense_asr for an attack with a backdoor, targeted ASR above the defense's
    target (TARGETS targeted_asr) for a targeted-only one. Where it did not, the defenses' ASRs of that row measure
    nothing: an attack no model learns is no defense's success."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for cell in sorted((c for c in results if c.variant in names and c.defense == "none"), key=_order):
        backdoor = any(p != "targeted" for p in cell.parts)
        key = metric_names.FINAL_BACKDOOR_ASR if backdoor else metric_names.FINAL_TARGETED_ASR
        value = results[cell].record.metrics.get(key, math.nan)
        if not math.isnan(value):
            groups.setdefault((cell.variant, cell.dataset, cell.attack), []).append(value)
    lines = []
    for (name, ds, attack), v in groups.items():
        backdoor = any(p != "targeted" for p in attack.split("+"))
        label = "backdoor ASR" if backdoor else "targeted ASR"
        learnt = np.mean(v) >= TARGETS["no_defense_asr"] if backdoor else np.mean(v) > TARGETS["targeted_asr"]
        bar = f"< {TARGETS['no_defense_asr']:.2f}" if backdoor else f"<= {TARGETS['targeted_asr']:.4f}, the target"
        lines.append(f"- {name} ({ds} / {attack}): `none` " + (f"learnt it ({label} {_stat(v)})" if learnt else
                     f"did **not** learn it ({label} {_stat(v)} {bar}): the defenses' {label}s of this row measure "
                     "nothing"))
    return lines


def _stat(values: list[float]) -> str:
    """mean ± std as every table of the report shows it (`Row.cell`), and over how many seeds."""
    return Row((), len(values), [], {"v": values}).cell("v") + f" over {len(values)} seed{'s' * (len(values) > 1)}"


def _epoch_means(members: list[CellResult], key: str) -> str:
    """The mean over `members` of a per-epoch curve, one figure per epoch ('-' when no member has it)."""
    curves = [dict(r.history.get(key, [])) for r in members]
    epochs = sorted(set().union(*curves))
    return " ".join(f"{np.nanmean([c.get(e, math.nan) for c in curves]):.3f}" for e in epochs) or "-"


def seeds_table(results: dict[Cell, CellResult], seeds: set[int]) -> list[str]:
    """One row per (data set, attack, defense, variant) among the cells of `seeds`: the seeds it has, mean ± std of
    every TABLE_METRICS figure and of the final flagged share, the mean backdoor ASR per epoch, and the commits; for
    a store without a report of its own (the literature benchmark's, `table` command)."""
    groups: dict[tuple[str, str, str, str], list[Cell]] = {}
    for cell in sorted((c for c in results if c.seed in seeds), key=lambda c: (_order(c), c.variant, c.seed)):
        groups.setdefault((cell.dataset, cell.attack, cell.defense, cell.variant), []).append(cell)
    rows = []
    for (dataset, attack, defense, variant), members in groups.items():
        found = [results[c] for c in members]
        count, *figures, commits = _row(found, _absent(attack))
        flagged = Row((), len(found), [], {"f": [r.record.metrics[metric_names.REMATCH_FLAG_RATE] for r in found
                                               if metric_names.REMATCH_FLAG_RATE in r.record.metrics]}).cell("f")
        rows.append([dataset, attack, defense, variant or "(default)", ",".join(str(c.seed) for c in members),
                     *figures, flagged, _epoch_means(found, metric_names.EVAL_BACKDOOR_ASR), commits])
    header = ["data", "attack", "defense", "variant", "seeds", *METRIC_HEADER[:-1], "flagged",
              "backdoor ASR by epoch (mean)", "measured by"]
    return _table(header, rows) if rows else []


REPORT_COMMAND = "python benchmarks/defense_bench.py report"
SECTIONS = ("matrix", "ablations", "stress", "detection", "targets", "left_out")
GENERATED = ("<!-- Generated by `python benchmarks/defense_bench.py report` from benchmarks/results_template.md and "
             "the cell files; edit those, not this file. -->\n")
PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def _block(command: str, lines: list[str]) -> list[str]:
    """A table (or list) with the command that measured it beside it."""
    return ["```bash", command, "```", "", *lines, ""]


def sections(results: dict[Cell, CellResult], left_out: list[tuple[Path, str]], plots: Path | None, out: Path,
             variants: Path = VARIANTS) -> dict[str, str]:
    """The generated parts of docs/results.md, by placeholder name."""
    plain = {c: r for c, r in results.items() if not c.variant}
    matrix: list[str] = []
    for ds in sorted({c.dataset for c in plain}, key=lambda d: (DATASETS.index(d) if d in DATASETS else 9, d)):
        mine = sorted((c for c in plain if c.dataset == ds), key=_order)
        matrix += [f"### {ds}", ""] + _block(run_command(mine), matrix_table(plain, ds))
        for attack in sorted({c.attack for c in mine if c.attack != "clean"}) if plots is not None else ():
            group = [c for c in mine if c.attack in (attack, "clean")]
            paths = plot_compare(compare.group_runs([plain[c].record for c in group]),
                                 lambda run, key: _history(plain, run).get(key, []), plots / ds / attack)
            matrix += [f"{attack} (dashed: the clean reference): " + " ".join(
                f"![{ds} {attack} {p.stem}]({os.path.relpath(p, out.parent)})" for p in paths), ""]
    names = [n for n in known_variants(variants) if any(c.variant == n for c in results)]
    out_sections = {"matrix": "\n".join(matrix).strip() or "(no cells of the default configuration)"}
    for key, picked in (("ablations", [n for n in names if not is_stress(n, variants)]),
                        ("stress", [n for n in names if is_stress(n, variants)])):
        if not picked:
            out_sections[key] = "(no cells)"
            continue
        mine = [c for c in results if c.variant in picked]
        described = [f"- `{n}`: {variant_description(n, variants)}" for n in picked]
        table = variant_rows(results, picked, variants)
        out_sections[key] = "\n".join(described + [""] + _block(run_command(mine), table)
                                      + ["Each variant minus the configuration it extends, same seeds (a difference "
                                         "within 2 std of the seeds' spread is none):", ""]
                                      + (variant_effects(results, picked, variants) or
                                         ["(none: no cells of the configurations they extend)"])
                                      + ((["", "Whether the attack was learnt at all:", ""] + learnt)
                                         if key == "stress" and (learnt := learnt_lines(results, picked)) else [])
                                      ).strip()
    detection = detection_lines({c: r for c, r in plain.items()})
    out_sections["detection"] = "\n".join(_block(run_command(list(plain)), detection)).strip() if detection else \
        "(no re-matching cells)"
    values: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for cell, r in plain.items():
        slot = values.setdefault((cell.dataset, cell.attack, cell.defense), {})
        for k, v in r.record.metrics.items():
            slot.setdefault(k, []).append(v)
    datasets = [d for d in DATASETS if d in {c.dataset for c in plain} | set(MATRIX)]
    attacks = list(dict.fromkeys([a for d in datasets for a in MATRIX.get(d, ())] +
                                 sorted({c.attack for c in plain if c.attack != "clean"})))
    out_sections["targets"] = "\n".join(target_lines(values, datasets, attacks)) or "(no matrix rows)"
    out_sections["left_out"] = "\n".join(f"- `{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}`: {why}"
                                         for p, why in left_out) or "None: every cell file is current."
    return out_sections


def _history(results: dict[Cell, CellResult], run: RunRecord) -> dict:
    return next(r.history for r in results.values() if r.record.run_id == run.run_id)


def figure(results: dict[Cell, CellResult], spec: str, variants: Path = VARIANTS) -> str:
    """A template's `fig DATASET ATTACK DEFENSE VARIANT METRIC` (mean ± std over the seeds; VARIANT `-` = the
    default) or `diff ...` (the variant minus the configuration it extends, `significance`)."""
    words = spec.split()
    if len(words) != 6 or words[0] not in ("fig", "diff"):
        raise ValueError(f"template placeholder {{{{ {spec} }}}}: expected a section ({', '.join(SECTIONS)}), "
                         "`fig DATASET ATTACK DEFENSE VARIANT METRIC` or `diff ...` with the same fields")
    kind, ds, attack, defense, variant, metric = words
    variant = "" if variant == "-" else variant
    members = {c: r for c, r in results.items() if (c.dataset, c.attack, c.defense, c.variant) ==
               (ds, attack, defense, variant) and metric in r.record.metrics}
    if not members:
        raise ValueError(f"template placeholder {{{{ {spec} }}}}: no current cell has that figure")
    if kind == "fig":
        return Row((), len(members), [], {metric: [r.record.metrics[metric] for r in members.values()]}).cell(metric)
    if not variant:
        raise ValueError(f"template placeholder {{{{ {spec} }}}}: `diff` compares a variant with what it extends")
    base = extended_variant(variant, variants)
    pairs = [(r, results[ref]) for c, r in members.items()
             if (ref := dataclasses.replace(c, variant=base)) in results and metric in results[ref].record.metrics]
    return significance([v.record.metrics[metric] for v, _ in pairs], [r.record.metrics[metric] for _, r in pairs])


def fill(template: str, parts: dict[str, str], results: dict[Cell, CellResult], variants: Path = VARIANTS) -> str:
    """The template with each `{{ section }}` and `{{ fig ... }}` / `{{ diff ... }}` filled; ValueError when a
    section is missing or repeated (a table left out silently) or a placeholder names no figure."""
    template = re.sub(r"<!--.*?-->\n?", "", template, flags=re.S)      # the template's notes to its editors
    found = [m.group(1) for m in PLACEHOLDER.finditer(template)]
    for name in SECTIONS:
        if found.count(name) != 1:
            raise ValueError(f"results template: `{{{{ {name} }}}}` must appear once (found {found.count(name)})")
    values = {"archive_tag": ARCHIVE_TAG, "report_command": REPORT_COMMAND}
    return GENERATED + PLACEHOLDER.sub(lambda m: parts.get(m.group(1)) or values.get(m.group(1)) or
                           figure(results, m.group(1), variants), template)


def report(base: Config, cells_dir: Path = CELLS, template: Path = TEMPLATE, out: Path = RESULTS,
           plots: Path | None = None, variants: Path = VARIANTS) -> tuple[str, list[tuple[Path, str]]]:
    """Rebuild `out` (and its plots, default: <out stem>-plots beside it) from the cell files alone; returns (the
    text, the files left out)."""
    plots = Path(out).parent / f"{Path(out).stem}-plots" if plots is None else plots
    results, left_out = read_store(cells_dir, base, variants)
    text = fill(Path(template).read_text(), sections(results, left_out, plots, Path(out), variants), results, variants)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return text, left_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="rebuild docs/results.md and its plots from the cell files (trains nothing)")
    run = sub.add_parser("run", help="train the cells that have no current file, then rebuild the report")
    tab = sub.add_parser("table", help="print one row per configuration of a store, mean ± std over --seeds "
                         "(trains nothing; e.g. the literature benchmark's store)")
    for p in (rep, run, tab):
        p.add_argument("--cells", default=str(CELLS), help="folder of the cell files (default: %(default)s)")
    for p in (rep, run):
        p.add_argument("--output", default=str(RESULTS), help="the report written (default: %(default)s)")
        p.add_argument("--template", default=str(TEMPLATE), help="its hand-written part (default: %(default)s)")
    tab.add_argument("--seeds", default="0,1,2", help="comma list: the seeds averaged (default: %(default)s, the "
                     "report seeds; 3 is the validation seed)")
    run.add_argument("--datasets", default=",".join(DATASETS), help="comma list (default: %(default)s)")
    run.add_argument("--attacks", default=",".join(ATTACKS), help="comma list of patch|blended|sig|targeted|A+B, "
                     f"or the literature's {'|'.join(LITERATURE_ATTACKS)}; clean: the clean reference, also of a "
                     "variant ('' = only the clean references; default: %(default)s)")
    run.add_argument("--defenses", default=",".join(DEFENSES), help="comma list (default: %(default)s)")
    run.add_argument("--seeds", default="0,1,2", help="comma list (default: %(default)s)")
    run.add_argument("--clean-defenses", help="defenses of the clean references (default: --defenses; '' = none)")
    run.add_argument("--variants", default="", help="comma list of benchmarks/variants/*.yaml names (or A+B: both "
                     "files' overrides): train those variants of the cells instead of the default configuration (no "
                     "clean references)")
    run.add_argument("--out-dir", default=str(ROOT / "runs" / "defense-bench"), help="runs, data and MLflow store")
    for p in (run, tab):
        p.add_argument("--base", default=str(BASE), help="the cells' base config (default: %(default)s; the "
                       f"literature's scale: {LITERATURE_BASE.relative_to(ROOT)})")
    run.add_argument("--no-report", action="store_true", help="write the cell files only (a store other than "
                     "docs/results.md's: e.g. benchmarks/validation_table.py reads it)")
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command != "run":
        parser.error(f"{args.command} takes no config overrides: {overrides}")
    out_dir = getattr(args, "out_dir", ROOT / "runs" / "defense-bench")
    base = load_config(getattr(args, "base", BASE), [f"output_dir={out_dir}", f"tracking.experiment={EXPERIMENT}"])
    if args.command == "table":
        results, left_out = read_store(Path(args.cells), base)
        lines = seeds_table(results, {int(s) for s in args.seeds.split(",") if s})
        print("\n".join(lines) if lines else f"no current cell of seeds {args.seeds} under {args.cells}", flush=True)
        for path, why in left_out:
            print(f"left out {path}: {why}", flush=True)
        return 0
    if args.command == "run":
        if overrides:            # a changed setting is a variant: a file under benchmarks/variants, named in the cells
            parser.error(f"unknown arguments {overrides}: put config overrides in a benchmarks/variants/*.yaml file "
                         "and pass --variants NAME")
        attacks = [a for a in args.attacks.split(",") if a]
        for a in attacks:
            if a != "clean" and any(p not in ATTACK_OVERRIDES for p in a.split("+")):
                parser.error(f"unknown attack {a!r}; use {', '.join(ATTACK_OVERRIDES)} or A+B")
        variants = [v for v in args.variants.split(",") if v]
        unknown = [v for v in variants if any(part not in known_variants() for part in v.split("+"))]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; known: {', '.join(known_variants())}".replace("%", "%%"))
        todo = cells(args.datasets.split(","), attacks, args.defenses.split(","),
                     [int(s) for s in args.seeds.split(",")], variants,
                     [d for d in args.clean_defenses.split(",") if d] if args.clean_defenses is not None else None)
        run_cells(base, todo, Path(args.cells))
        if args.no_report:
            print(f"wrote the cell files under {args.cells}", flush=True)
            return 0
    try:
        _, left_out = report(base, Path(args.cells), Path(args.template), Path(args.output))
    except ValueError as e:               # a template placeholder without a figure, a cell file that is no cell file
        done = "the cell files are written, but " if args.command == "run" else ""
        print(f"error: {done}{args.output} was not rebuilt: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} from the cell files under {args.cells}", flush=True)
    for path, why in left_out:
        print(f"left out {path}: {why}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
