"""One row per cell file of a folder: quality beside the training worker's CPU, for settings tuned on the validation
seed (the benchmark's matrix reports seeds 0-2; tuning runs use seed 3 and keep their cells apart from the store).

    python benchmarks/defense_bench.py run --datasets fashion --attacks patch+targeted --defenses otcclip \\
        --seeds 3 --variants fast-otcclip --cells benchmarks/results/validation/cells --output /tmp/unused.md
    python benchmarks/validation_table.py benchmarks/results/validation/cells      # prints the markdown table

The worker's CPU seconds per trained sample (its epochs, and the witness warm-up before them) come from the run's
own phase timers (`time/worker/*`): CPU time, so they hold on a shared machine where wall-clock figures do not.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otc_ray.track.cells import read_cells  # noqa: E402

COLUMNS = (("zero-shot", "final/zeroshot_top1", "{:.3f}"), ("lin-probe", "final/linear_probe_split_acc", "{:.3f}"),
           ("backdoor ASR", "final/backdoor_asr", "{:.3f}"), ("targeted ASR", "final/targeted_asr", "{:.3f}"),
           ("det P", "rematch/detect_precision", "{:.3f}"), ("det R", "rematch/detect_recall", "{:.3f}"),
           ("damage", "rematch/damage", "{:.4f}"))


def rows(folder: Path) -> list[str]:
    """Markdown table lines, one per cell (sorted by path)."""
    head = ["data", "attack", "defense", "variant", "seed", *(c[0] for c in COLUMNS),
            "worker CPU ms / sample (epochs)", "witness CPU s", "commit"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 5 + "---:|" * (len(COLUMNS) + 2) + "---|"]
    for result in read_cells(folder):
        m, c = result.record.metrics, result.cell
        samples = m.get("data/epoch_rows", 0.0) * (m.get("epoch", 0.0) + 1)
        cpu = 1e3 * m.get("time/worker/epochs_total_cpu_s", float("nan")) / samples if samples else float("nan")
        vals = [fmt.format(m[key]) if key in m else "-" for _, key, fmt in COLUMNS]
        out.append("| " + " | ".join([c["dataset"], c["attack"], c["defense"], c.get("variant") or "(default)",
                                      str(c["seed"]), *vals, f"{cpu:.2f}",
                                      f"{m.get('time/worker/witness_total_cpu_s', 0.0):.1f}", result.commit]) + " |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", help="folder of cell files")
    print("\n".join(rows(Path(ap.parse_args().cells))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
