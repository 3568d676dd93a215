"""Driver-side progress, read back from the run's MLflow metrics (what rank 0 logged), so the console stays
readable even with worker output off (`ray.worker_logs=false`): one line per finished epoch and, on a terminal,
one live line inside the epoch, refreshed in place (nothing of it in CI logs or pipes).

    with EpochProgress(cfg, uri, run_id, steps_per_epoch=40):
        trainer.fit()
    # [demo-otcclip] epoch 3/5 [#######-------------] 14/40 steps 97 samples/s ETA epoch 0:37, run 2:48   (live)
    # [demo-otcclip] epoch 2/5 51 s 98 samples/s loss 3.41 | zero-shot 0.512 backdoor ASR 0.031 flagged 2.4%
"""
from __future__ import annotations

import math
import os
import sys
import threading
from typing import TextIO

from ..config import Config
from ..track import metric_names
from ..track.mlflow_logger import metric_history, run_metrics

BAR_WIDTH = 20
CLEAR_LINE = "\r\x1b[K"          # carriage return + erase to the end of the line (every ANSI terminal)


def live_progress_wanted(stream: TextIO) -> bool:
    """The live line is for people at a terminal: `stream` is a TTY and no CI system is running us."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


def _clock(seconds: float) -> str:
    """3725 -> '1:02:05', 65 -> '1:05'."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def step_line(name: str, epoch: int, epochs: int, step: int, steps: int, samples_per_s: float,
              samples_per_step: int) -> str:
    """The live line inside epoch `epoch` (0-based) after `step` of `steps` steps: a bar, the job's samples/s and the
    ETAs of the epoch and of the run's remaining training (at that rate; evaluation time not included)."""
    step = min(step, steps)
    filled = int(BAR_WIDTH * step / max(steps, 1))
    steps_per_s = samples_per_s / max(samples_per_step, 1)
    left_epoch = (steps - step) / steps_per_s if steps_per_s > 0 else math.inf
    left_run = left_epoch + (epochs - epoch - 1) * steps / steps_per_s if steps_per_s > 0 else math.inf
    return (f"[{name}] epoch {epoch + 1}/{epochs} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {step}/{steps} steps "
            f"{samples_per_s:.0f} samples/s ETA epoch {_clock(left_epoch)}, run {_clock(left_run)}")

LINE_FIELDS = ((metric_names.EVAL_ZEROSHOT_TOP1, "zero-shot {:.3f}"), (metric_names.EVAL_BACKDOOR_ASR, "backdoor ASR {:.3f}"),
               (metric_names.EVAL_TARGETED_ASR, "targeted ASR {:.2f}"), (metric_names.REMATCH_FLAG_RATE, "flagged {:.1%}"),
               (metric_names.REMATCH_DETECT_RECALL, "detection recall {:.2f}"))
HEAD_FIELDS = (metric_names.TRAIN_EPOCH_SECONDS, metric_names.TRAIN_SAMPLES_PER_S_WORKER, metric_names.TRAIN_EPOCH_TOTAL_LOSS)


def epoch_line(name: str, epochs_done: int, epochs: int, metrics: dict[str, float], workers: int = 1) -> str:
    """The progress line of one epoch from its metrics (missing or NaN fields are left out). samples/s is the
    whole job's: rank 0's rate times the workers (every rank trains the same number of equal batches)."""
    rate = metrics.get(metric_names.TRAIN_SAMPLES_PER_S_WORKER, math.nan) * workers
    head = (f"[{name}] epoch {epochs_done}/{epochs} {metrics.get(metric_names.TRAIN_EPOCH_SECONDS, math.nan):.0f} s "
            f"{rate:.0f} samples/s" + (f" ({workers} workers)" if workers > 1 else ""))
    if metric_names.TRAIN_EPOCH_TOTAL_LOSS in metrics:
        head += f" loss {metrics[metric_names.TRAIN_EPOCH_TOTAL_LOSS]:.2f}"
    tail = [fmt.format(metrics[k]) for k, fmt in LINE_FIELDS if k in metrics and math.isfinite(metrics[k])]
    return head + (" | " + " ".join(tail) if tail else "")


class EpochProgress:
    """A daemon thread that polls the run every `interval` s and prints each newly finished epoch once; with `live`
    (default: `stream` is a terminal outside CI) it also keeps one line refreshed with the current epoch's progress
    (steps_per_epoch: each worker's optimizer steps per epoch; 0 = no live line)."""

    def __init__(self, cfg: Config, uri: str, run_id: str, interval: float | None = None, steps_per_epoch: int = 0,
                 stream: TextIO | None = None, live: bool | None = None):
        self.name, self.epochs = cfg.tracking.run_name or cfg.name, cfg.train.epochs
        self.workers = cfg.train.num_workers
        self.samples_per_step = cfg.train.batch_size * cfg.train.num_workers
        self.uri, self.run_id = uri, run_id
        self.stream = stream or sys.stdout
        self.live = (live_progress_wanted(self.stream) if live is None else live) and steps_per_epoch > 0
        self.interval = interval if interval is not None else (2.0 if self.live else 5.0)
        self.steps_per_epoch = steps_per_epoch
        self.printed: set[int] = set()
        self.shown = ""                    # the live line on screen now ("" = none)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="epoch-progress", daemon=True)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def poll(self) -> list[str]:
        """Print (and return) the lines of epochs finished since the last poll; then refresh the live line."""
        done = sorted({step for step, _ in metric_history(self.uri, self.run_id, metric_names.TRAIN_EPOCH_SECONDS)} - self.printed)
        lines = []
        if done:
            history = {k: dict(metric_history(self.uri, self.run_id, k))
                       for k in HEAD_FIELDS + tuple(k for k, _ in LINE_FIELDS)}
            for step in done:
                metrics = {k: values[step] for k, values in history.items() if step in values}
                lines.append(epoch_line(self.name, step + 1, self.epochs, metrics, self.workers))
                self._write((CLEAR_LINE if self.shown else "") + lines[-1] + "\n")
                self.shown = ""
                self.printed.add(step)
        if self.live:
            self._refresh_live()
        return lines

    def _refresh_live(self) -> None:
        """Redraw the live line from rank 0's latest progress/* metrics (none while the epoch has no step logged)."""
        latest = run_metrics(self.uri, self.run_id)
        if metric_names.PROGRESS_STEP not in latest:
            return
        epoch = int(latest[metric_names.PROGRESS_EPOCH])
        if epoch in self.printed:          # that epoch is over; the next one has not logged a step yet
            return
        line = step_line(self.name, epoch, self.epochs, int(latest[metric_names.PROGRESS_STEP]), self.steps_per_epoch,
                         latest[metric_names.PROGRESS_SAMPLES_PER_S], self.samples_per_step)
        if line != self.shown:
            self._write(CLEAR_LINE + line)
            self.shown = line

    def clear_live(self) -> None:
        """Erase the live line (at the end, so that what follows starts on a clean line)."""
        if self.shown:
            self._write(CLEAR_LINE)
            self.shown = ""

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as e:     # a busy sqlite store must not kill the run; the next poll retries
                self._write((CLEAR_LINE if self.shown else "") + f"[{self.name}] progress: {type(e).__name__}: {e}\n")
                self.shown = ""

    def __enter__(self) -> "EpochProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.poll()
            self.clear_live()
        except Exception:      # never mask the run's own outcome
            pass
