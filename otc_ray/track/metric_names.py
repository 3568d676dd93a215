"""The names of a run's MLflow metrics, defined once: what the trainer logs and what compare, progress,
the CLI, the demo and the benchmarks read.

A name is `<prefix><key>`:
    data/     the training shard set's outcome counts (step 0)        data/ok, data/skipped_<reason>
    train/    rank 0's loss terms per step, its epoch figures          train/<term>, train/epoch_<term>, ...
    rematch/  the re-match stage's flags as one worker saw them        rematch/flag_rate, rematch/detect_recall, ...
    eval/     the evaluation of each epoch (no linear probe)           eval/<key of evaluate.report.evaluate_arrays>
    final/    the evaluation of the final model                        final/<same keys, linear probe included>
    run/      the whole run                                            run/seconds, run/samples_per_s
    progress/ rank 0's place inside the current epoch, every log_every progress/epoch, progress/step_in_epoch,
              steps (the driver's live progress line reads it)         progress/samples_per_s (the whole job's)
"""
from __future__ import annotations

DATA, TRAIN, REMATCH, EVAL, FINAL, RUN = "data/", "train/", "rematch/", "eval/", "final/", "run/"
PROGRESS = "progress/"

# keys of the evaluation dict (otc_ray.evaluate.report.evaluate_arrays), under EVAL and FINAL
ZEROSHOT_TOP1 = "zeroshot_top1"
BACKDOOR_ASR = "backdoor_asr"
TARGETED_ASR = "targeted_asr"
LINEAR_PROBE_SPLIT_ACC = "linear_probe_split_acc"

EPOCH = "epoch"                                             # the epoch index (0-based) every rank reports
DATA_OK = DATA + "ok"
DATA_EPOCH_ROWS = DATA + "epoch_rows"                       # rows one worker received in the epoch (tail included)
DATA_EPOCH_REPEATED_ROWS = DATA + "epoch_repeated_rows"     # of those, rows whose key it had already received
TRAIN_LR = TRAIN + "lr"
TRAIN_SAMPLES_PER_S_WORKER = TRAIN + "samples_per_s_worker"
TRAIN_EPOCH_SECONDS = TRAIN + "epoch_seconds"
TRAIN_BATCHES = TRAIN + "batches"
TRAIN_EPOCH_TOTAL_LOSS = TRAIN + "epoch_total_loss"
PROGRESS_EPOCH = PROGRESS + "epoch"                         # the epoch index (0-based) rank 0 is training
PROGRESS_STEP = PROGRESS + "step_in_epoch"                  # its steps done in that epoch (1-based)
PROGRESS_SAMPLES_PER_S = PROGRESS + "samples_per_s"         # the whole job's samples/s in that epoch so far
REMATCH_FLAG_RATE = REMATCH + "flag_rate"
REMATCH_RECAPTIONED_RATE = REMATCH + "recaptioned_rate"
REMATCH_DROPPED_RATE = REMATCH + "dropped_rate"
REMATCH_MEAN_WEIGHT = REMATCH + "mean_weight"
REMATCH_DETECT_PRECISION = REMATCH + "detect_precision"
REMATCH_DETECT_RECALL = REMATCH + "detect_recall"
REMATCH_DAMAGE = REMATCH + "damage"
REMATCH_SCREENED_RATE = REMATCH + "screened_rate"          # share of rows an active matcher scored
REMATCH_STALENESS = REMATCH + "weights_staleness"          # publications the scoring weights lagged behind (rank 0)


def rematch_recall(attack: str) -> str:
    """Recall of all flags (sticky ones included) on one attack's pairs this epoch: rematch/recall_backdoor."""
    return f"{REMATCH}recall_{attack}"


def rematch_gate(name: str) -> str:
    """The gate's own verdict this epoch (new flags; sticky ones not counted): rematch/gate_recall_backdoor,
    rematch/gate_precision, rematch/gate_flag_rate."""
    return f"{REMATCH}gate_{name}"
EVAL_ZEROSHOT_TOP1 = EVAL + ZEROSHOT_TOP1
EVAL_BACKDOOR_ASR = EVAL + BACKDOOR_ASR
EVAL_TARGETED_ASR = EVAL + TARGETED_ASR
FINAL_ZEROSHOT_TOP1 = FINAL + ZEROSHOT_TOP1
FINAL_BACKDOOR_ASR = FINAL + BACKDOOR_ASR
FINAL_TARGETED_ASR = FINAL + TARGETED_ASR
FINAL_LINEAR_PROBE_SPLIT_ACC = FINAL + LINEAR_PROBE_SPLIT_ACC
RUN_SECONDS = RUN + "seconds"
RUN_SAMPLES_PER_S = RUN + "samples_per_s"
TIME_WORKER = "time/worker"             # + /<phase>_wall_s, _cpu_s: rank 0's phase timers (train.phases)
TIME_FIRST_STEP = "time/worker/first_step_unix_s"   # unix time at the end of the run's first optimizer step
TIME_WORKER_START = "time/worker/start_unix_s"   # unix time when the train function started
TIME_DRIVER = "time/driver"             # + /<phase>_wall_s, _cpu_s: the driver's start-up phases


def prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    """{prefix + key: value}: a metrics dict (loss terms, evaluation, detection) under one prefix."""
    return {prefix + k: v for k, v in values.items()}


def data_skipped(reason: str) -> str:
    """The count of training samples skipped for `reason` (a `data.schema` skip reason)."""
    return f"{DATA}skipped_{reason}"


def train_epoch(term: str) -> str:
    """Rank 0's mean of loss term `term` (e.g. "clip_loss") over an epoch."""
    return f"{TRAIN}epoch_{term}"
