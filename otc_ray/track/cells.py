"""Benchmark cells as small JSON files: one finished training run each (what it trained, its final metrics and
per-epoch curves), so a matrix can be completed over several sittings or machines and its tables rebuilt from the
files alone, without the MLflow store that produced them.

    result = cell_from_run(uri, run_id, cell={"dataset": "fashion", "defense": "none", ...}, digest=d, commit=c)
    write_cell(folder / "fashion" / "patch-none-s0.json", result)
    results = read_cells(folder)                      # every cell file below folder, sorted by path

A cell file records the config digest of the run (`mlflow_logger.training_digest`): a rerun whose digest differs
trains the cell again instead of reusing a result of other settings.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import metric_names
from .mlflow_logger import RunRecord, metric_history, search_runs

FORMAT = 1
# per-epoch curves kept in a cell: what the plots and the per-epoch detection tables need
HISTORY_KEYS = (metric_names.EVAL_BACKDOOR_ASR, metric_names.EVAL_TARGETED_ASR, metric_names.EVAL_ZEROSHOT_TOP1, metric_names.REMATCH_FLAG_RATE,
                metric_names.REMATCH_DETECT_PRECISION, metric_names.REMATCH_DETECT_RECALL, metric_names.REMATCH_DAMAGE,
                metric_names.rematch_gate("precision"), metric_names.rematch_gate("recall"), metric_names.rematch_gate("recall_backdoor"),
                metric_names.rematch_gate("recall_targeted"), metric_names.TRAIN_EPOCH_SECONDS)


@dataclass(frozen=True)
class CellResult:
    """cell: the matrix coordinates (data set, attack, defense, seed, ...); digest: the run's config digest;
    commit: the code it ran; record: the run's params and final metrics; history: {metric: [(epoch, value)]}."""

    cell: dict
    digest: str
    commit: str
    record: RunRecord
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def cell_from_run(uri: str, run_id: str, cell: dict, digest: str, commit: str, experiment: str) -> CellResult:
    """The cell result of a finished MLflow run (its latest metrics and the HISTORY_KEYS curves)."""
    record = next((r for r in search_runs(uri, experiment) if r.run_id == run_id), None)
    if record is None:
        raise ValueError(f"run {run_id} not found in experiment {experiment!r} at {uri}")
    history = {k: sorted(metric_history(uri, run_id, k)) for k in HISTORY_KEYS if k in record.metrics}
    return CellResult(dict(cell), digest, commit, record, history)


def write_cell(path: Path, result: CellResult) -> None:
    """Write atomically (a half-written file never looks finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "cell": result.cell, "digest": result.digest, "commit": result.commit,
               "record": asdict(result.record), "history": {k: [list(p) for p in v] for k, v in result.history.items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, allow_nan=True) + "\n")
    os.replace(tmp, path)


def read_cell(path: Path) -> CellResult:
    """ValueError naming the file when it is not a cell file of this format."""
    try:
        payload = json.loads(Path(path).read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT}")
        record = RunRecord(**payload["record"])
        history = {k: [(int(s), float(v)) for s, v in points] for k, points in payload["history"].items()}
        return CellResult(payload["cell"], payload["digest"], payload["commit"], record, history)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a benchmark cell file ({e})") from e


def read_cells(folder: Path) -> list[CellResult]:
    """Every cell file (*.json) below folder, sorted by path; [] when the folder does not exist."""
    folder = Path(folder)
    return [read_cell(p) for p in sorted(folder.rglob("*.json"))] if folder.is_dir() else []
