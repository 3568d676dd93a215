"""Defense benchmark: defenses x attacks x data sets x seeds, plus a clean reference, against the targets of
the defense issue; writes benchmarks/results/defense.md.

    .venv/bin/python benchmarks/defense_bench.py                                   # the full matrix (days on 2 cores)
    .venv/bin/python benchmarks/defense_bench.py --datasets fashion --seeds 0 \\
        --attacks patch+targeted,blended                                           # what a 2-core session affords
    .venv/bin/python benchmarks/defense_bench.py ... model.arch=otc-fast-vit-32 \\
        --cells benchmarks/results/cells-fast --output benchmarks/results/defense-fast.md
        # trailing key=value pairs override the config: here the fast experiment model (3.5x fewer FLOPs per sample,
        # benchmarks/results/fast_model.md), with cell files of its own (a cell file is named by data set, attack,
        # defense and seed, so the tiny model's folder would have its cells replaced)

Every cell is one `otc-ray train` run (jobs/configs/defense-bench.yaml plus the cell's overrides) in the MLflow
experiment `otc-ray-defense-bench` under --out-dir. A finished cell is written to its own small file under --cells
(benchmarks/results/cells/<data set>/<attack>-<defense>-s<seed>.json: the commit, the config digest, the final
metrics and the per-epoch curves, `otc_ray.track.cells`); a rerun reuses every cell whose file has the current
digest and trains the others, so the matrix can be completed over several sittings or on another machine (copy the
files back), and the tables and plots are rebuilt from the files alone (`--report-only`). An interrupted run
resumes from its last checkpoint (its run name carries the digest). Attacks:

    patch     backdoor, 4x4 noise patch, 100 pairs (2%), captions of the target class
    blended   backdoor, full-image noise blended at alpha 0.3, same count (at 0.2 the 5-epoch model learns nothing)
    sig       backdoor, a sinusoidal signal over the whole image (SIG), amplitude 80, same count (at the
              literature's 20, or 40, not learnt at this size: benchmarks/results/attack_sizing.md)
    targeted  T test images x K copies captioned with the adversarial class
    A+B       both attacks in one run on the same data (one training per defense instead of two)

`--ablations a,b|all` adds otcclip cells on fashion patch+targeted with one part of OTCCLIP changed (ABLATIONS:
cosine-only caption choice, the neighbour vote, no L_inter / L_intra / either, one gate signal, the gate without its
OT signal, drop, no witness, OT losses without re-matching, every image re-matched, the gate without trigger
propagation), every seed; `--stress a,b|all` adds harder attacks (STRESS), the first seed, for every defense asked
for; each gets its own table. The clean references train each defense (or those of `--clean-defenses`) on the
unpoisoned data of each data set and seed: `none` is the reference of the targets, the others show what a defense
costs when there is nothing to find. Figures per cell are the final model's (zero-shot, linear probe, ASRs) and
the re-matching of the last epoch that re-matched (detection P/R, damage; RoCLIP re-matches every K epochs) as rank 0
saw its shard. Targets are checked on the means over seeds; a missed target is reported as missed.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from otc_ray.track import compare  # noqa: E402
from otc_ray.track import metric_names as N  # noqa: E402
from otc_ray.track.cells import CellResult, cell_from_run, read_cell, write_cell  # noqa: E402
from otc_ray.track.compare import Row, group_runs, render  # noqa: E402
from otc_ray.track.mlflow_logger import training_digest  # noqa: E402
from otc_ray.track.plots import plot_compare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "jobs" / "configs" / "defense-bench.yaml"
EXPERIMENT = "otc-ray-defense-bench"
DEFENSES = ("none", "roclip", "safeclip", "otcclip")
ATTACKS = ("patch", "blended", "sig", "targeted")
DATASETS = ("fashion", "shapes")
# the matrix the targets are set for (the defense issue): each of its rows is listed under Targets, run or not; a row
# outside it is listed only when it has cells
MATRIX = {"fashion": ("patch+targeted", "blended", "sig"), "shapes": ("patch+targeted",)}
ATTACK_OVERRIDES = {
    "patch": {"poison.trigger": "patch"},
    "blended": {"poison.trigger": "blended", "poison.blend_alpha": 0.3},   # at 0.2 `none` learnt nothing (0.053)
    "sig": {"poison.trigger": "sig", "poison.sig_delta": 80.0},            # at 20-40 `none` learnt nothing (<= 0.08)
    "targeted": {},
}
# the target class and adversarial class of each data set (class names of otc_ray/data/classes/*.json)
CLASS_OVERRIDES = {
    "fashion": {"poison.target": "sneaker", "poison.adversarial": "bag"},
    "shapes": {"poison.target": "circle", "poison.adversarial": "square"},
}
# what each part of OTCCLIP buys: otcclip cells on fashion patch+targeted, every seed, with one part changed
ABLATIONS = {
    "cosine-only": {"rematch.alpha": 1.0},                     # the new caption by global cosine, no OT
    "vote": {"rematch.replace": "vote"},                       # the nearest trusted neighbour's caption
    "no-inter": {"train.lambda_inter": 0.0},
    "no-intra": {"train.lambda_intra": 0.0},
    "no-ot-losses": {"train.lambda_inter": 0.0, "train.lambda_intra": 0.0},   # re-matching alone, CLIP loss only
    "gate-cosine": {"rematch.gate_signals": ("cosine",)},
    "gate-agreement": {"rematch.gate_signals": ("agreement",)},
    "gate-concentration": {"rematch.gate_signals": ("concentration",)},
    "no-concentration": {"rematch.gate_signals": ("cosine", "agreement")},   # the gate without its OT signal
    # the OT signal with caption agreement over pixel-signature neighbours, a graph the poisoned model cannot shape
    # (threshold from benchmarks/gate_signals.py on seed 0's data)
    "gate-pixel": {"rematch.gate_signals": ("concentration", "pixel_agreement"), "rematch.gate_threshold": -2.5},
    "drop": {"rematch.action": "drop"},
    "no-witness": {"rematch.witness": False},                  # the warm-up model keeps training
    "ot-losses-only": {"rematch.method": "none"},              # L_inter + L_intra, no re-matching
    "rematch-all": {"rematch.gate": "none"},                   # the abstract's literal form: every image re-matched
    # earlier defaults (SETTINGS), newest first, each restoring all that changed since: an ablation that ran under
    # one is compared with its row
    "no-propagate": {"rematch.propagate": False},              # the gate alone: no trigger propagation
    "reference-64": {"rematch.gate_reference": 64, "rematch.propagate": False},   # and the former calibration reference
}
ABLATION_CELL = ("fashion", "patch+targeted")
# harder attacks, one seed each, for every defense asked for: (attack label, overrides)
STRESS = {
    "random-patch": ("patch", {"poison.trigger_location": "random"}),
    "label-consistent": ("patch", {"poison.label_consistent": True}),
    "data-captions": ("targeted", {"poison.caption_source": "data"}),
    "jittered-copies": ("targeted", {"poison.copy_jitter": 3}),
    "rate-0.1%": ("patch", {"poison.rate": 0.001}),
    "rate-5%": ("patch", {"poison.rate": 0.05}),
}
VARIANTS = {**ABLATIONS, **{k: v for k, (_, v) in STRESS.items()}}
TARGETS = {"no_defense_asr": 0.90, "otcclip_asr": 0.05, "targeted_asr": 1 / 16, "zeroshot_gap": 0.02,
           "over_baselines": 0.02, "recall": 0.95, "precision": 0.80, "damage": 0.02}
BASELINES = ("roclip", "safeclip")


@dataclass(frozen=True)
class Cell:
    dataset: str
    attack: str          # "clean", one of ATTACKS, or "a+b"
    defense: str
    seed: int
    variant: str = ""    # a name of ABLATIONS or STRESS ("" = the configuration as it is)

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
        if not parts:           # the clean reference scores the targets an attack would pick: the rate without poison
            out["eval.targeted_base_rate"] = True
        for p in backdoors:
            out |= ATTACK_OVERRIDES[p]
        if self.variant:
            out |= VARIANTS[self.variant]
        return out

    @property
    def label(self) -> str:
        """The file and run name part: attack-defense[-variant]."""
        return f"{self.attack}-{self.defense}" + (f"-{self.variant}" if self.variant else "")


def cells(datasets, attacks, defenses, seeds, ablations=(), stress=(), clean_defenses=None) -> list[Cell]:
    """The matrix (per data set and seed: the clean references, no poison, of `clean_defenses` (default: every
    defense; `none` is the reference the targets compare with), then attacks x defenses), the ablation cells
    (otcclip on ABLATION_CELL, every seed) and the stress cells (every defense, the first seed)."""
    out = []
    for dataset in datasets:
        for seed in seeds:
            out += [Cell(dataset, "clean", d, seed) for d in (defenses if clean_defenses is None else clean_defenses)]
            out += [Cell(dataset, attack, defense, seed) for attack in attacks for defense in defenses]
    dataset, attack = ABLATION_CELL
    out += [Cell(dataset, attack, "otcclip", seed, name) for name in ablations for seed in seeds]
    out += [Cell(dataset, STRESS[name][0], defense, seeds[0], name) for name in stress for dataset in datasets
            for defense in defenses]
    return out


def cell_config(base: Config, cell: Cell) -> tuple[Config, str]:
    """(the cell's config, its digest): base plus the cell's overrides, named after the cell and the digest."""
    cfg = replace(base, **{k.replace(".", "__"): v for k, v in cell.overrides().items()})
    digest = training_digest(cfg)
    return replace(cfg, name=f"bench-{cell.dataset}-{cell.label}-s{cell.seed}-{digest}"), digest


def cell_path(folder: Path, cell: Cell) -> Path:
    return folder / cell.dataset / f"{cell.label}-s{cell.seed}.json"


# earlier default settings, each an ablation that restores it, with the defenses that never read its keys: a cell of
# such a defense recorded under it trains exactly as it would today, so it stays current
# (roclip and safeclip run their own re-match stage: neither reads the gate's reference nor propagates)
SETTINGS = {"no-propagate": ("none", "roclip", "safeclip"), "reference-64": ("none", "roclip", "safeclip")}


def settings_of(base: Config, cell: Cell, result: CellResult) -> str | None:
    """Under which settings the cell file's run trained: "" today's, a name of SETTINGS an earlier default's (the one
    whose overrides, added to the cell's, reproduce its digest), None neither."""
    if result.digest == cell_config(base, cell)[1]:
        return ""
    if cell.variant in SETTINGS:
        return None
    for name in SETTINGS:
        cfg = replace(base, **{k.replace(".", "__"): v for k, v in {**cell.overrides(), **VARIANTS[name]}.items()})
        if training_digest(cfg) == result.digest:
            return name
    return None


def recorded_cell(folder: Path, base: Config, cell: Cell) -> tuple[CellResult, str] | None:
    """(the cell's file, `settings_of` it) when it exists and ran under today's or an earlier default's settings."""
    path = cell_path(folder, cell)
    if not path.exists():
        return None
    done = read_cell(path)
    setting = settings_of(base, cell, done)
    return None if setting is None else (done, setting)


def current_cell(folder: Path, base: Config, cell: Cell) -> CellResult | None:
    """The cell's file when it holds a result of the current settings (or of an earlier default its defense never
    reads), else None."""
    found = recorded_cell(folder, base, cell)
    if found is None:
        return None
    done, setting = found
    return done if setting == "" or cell.defense in SETTINGS[setting] else None


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
        print(f"    zero-shot {m.get(N.FINAL_ZEROSHOT_TOP1, math.nan):.3f}  backdoor ASR "
              f"{m.get(N.FINAL_BACKDOOR_ASR, math.nan):.3f}  targeted ASR {m.get(N.FINAL_TARGETED_ASR, math.nan):.3f}"
              f"  ({durations[-1] / 60:.1f} min)", flush=True)


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
        clean = _mean(values, ds, "clean", "none", N.FINAL_ZEROSHOT_TOP1)
        for attack in attacks:
            if not any(key[:2] == (ds, attack) for key in values):
                if attack in MATRIX.get(ds, ()):
                    lines.append(f"- {ds} / {attack}: not run yet (no cell files)")
                continue
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
                lines.append(f"- {ds} / {attack}: OTCCLIP targeted ASR {tasr:.3f} (target <= {t['targeted_asr']:.4f}): "
                             f"{_verdict(None if math.isnan(tasr) else tasr <= t['targeted_asr'] + 1e-9)}")
            zs = m("otcclip", N.FINAL_ZEROSHOT_TOP1)
            lines.append(f"- {ds} / {attack}: OTCCLIP zero-shot {zs:.3f} vs clean {clean:.3f} (within "
                         f"{t['zeroshot_gap']}): {_verdict(None if math.isnan(zs + clean) else zs >= clean - t['zeroshot_gap'])}")
            for baseline in BASELINES:
                bz, basr = m(baseline, N.FINAL_ZEROSHOT_TOP1), m(baseline, N.FINAL_BACKDOOR_ASR)
                if math.isnan(bz + zs):
                    continue
                stops = parts == ["targeted"] or basr <= t["otcclip_asr"]
                diff = significance(values.get((ds, attack, "otcclip"), {}).get(N.FINAL_ZEROSHOT_TOP1, []),
                                    values.get((ds, attack, baseline), {}).get(N.FINAL_ZEROSHOT_TOP1, []))
                verdict = _verdict(zs >= bz + t["over_baselines"]) if stops else "n/a (it does not stop the attack)"
                lines.append(f"- {ds} / {attack}: OTCCLIP zero-shot {zs:.3f} vs {baseline} {bz:.3f} (>= "
                             f"+{t['over_baselines']} where it stops the attack; {diff}): {verdict}")
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


def detection_lines(results: dict[Cell, CellResult]) -> list[str]:
    """Per-epoch recall of the gate's new flags (backdoor, targeted) and their precision, mean over seeds, for each
    (data set, attack) group of re-matching cells."""
    keys = (("backdoor recall", N.rematch_gate("recall_backdoor")), ("targeted recall", N.rematch_gate("recall_targeted")),
            ("precision", N.rematch_gate("precision")))
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


VARIANT_METRICS = (("zero-shot", N.FINAL_ZEROSHOT_TOP1), ("backdoor ASR", N.FINAL_BACKDOOR_ASR),
                   ("targeted ASR", N.FINAL_TARGETED_ASR), ("det P", N.REMATCH_DETECT_PRECISION),
                   ("det R", N.REMATCH_DETECT_RECALL), ("damage", N.REMATCH_DAMAGE))


def variant_table(results: dict[Cell, CellResult], names, reference: dict[Cell, CellResult]) -> list[str]:
    """One row per (variant, data set, attack, defense), mean ± std over its seeds; the unchanged configuration's
    cells of the same groups first (variant "-"), from `reference`."""
    groups: dict[tuple[str, str, str, str], list[CellResult]] = {}
    for cell, r in results.items():
        if cell.variant in names:
            groups.setdefault((cell.variant, cell.dataset, cell.attack, cell.defense), []).append(r)
    for cell, r in reference.items():
        if any(k[1:] == (cell.dataset, cell.attack, cell.defense) for k in groups):
            groups.setdefault(("-", cell.dataset, cell.attack, cell.defense), []).append(r)
    header = ["variant", "data", "attack", "defense", "seeds"] + [name for name, _ in VARIANT_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {"-": -1, **{n: i for i, n in enumerate(names)}}
    for key in sorted(groups, key=lambda k: (order.get(k[0], 99), k[1:])):
        members = groups[key]
        row = Row(key, len(members), [m.record for m in members],
                  {m: [r.record.metrics[m] for r in members if m in r.record.metrics] for _, m in VARIANT_METRICS})
        # an ASR of an attack the cell does not carry (the triggered images of a targeted-only attack) is no figure
        absent = {N.FINAL_BACKDOOR_ASR} if key[2] == "targeted" else set()
        lines.append("| " + " | ".join([*key, str(len(members))] + ["-" if m in absent else row.cell(m)
                                                                     for _, m in VARIANT_METRICS]) + " |")
    return lines if len(groups) > 0 else []


EFFECT_METRICS = VARIANT_METRICS[:3]       # zero-shot and the two ASRs


def compared_with(base: Config, cell: Cell, result: CellResult) -> str:
    """The variant a variant cell is compared with ("" = today's otcclip): for an earlier default (SETTINGS, newest
    first), the default that followed it; for any other, the settings it ran under (`settings_of`)."""
    if cell.variant in SETTINGS:
        newer = ["", *SETTINGS]
        return newer[newer.index(cell.variant) - 1]
    return settings_of(base, cell, result) or ""


def variant_effects(results: dict[Cell, CellResult], names, reference: dict[Cell, CellResult],
                    base: Config | None = None) -> list[str]:
    """One line per variant: what changing that part does to zero-shot and the two ASRs, the variant's mean minus the
    unchanged configuration's (same data set, attack, defense, seeds; `compared_with`), a difference within 2 std
    reported as none."""
    lines = []
    for name in names:
        mine = {c: r for c, r in results.items() if c.variant == name}
        against = {c: dataclasses.replace(c, variant=compared_with(base, c, r) if base else "") for c, r in mine.items()}
        pairs = [(r, reference[against[c]]) for c, r in mine.items() if against[c] in reference]
        if not pairs:
            lines += [f"- {name}: no unchanged cells of its seeds to compare with"] if mine else []
            continue
        settings = sorted({against[c].variant for c in mine if against[c] in reference})
        versus = " / ".join(f"otcclip {v}" if v else "otcclip" for v in settings)
        parts = []
        for label, metric in EFFECT_METRICS:
            got = [v.record.metrics.get(metric, math.nan) for v, _ in pairs]
            ref = [r.record.metrics.get(metric, math.nan) for _, r in pairs]
            parts.append(f"{label} {significance(got, ref)}")
        lines.append(f"- {name} ({len(pairs)} seed{'s' * (len(pairs) > 1)}) vs {versus}: " + "; ".join(parts))
    return lines


def at_last_rematch(result: CellResult) -> CellResult:
    """The cell with its detection and damage figures from the last epoch that re-matched (`compare.at_last_rematch`:
    RoCLIP's final epoch re-matches nothing)."""
    record = compare.at_last_rematch(result.record, lambda run, key: result.history.get(key, []))
    return result if record is result.record else dataclasses.replace(result, record=record)


def report(results: dict[Cell, CellResult], datasets, attacks, command: str, plots: Path | None = None,
           base: Config | None = None) -> str:
    """The markdown report of the cells; `base` (the benchmark's config) lets each ablation be compared with the
    otcclip cells of the settings it ran under (`settings_of`)."""
    results = {c: at_last_rematch(r) for c, r in results.items()}
    variants = {c: r for c, r in results.items() if c.variant}
    results = {c: r for c, r in results.items() if not c.variant}
    values: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for cell, r in results.items():
        slot = values.setdefault((cell.dataset, cell.attack, cell.defense), {})
        for k, v in r.record.metrics.items():
            slot.setdefault(k, []).append(v)
    commits = sorted({r.commit for r in results.values()})
    out = [f"# Defense benchmark\n",
           f"Command: `{command}`  ",
           f"Machine: {machine()}  ",
           f"Built {datetime.date.today()} from {len(results)} cell files (commits {', '.join(commits) or '-'}).\n",
           "Every row is one (data set, defense, attack, trigger, poison) group; `seeds` runs each, mean ± std.",
           "Zero-shot and linear probe on the clean test split; ASRs on triggered / target test images; detection and",
           "damage from the last epoch that re-matched (roclip: every 2nd epoch); samples/s of the training worker.\n"]
    history = {r.record.run_id: r.history for r in results.values()}
    for ds in datasets:
        rows = sorted(group_runs([r.record for c, r in results.items() if c.dataset == ds]),
                      key=lambda row: (row.group[3], row.group[2], row.group[1]))   # by trigger, attack, defense
        if not rows:
            continue
        out += [f"## {ds}\n", render(rows, "markdown"), ""]
        if plots is None:
            continue
        clean = [r.record for c, r in results.items() if c.dataset == ds and c.attack == "clean"]
        for attack in sorted({c.attack for c in results if c.dataset == ds and c.attack != "clean"}):
            runs = [r.record for c, r in results.items() if (c.dataset, c.attack) == (ds, attack)] + clean
            paths = plot_compare(group_runs(runs), lambda run, key: history[run.run_id].get(key, []),
                                 plots / ds / attack)
            out += [f"{attack} (with the clean reference): " +
                    " ".join(f"![{attack} {p.stem}]({os.path.relpath(p, plots.parent)})" for p in paths), ""]
    detection = detection_lines(results)
    if detection:
        out += ["## Detection per epoch (the gate's new flags)\n"] + detection + [""]
    ablations = variant_table(variants, list(ABLATIONS), results)
    if ablations:
        out += [f"## Ablations (otcclip, {' / '.join(ABLATION_CELL)}): what each part buys\n"] + ablations + [""]
        out += ["Each variant minus the unchanged otcclip on the same seeds (mean; a difference within 2 std of the "
                "seeds' spread is none):\n"]
        out += variant_effects(variants, list(ABLATIONS), {**results, **variants}, base) + [""]
    stress = variant_table(variants, list(STRESS), {})
    if stress:
        out += ["## Stress attacks (one seed each)\n"] + stress + [""]
    out += ["## Targets\n"] + target_lines(values, datasets, attacks) + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma list of patch|blended|sig|targeted|A+B "
                        "('' = only the clean references)")
    parser.add_argument("--defenses", default=",".join(DEFENSES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clean-defenses", help="defenses of the clean references (default: --defenses; '' = none)")
    parser.add_argument("--ablations", default="", help=f"comma list of {', '.join(ABLATIONS)}, or all".replace("%", "%%"))
    parser.add_argument("--stress", default="", help=f"comma list of {', '.join(STRESS)}, or all".replace("%", "%%"))
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "defense-bench"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "defense.md"))
    parser.add_argument("--cells", default=str(ROOT / "benchmarks" / "results" / "cells"),
                        help="folder of the per-cell result files (read and written)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rebuild the tables from the cell files that hold current settings")
    args, overrides = parser.parse_known_args(argv)
    datasets, attacks = args.datasets.split(","), [a for a in args.attacks.split(",") if a]   # '' = clean refs only
    for a in attacks:
        if any(p not in ATTACKS for p in a.split("+")):
            parser.error(f"unknown attack {a!r}; use {', '.join(ATTACKS)} or A+B")
    base = load_config(BASE, [f"output_dir={args.out_dir}", f"tracking.experiment={EXPERIMENT}", *overrides])
    picked = {}
    for flag, known in (("ablations", ABLATIONS), ("stress", STRESS)):
        names = list(known) if getattr(args, flag) == "all" else [n for n in getattr(args, flag).split(",") if n]
        if any(n not in known for n in names):
            parser.error(f"--{flag}: unknown {[n for n in names if n not in known]}; known: {', '.join(known)}")
        picked[flag] = names
    todo = cells(datasets, attacks, args.defenses.split(","), [int(s) for s in args.seeds.split(",")],
                 picked["ablations"], picked["stress"],
                 [d for d in args.clean_defenses.split(",") if d] if args.clean_defenses is not None else None)
    folder = Path(args.cells)
    if args.report_only:         # current cells, and ablations that ran under an earlier default (compared with it)
        results = {c: found[0] for c in todo if (found := recorded_cell(folder, base, c)) is not None
                   and (current_cell(folder, base, c) is not None or c.variant in ABLATIONS)}
        print(f"{len(results)} of {len(todo)} cells have a result file of these settings", flush=True)
    else:
        results = run_cells(base, todo, folder)
    command = "python benchmarks/defense_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    plots = Path(args.output).parent / (Path(args.output).stem + "-plots")
    text = report(results, datasets, attacks, command.strip(), plots, base)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
