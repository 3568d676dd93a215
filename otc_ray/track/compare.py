"""`otc-ray compare`: runs of an experiment side by side, mean ± std over seeds, and two plots.

Runs are grouped by (data set, defense, attack, trigger, poison count); each group shows how many
seeds it holds and, per metric, the mean ± std of the runs' final values; detection and damage are those of the
last epoch that re-matched (`at_last_rematch`).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import numpy as np

from ..config import parse_attacks
from . import metric_names
from .mlflow_logger import RunRecord, metric_history, search_runs
from .plots import plot_compare
from .run_context import GROUP_TAG

GROUP_PARAMS = (("data", "data.dataset"), ("defense", "train.defense"), ("attack", "poison.attack"),
                ("trigger", "poison.trigger"), ("poison", "poison.count"))
METRICS = (("zero-shot", metric_names.FINAL_ZEROSHOT_TOP1), ("lin-probe", metric_names.FINAL_LINEAR_PROBE_SPLIT_ACC),
           ("backdoor ASR", metric_names.FINAL_BACKDOOR_ASR), ("targeted ASR", metric_names.FINAL_TARGETED_ASR),
           ("det P", metric_names.REMATCH_DETECT_PRECISION), ("det R", metric_names.REMATCH_DETECT_RECALL),
           ("damage", metric_names.REMATCH_DAMAGE), ("samples/s", metric_names.TRAIN_SAMPLES_PER_S_WORKER), ("time s", metric_names.RUN_SECONDS))

REMATCH_FIGURES = (metric_names.REMATCH_DETECT_PRECISION, metric_names.REMATCH_DETECT_RECALL, metric_names.REMATCH_DAMAGE)
History = Callable[[RunRecord, str], list[tuple[int, float]]]      # (run, metric) -> [(epoch, value)]


def at_last_rematch(run: RunRecord, history: History) -> RunRecord:
    """The run with its detection and damage figures from the last epoch whose re-matching flagged anything (flag
    rate > 0). RoCLIP re-matches every K epochs: its final epoch trains on the crawled captions and would report
    recall 0 and damage 0. Runs that flag every epoch (otcclip, safeclip) or never re-match (none) are unchanged."""
    if metric_names.REMATCH_FLAG_RATE not in run.metrics:
        return run
    rates = history(run, metric_names.REMATCH_FLAG_RATE)
    flagged = [epoch for epoch, rate in rates if rate > 0]
    if not flagged or flagged[-1] == max(epoch for epoch, _ in rates):
        return run
    metrics = {k: v for k, v in run.metrics.items() if k not in REMATCH_FIGURES}
    for key in REMATCH_FIGURES:
        at = dict(history(run, key))
        if flagged[-1] in at:
            metrics[key] = at[flagged[-1]]
    return dataclasses.replace(run, metrics=metrics)


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


def run_attacks(run: RunRecord) -> tuple[str, ...]:
    """The run's poison.attack as a tuple (logged in its written form, "backdoor+targeted" / "none")."""
    return tuple(parse_attacks(run.params.get("poison.attack", "none")))


def effective_poison(run: RunRecord) -> str:
    """The poison count as a table cell ('0' for clean runs)."""
    attacks = run_attacks(run)
    if not attacks:
        return "0"
    parts = []
    if "backdoor" in attacks:
        rate = float(run.params.get("poison.rate", "0") or 0)
        parts.append(f"{rate:.2%}" if rate > 0 else run.params.get("poison.count", "?"))
    if "targeted" in attacks:
        parts.append(f"{run.params.get('poison.targets')}x{run.params.get('poison.per_target')}")
    return "+".join(parts)


def run_data(run: RunRecord) -> str:
    """The run's data as its `dataset` tag names it (a user's classes file's name; data.dataset for built-in data),
    else its data.dataset param (runs logged before the tag said so)."""
    return run.tags.get("dataset") or run.params.get("data.dataset", "?")


def group_runs(runs: list[RunRecord]) -> list[Row]:
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for run in runs:
        key = tuple(effective_poison(run) if name == "poison" else run_data(run) if name == "data" else
                    ("-" if name == "trigger" and "backdoor" not in run_attacks(run) else run.params.get(p, "?"))
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


def compare(uri: str, experiment: str, fmt: str = "text", plots_dir: Path | None = None,
            run_ids: Collection[str] | None = None, run_names: Collection[str] | None = None) -> tuple[str, list[Path]]:
    """(table text, plot paths) for every finished run of the experiment (only `run_ids` / `run_names` when given)."""
    runs = [r for r in search_runs(uri, experiment) if r.status in ("FINISHED", "RUNNING")
            and (run_ids is None or r.run_id in run_ids) and (run_names is None or r.name in run_names)
            and GROUP_TAG not in r.tags]                                                   # parents train nothing
    if not runs:
        raise ValueError(f"no runs in experiment {experiment!r} at {uri}" + (f" named {sorted(run_names)}"
                                                                          if run_names else ""))
    history = lambda run, key: metric_history(uri, run.run_id, key)  # noqa: E731
    rows = group_runs([at_last_rematch(r, history) for r in runs])
    return render(rows, fmt), (plot_compare(rows, history, plots_dir) if plots_dir else [])
