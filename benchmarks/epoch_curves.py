"""Per-epoch curves of chosen MLflow runs, mean ± std over the runs of each group: how detection and the attack
develop epoch by epoch across seeds (`otc-ray compare` gives the final figures).

    .venv/bin/python benchmarks/epoch_curves.py --uri sqlite:////abs/runs/mlflow.db --experiment otc-ray-demo \
        --group otcclip=s2-otc,s3-otc,s4-otc --group none=s2-none,s3-none,s4-none [--metrics a,b]

Prints one markdown table per metric: a row per group, a column per epoch.
"""
from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

from otc_ray.track import metric_names  # noqa: E402
from otc_ray.track.mlflow_logger import metric_history, search_runs  # noqa: E402

METRICS = (metric_names.EVAL_ZEROSHOT_TOP1, metric_names.EVAL_BACKDOOR_ASR, metric_names.EVAL_TARGETED_ASR, metric_names.rematch_gate("recall_backdoor"),
           metric_names.rematch_gate("recall_targeted"), metric_names.rematch_gate("precision"), metric_names.rematch_gate("flag_rate"),
           metric_names.REMATCH_DAMAGE, metric_names.TRAIN_EPOCH_SECONDS)


def curves(uri: str, run_ids: list[str], metric: str) -> dict[int, list[float]]:
    """{epoch: [value of each run]} (NaN values left out)."""
    out: dict[int, list[float]] = {}
    for run_id in run_ids:
        for step, value in metric_history(uri, run_id, metric):
            if not math.isnan(value):
                out.setdefault(step, []).append(value)
    return out


def table(uri: str, groups: dict[str, list[str]], metric: str) -> str:
    per_group = {name: curves(uri, ids, metric) for name, ids in groups.items()}
    epochs = sorted({e for c in per_group.values() for e in c})
    if not epochs:
        return ""
    lines = [f"**{metric}**\n", "| group | runs | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "|---|---|" + "---|" * len(epochs)]
    for name, c in per_group.items():
        cells = []
        for e in epochs:
            v = c.get(e, [])
            cells.append("-" if not v else f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else ""))
        lines.append(f"| {name} | {len(groups[name])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", required=True, help="MLflow tracking URI (sqlite:////abs/path.db)")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--group", action="append", required=True, help="name=run name,run name,...")
    parser.add_argument("--metrics", default=",".join(METRICS))
    args = parser.parse_args(argv)
    runs = {r.name: r.run_id for r in search_runs(args.uri, args.experiment)}
    groups = {}
    for spec in args.group:
        name, _, names = spec.partition("=")
        missing = [n for n in names.split(",") if n not in runs]
        if missing:
            parser.error(f"--group {name}: no runs named {missing} in {args.experiment!r}")
        groups[name] = [runs[n] for n in names.split(",")]
    print("\n".join(t for m in args.metrics.split(",") if (t := table(args.uri, groups, m))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
