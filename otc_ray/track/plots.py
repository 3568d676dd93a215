"""Plots of MLflow runs, as PNG files (matplotlib, headless): the one place that draws.

    plot_run(uri, run_id, folder)          one run: zero-shot accuracy and ASRs per epoch (the trainer's final report)
    plot_compare(rows, history, folder)    several runs: ASR per epoch by defense, zero-shot vs ASR (`otc-ray compare`,
                                           benchmarks/defense_bench.py from its cell files)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from . import metric_names
from .mlflow_logger import metric_history


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(uri: str, run_id: str, folder: Path) -> list[Path]:
    """asr_accuracy_per_epoch.png in `folder`: zero-shot accuracy and ASRs of one run per epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in ((metric_names.EVAL_ZEROSHOT_TOP1, "zero-shot top-1"), (metric_names.EVAL_BACKDOOR_ASR, "backdoor ASR"),
                       (metric_names.EVAL_TARGETED_ASR, "targeted ASR")):
        points = sorted(metric_history(uri, run_id, key))
        if points:
            ax.plot([p[0] + 1 for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    path = folder / "asr_accuracy_per_epoch.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_compare(rows: Sequence, history: Callable[[Any, str], list[tuple[int, float]]], folder: Path) -> list[Path]:
    """asr_per_epoch.png (backdoor ASR by epoch, one line per run, coloured by defense) and
    zeroshot_vs_asr.png (final zero-shot against final backdoor ASR, one point per run). rows: compare.Row
    groups (group = (data, defense, attack, ...), runs = their RunRecords); history(run, metric) -> [(epoch, value)]
    (from MLflow, or from benchmark cell files)."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    defenses = sorted({r.group[1] for r in rows})
    colour = {d: plt.cm.tab10(i) for i, d in enumerate(defenses)}
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        for run in row.runs:
            points = sorted(history(run, metric_names.EVAL_BACKDOOR_ASR))
            if points:                      # an unpoisoned run (attack "none") is dashed: the base rate
                clean = len(row.group) > 2 and row.group[2] == "none"
                ax.plot([p[0] + 1 for p in points], [p[1] for p in points], color=colour[row.group[1]], alpha=0.8,
                        linestyle="--" if clean else "-", label=row.group[1] + (", no poison" if clean else ""))
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
        xs = [r.metrics.get(metric_names.FINAL_BACKDOOR_ASR, math.nan) for r in row.runs]
        ys = [r.metrics.get(metric_names.FINAL_ZEROSHOT_TOP1, math.nan) for r in row.runs]
        ax.scatter(xs, ys, color=colour[row.group[1]], label=f"{row.group[1]} / {row.group[2]}")
    ax.set(xlabel="backdoor ASR (lower is better)", ylabel="zero-shot top-1", xlim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    scatter_path = folder / "zeroshot_vs_asr.png"
    fig.savefig(scatter_path, dpi=120)
    plt.close(fig)
    return [asr_path, scatter_path]
