"""Driver-side progress: one line per finished epoch, read back from the run's MLflow metrics (what rank 0
logged), so the console stays readable even with worker output off (`ray.worker_logs=false`).

    with EpochProgress(cfg, uri, run_id):
        trainer.fit()
    # [demo-otcclip] epoch 2/5 51 s 98 samples/s loss 3.41 | zero-shot 0.512 backdoor ASR 0.031 flagged 2.4%
"""
from __future__ import annotations

import math
import threading

from ..config import Config
from ..track import metric_names as N
from ..track.mlflow_logger import metric_history

LINE_FIELDS = ((N.EVAL_ZEROSHOT_TOP1, "zero-shot {:.3f}"), (N.EVAL_BACKDOOR_ASR, "backdoor ASR {:.3f}"),
               (N.EVAL_TARGETED_ASR, "targeted ASR {:.2f}"), (N.REMATCH_FLAG_RATE, "flagged {:.1%}"),
               (N.REMATCH_DETECT_RECALL, "detection recall {:.2f}"))
HEAD_FIELDS = (N.TRAIN_EPOCH_SECONDS, N.TRAIN_SAMPLES_PER_S_WORKER, N.TRAIN_EPOCH_TOTAL_LOSS)


def epoch_line(name: str, epochs_done: int, epochs: int, metrics: dict[str, float], workers: int = 1) -> str:
    """The progress line of one epoch from its metrics (missing or NaN fields are left out). samples/s is the
    whole job's: rank 0's rate times the workers (every rank trains the same number of equal batches)."""
    rate = metrics.get(N.TRAIN_SAMPLES_PER_S_WORKER, math.nan) * workers
    head = (f"[{name}] epoch {epochs_done}/{epochs} {metrics.get(N.TRAIN_EPOCH_SECONDS, math.nan):.0f} s "
            f"{rate:.0f} samples/s" + (f" ({workers} workers)" if workers > 1 else ""))
    if N.TRAIN_EPOCH_TOTAL_LOSS in metrics:
        head += f" loss {metrics[N.TRAIN_EPOCH_TOTAL_LOSS]:.2f}"
    tail = [fmt.format(metrics[k]) for k, fmt in LINE_FIELDS if k in metrics and math.isfinite(metrics[k])]
    return head + (" | " + " ".join(tail) if tail else "")


class EpochProgress:
    """A daemon thread that polls the run every `interval` s and prints each newly finished epoch once."""

    def __init__(self, cfg: Config, uri: str, run_id: str, interval: float = 5.0):
        self.name, self.epochs = cfg.tracking.run_name or cfg.name, cfg.train.epochs
        self.workers = cfg.train.num_workers
        self.uri, self.run_id, self.interval = uri, run_id, interval
        self.printed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="epoch-progress", daemon=True)

    def poll(self) -> list[str]:
        """Print (and return) the lines of epochs finished since the last poll."""
        done = sorted({step for step, _ in metric_history(self.uri, self.run_id, N.TRAIN_EPOCH_SECONDS)} - self.printed)
        if not done:
            return []
        history = {k: dict(metric_history(self.uri, self.run_id, k)) for k in HEAD_FIELDS + tuple(k for k, _ in LINE_FIELDS)}
        lines = []
        for step in done:
            metrics = {k: values[step] for k, values in history.items() if step in values}
            lines.append(epoch_line(self.name, step + 1, self.epochs, metrics, self.workers))
            print(lines[-1], flush=True)
            self.printed.add(step)
        return lines

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as e:     # a busy sqlite store must not kill the run; the next poll retries
                print(f"[{self.name}] progress: {type(e).__name__}: {e}", flush=True)

    def __enter__(self) -> "EpochProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.poll()
        except Exception:      # never mask the run's own outcome
            pass
