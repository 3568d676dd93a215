"""`otc-ray compare`: runs of an experiment side by side, mean ± std over seeds, and two plots.

Runs are grouped by (data set, defense, attack, trigger, poison count); each group shows how many
seeds it holds and, per metric, the mean ± std of the runs' final values.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import numpy as np

from .mlflow_logger import RunRecord, metric_history, search_runs

GROUP_PARAMS = (("data", "data.dataset"), ("defense", "train.defense"), ("attack", "poison.attack"),
                ("trigger", "poison.trigger"), ("poison", "poison.count"))
METRICS = (("zero-shot", "final/zeroshot_top1"), ("lin-probe", "final/linear_probe_split_acc"),
           ("backdoor ASR", "final/backdoor_asr"), ("targeted ASR", "final/targeted_asr"),
           ("det P", "rematch/detect_precision"), ("det R", "rematch/detect_recall"),
           ("damage", "rematch/damage"), ("samples/s", "train/samples_per_s_worker"), ("time s", "run/seconds"))


@dataclass
class Row:
    group: tuple[str, ...]
    seeds: int
    runs: list[RunRecord]
    values: dict[str, list[float]]

    def cell(self, metric: str) -> str:
        vals = [v for v in self.values.get(metric, []) if not math.isnan(v)]
        if not vals:
            return "-"
        mean = float(np.mean(vals))
        fmt = "{:.0f}" if abs(mean) >= 100 else ("{:.1f}" if abs(mean) >= 10 else "{:.3f}")
        return fmt.format(mean) + (f" ± {fmt.format(float(np.std(vals)))}" if len(vals) > 1 else "")


def effective_poison(run: RunRecord) -> str:
    """The poison count as a table cell ('0' for clean runs)."""
    if run.params.get("poison.attack", "none") == "none":
        return "0"
    parts = []
    attack = run.params.get("poison.attack", "")
    if "backdoor" in attack:
        rate = float(run.params.get("poison.rate", "0") or 0)
        parts.append(f"{rate:.2%}" if rate > 0 else run.params.get("poison.count", "?"))
    if "targeted" in attack:
        parts.append(f"{run.params.get('poison.targets')}x{run.params.get('poison.per_target')}")
    return "+".join(parts)


def group_runs(runs: list[RunRecord]) -> list[Row]:
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for run in runs:
        key = tuple(effective_poison(run) if name == "poison" else
                    ("-" if name == "trigger" and "backdoor" not in run.params.get("poison.attack", "") else run.params.get(p, "?"))
                    for name, p in GROUP_PARAMS)
        groups.setdefault(key, []).append(run)
    rows = []
    for key, members in sorted(groups.items()):
        values = {m: [r.metrics[m] for r in members if m in r.metrics] for _, m in METRICS}
        rows.append(Row(key, len({r.params.get("train.seed", "0") for r in members}), members, values))
    return rows


def render(rows: list[Row], fmt: str) -> str:
    header = [name for name, _ in GROUP_PARAMS] + ["seeds"] + [name for name, _ in METRICS]
    body = [list(r.group) + [str(r.seeds)] + [r.cell(m) for _, m in METRICS] for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header] + body)
        return buf.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header] + body)


def plot(rows: list[Row], uri: str, folder: Path) -> list[Path]:
    """asr_per_epoch.png (backdoor ASR by epoch, one line per run, coloured by defense) and
    zeroshot_vs_asr.png (final zero-shot against final backdoor ASR, one point per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    defenses = sorted({r.group[1] for r in rows})
    colour = {d: plt.cm.tab10(i) for i, d in enumerate(defenses)}
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        for run in row.runs:
            points = sorted(metric_history(uri, run.run_id, "eval/backdoor_asr"))
            if points:
                ax.plot([p[0] + 1 for p in points], [p[1] for p in points], color=colour[row.group[1]], alpha=0.8,
                        label=row.group[1])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys())
    ax.set(xlabel="epoch", ylabel="backdoor ASR", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    asr_path = folder / "asr_per_epoch.png"
    fig.savefig(asr_path, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for row in rows:
        xs = [r.metrics.get("final/backdoor_asr", math.nan) for r in row.runs]
        ys = [r.metrics.get("final/zeroshot_top1", math.nan) for r in row.runs]
        ax.scatter(xs, ys, color=colour[row.group[1]], label=f"{row.group[1]} / {row.group[2]}")
    ax.set(xlabel="backdoor ASR (lower is better)", ylabel="zero-shot top-1", xlim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    scatter_path = folder / "zeroshot_vs_asr.png"
    fig.savefig(scatter_path, dpi=120)
    plt.close(fig)
    return [asr_path, scatter_path]


def compare(uri: str, experiment: str, fmt: str = "text", plots_dir: Path | None = None,
            run_ids: Collection[str] | None = None) -> tuple[str, list[Path]]:
    """(table text, plot paths) for every run of the experiment (only `run_ids` when given)."""
    runs = [r for r in search_runs(uri, experiment) if r.status in ("FINISHED", "RUNNING")
            and (run_ids is None or r.run_id in run_ids)]
    if not runs:
        raise ValueError(f"no runs in experiment {experiment!r} at {uri}")
    rows = group_runs(runs)
    return render(rows, fmt), (plot(rows, uri, plots_dir) if plots_dir else [])
