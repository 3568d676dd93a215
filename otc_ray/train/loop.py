"""The per-worker training loop (Ray Train V2): CLIP pre-training with the configured defense.

Each worker reads its split of the (re-matched) stream with `get_dataset_shard("train")`, counts every row it
receives (`data/epoch_rows`, `data/epoch_repeated_rows`: nothing lost or delivered twice, even when a node
running re-match actors goes away), and trains a DDP-wrapped open_clip model (gloo on CPU, nccl on GPU) on
equal-sized batches (the short tail is counted, not trained) with the batch loss of the configured defense (`defenses.get_defense`). Rank 0 alone publishes weights to the re-match actors,
evaluates on the held-out set, logs to MLflow and writes checkpoints; every epoch ends in `ray.train.report` on
all ranks. The driver hands every worker one `LoopConfig`:

    TorchTrainer(functools.partial(train_loop_per_worker, LoopConfig(cfg, run_id, uri, steps_per_epoch, ...)), ...)
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from .. import identity
from ..config import Config
from ..data import schema
from ..data.class_info import DatasetInfo, class_patterns
from ..model import FeatureModel, images_to_tensor
from ..model_checkpoint import pretrained_model
from ..data.schema import CAPTION_USED, WEIGHT
from ..track import metric_names
from ..track.mlflow_logger import RunLogger
from .chaos import maybe_die
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .defenses import get_defense
from .phases import PhaseTimer
from .schedule import warmup_cosine
from .tally import RematchTally

if TYPE_CHECKING:
    from .evaluation import EpochEvaluator
    from .publish import WeightPublisher

MAX_LOGIT_SCALE = float(np.log(100.0))


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every Train worker; picklable (Ray ships it with the train function).

    config: the run's validated Config (travels typed, a frozen dataclass tree);
    run_id, tracking_uri: the MLflow run that rank 0 logs into;
    steps_per_epoch: optimizer steps per epoch on each worker (the LR schedule's length is this x epochs);
    evaluate: rank 0's held-out evaluation, (bundle, model, device) -> metrics, or None for none;
    publish: rank 0's hand-off of the weights to the re-match actors (at epoch starts and every
    `rematch.publish_every` steps), or None when the defense streams without a re-match stage;
    chaos: the fault-injection spec of `chaos.ENV` ("" = off);
    poison_keys: ObjectRef of {poisoned key: attack} from the poison manifest (detection metrics of the stage), or
    None (clean data); classes: the class names of the data (the re-match tally's damage: which class a new caption
    names), or None;
    warmup_steps: steps trained on the "warmup" dataset (the raw stream's first rows) before epoch 0, so that the
    re-match gate screens epoch 0 with a model that has learnt something (0 = none, no such dataset); with
    `rematch.witness` that model is a throw-away witness: it judges epoch 0, then training restarts from the
    initial weights, so no unscreened pair shapes the model that is trained.
    """

    config: Config
    run_id: str
    tracking_uri: str
    steps_per_epoch: int
    evaluate: Optional["EpochEvaluator"] = None
    publish: Optional["WeightPublisher"] = None
    chaos: str = ""
    poison_keys: Optional[ray.ObjectRef] = None
    warmup_steps: int = 0
    classes: Optional[DatasetInfo] = None


def _optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings and the logit scale (open_clip's rule). The fused kernel
    (one pass over each parameter instead of a dozen elementwise ops) takes ~4% off a CPU step of the tiny model."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name or "embedding" in name
         else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.train.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=True)


def _pair_weights(batch: dict[str, np.ndarray], device: torch.device) -> torch.Tensor | None:
    """The stage's per-pair loss weights (B,) (drop/downweight actions), or None without a re-match stage.
    Every rank keeps its full batch (equal shapes for DDP); a dropped pair only loses its loss weight. The
    weights are passed even when all are 1: the weighted CLIP loss all-gathers them, so every rank must take
    the same path or the collectives would not match."""
    if WEIGHT not in batch:
        return None
    return torch.from_numpy(np.asarray(batch[WEIGHT], dtype=np.float32)).to(device)


def _batches(cfg: Config, epoch: int, rank: int) -> dict:
    """`iter_batches` arguments of one epoch: numpy batches (the last one may be short: it is counted, not
    trained), locally shuffled with a seed of
    (train.seed, epoch, rank), so each epoch's batches differ and a rerun repeats them (`train.shuffle_buffer`
    rows; 0 = stream order)."""
    args = {"batch_size": cfg.train.batch_size, "drop_last": False, "batch_format": "numpy"}
    if cfg.train.shuffle_buffer > 0:
        args |= {"local_shuffle_buffer_size": cfg.train.shuffle_buffer,
                 "local_shuffle_seed": (cfg.train.seed * 1_000_003 + epoch * 1009 + rank) % 2 ** 31}
    return args


class RowCount:
    """The rows one worker received in an epoch, by key: how many, and how many repeated a key already received
    (a retried block delivered twice would show here; 8 bytes per row)."""

    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []

    def add(self, keys) -> None:
        self.ids.append(identity.text_ids(keys))

    def metrics(self) -> dict[str, float]:
        ids = torch.cat(self.ids) if self.ids else torch.zeros(0, dtype=torch.int64)
        return {metric_names.DATA_EPOCH_ROWS: float(len(ids)), metric_names.DATA_EPOCH_REPEATED_ROWS: float(len(ids) - len(ids.unique()))}


def _snapshot(model, optimizer, scheduler) -> dict:
    """A deep copy of the trainable state (model, optimizer, LR schedule), to restart from after a witness."""
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict()})


def _reset(snapshot: dict, model, optimizer, scheduler) -> None:
    model.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])
    scheduler.load_state_dict(snapshot["scheduler"])


def _restore(model, optimizer, scheduler, rng) -> TrainState:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(epoch=0, step=0)
    with checkpoint.as_directory() as folder:
        return load_checkpoint(folder, model, optimizer, scheduler, rng)


def train_loop_per_worker(loop: LoopConfig) -> None:
    """Entry point of every Train worker (bound to its `LoopConfig` with functools.partial): trains
    `cfg.train.epochs` epochs from the newest checkpoint, reporting each epoch's metrics (and, on rank 0, its
    checkpoint) to Ray Train."""
    cfg = loop.config
    timer = PhaseTimer()
    timer.marks[metric_names.TIME_WORKER_START] = time.time()
    setup_start = (time.perf_counter(), time.process_time())
    defense = get_defense(cfg.train.defense)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)      # Ray sets OMP_NUM_THREADS to the logical CPUs asked for (often 1)
    torch.manual_seed(cfg.train.seed + rank)
    rng = np.random.default_rng([cfg.train.seed, rank])
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)

    bundle = pretrained_model(cfg.model, cfg.data.s3)      # model.pretrained's weights, or the seeded random init
    device = ray.train.torch.get_device()
    clip_model = bundle.model.to(device)
    feature_model = ray.train.torch.prepare_model(FeatureModel(clip_model, cfg.ot.special_tokens),
                                                  parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = _optimizer(clip_model, cfg)
    steps_per_epoch = loop.steps_per_epoch
    stage = defense.rematch(cfg)
    witness = stage is not None and stage.witness and loop.warmup_steps > 0
    scheduled = steps_per_epoch * cfg.train.epochs + (0 if witness else loop.warmup_steps)
    scheduler = warmup_cosine(optimizer, cfg.train.warmup_steps, scheduled)
    state = _restore(clip_model, optimizer, scheduler, rng)

    logger = RunLogger(loop.tracking_uri, loop.run_id, cfg.tracking.flush_timeout_s) if rank == 0 else None
    evaluate, publish, chaos = loop.evaluate, loop.publish, loop.chaos
    shard = ray.train.get_dataset_shard("train")
    poisoned = dict(ray.get(loop.poison_keys)) if loop.poison_keys is not None else {}
    patterns = class_patterns(loop.classes) if loop.classes is not None else []
    published = 0
    timer.add("setup", time.perf_counter() - setup_start[0], time.process_time() - setup_start[1])

    def timed(batches, phase: str = "data_wait"):
        """The batches of an iterator, the time spent waiting for each counted as `phase`."""
        it = iter(batches)
        while True:
            with timer(phase):
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    def train_step(batch: dict[str, np.ndarray], epoch: int) -> dict[str, float]:
        """One optimizer step on a numpy batch (re-matched or raw); returns the loss terms."""
        with timer("batch_to_tensors"):
            pixels = images_to_tensor(batch[schema.IMAGE], bundle.image_size, device)
            captions = [str(c) for c in (batch[CAPTION_USED] if CAPTION_USED in batch else batch[schema.CAPTION])]
            ids = bundle.tokenizer(captions).to(device)
            weights = _pair_weights(batch, device)
            content = torch.stack([identity.text_ids(captions), identity.image_ids(batch[schema.IMAGE])],
                                  dim=1).to(device)
        with timer("forward_loss"), bundle.autocast(device):
            loss, terms = defense.batch_loss(feature_model, clip_model, pixels, ids, cfg, epoch, generator, weights,
                                             content_ids=content)
        with timer("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timer("optimizer"):
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(clip_model.parameters(), cfg.train.grad_clip)
            scale = defense.lr_scale(cfg, epoch)          # e.g. SafeCLIP's low-LR CLIP epoch
            for group in optimizer.param_groups:
                group["lr"] *= scale
            optimizer.step()
            scheduler.step()                               # sets the scheduled LR again
            with torch.no_grad():
                clip_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        state.step += 1
        return terms

    def log_step(terms: dict[str, float], epoch: int, progress: dict[str, float] | None = None) -> None:
        """Rank 0, every `train.log_every` steps: the loss terms, the LR in force and (inside an epoch) its progress."""
        if logger and state.step % cfg.train.log_every == 0:
            lr = scheduler.get_last_lr()[0] * defense.lr_scale(cfg, epoch)
            with timer("logging"):
                logger.metrics(metric_names.prefixed(metric_names.TRAIN, terms) | {metric_names.TRAIN_LR: lr} | (progress or {}), step=state.step)

    judged_by_witness = False
    witness_start = (time.perf_counter(), time.process_time())
    if state.step == 0 and loop.warmup_steps > 0:
        # the re-match gate needs a model that has learnt something before it screens epoch 0: steps on the raw
        # stream's first rows (these rows are seen again, screened, in epoch 0)
        initial = _snapshot(clip_model, optimizer, scheduler) if witness else None
        feature_model.train()
        warm = ray.train.get_dataset_shard("warmup").iter_batches(batch_size=cfg.train.batch_size, drop_last=True,
                                                                   batch_format="numpy")
        for batch in timed(warm):
            log_step(train_step(batch, 0), 0)
            timer.marks.setdefault(metric_names.TIME_FIRST_STEP, time.time())
            if state.step >= loop.warmup_steps:
                break
        if initial is not None:     # the warmed-up model is the witness: it judges epoch 0, then the model restarts
            if rank == 0 and publish is not None:
                published = publish(clip_model, 0, state.step)
            _reset(initial, clip_model, optimizer, scheduler)
            state.step, judged_by_witness = 0, True
        timer.add("witness_total", time.perf_counter() - witness_start[0], time.process_time() - witness_start[1])

    for epoch in range(state.epoch, cfg.train.epochs):
        feature_model.train()
        start, seen, sums, n_batches = time.perf_counter(), 0, {}, 0
        tally = RematchTally(poisoned, patterns)
        publishing = rank == 0 and publish is not None and not (judged_by_witness and epoch == 0)
        if publishing:
            with timer("publish"):
                published = publish(clip_model, epoch, state.step)         # before the epoch's stream starts
        received = RowCount()
        epoch_cpu = time.process_time()
        for step_in_epoch, batch in enumerate(timed(shard.iter_batches(**_batches(cfg, epoch, rank)))):
            received.add(batch[schema.KEY])
            if len(batch[schema.KEY]) < cfg.train.batch_size:
                continue                    # the short tail: every rank trains equal full batches (DDP)
            maybe_die(chaos, rank, epoch, step_in_epoch)
            if publishing and step_in_epoch > 0 and publish.due(step_in_epoch):
                with timer("publish"):
                    published = publish(clip_model, epoch, state.step)
            tally.add(batch)
            terms = train_step(batch, epoch)
            timer.marks.setdefault(metric_names.TIME_FIRST_STEP, time.time())     # time to first step (benchmarks/)
            seen += len(batch[schema.KEY])
            n_batches += 1
            rate = seen * world / max(time.perf_counter() - start, 1e-9)       # every rank trains equal batches
            log_step(terms, epoch, {metric_names.PROGRESS_EPOCH: float(epoch), metric_names.PROGRESS_STEP: float(n_batches),
                             metric_names.PROGRESS_SAMPLES_PER_S: rate})
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
        elapsed = time.perf_counter() - start
        timer.add("epochs_total", elapsed, time.process_time() - epoch_cpu)
        state.epoch = epoch + 1
        metrics = {metric_names.EPOCH: float(epoch), metric_names.TRAIN_SAMPLES_PER_S_WORKER: seen / max(elapsed, 1e-9),
                   metric_names.TRAIN_EPOCH_SECONDS: elapsed, metric_names.TRAIN_BATCHES: float(n_batches), **received.metrics()}
        metrics |= {metric_names.train_epoch(k): v / max(n_batches, 1) for k, v in sums.items()}
        metrics |= tally.metrics(published)     # this worker's share of the stream
        if rank == 0:
            if evaluate is not None and (cfg.eval.every_epoch or state.epoch == cfg.train.epochs):
                with timer("evaluate"):
                    metrics |= metric_names.prefixed(metric_names.EVAL, evaluate(bundle, clip_model, device))
            metrics |= timer.metrics(metric_names.TIME_WORKER) | timer.marks        # cumulative over the run so far
            with timer("logging"):
                logger.metrics(metrics, step=epoch)
            with timer("checkpoint"), tempfile.TemporaryDirectory() as folder:
                save_checkpoint(folder, clip_model, optimizer, scheduler, state, rng)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics | timer.metrics(metric_names.TIME_WORKER) | timer.marks, checkpoint=None)
    if logger is not None:
        logger.close()                  # what an outage buffered is delivered before the worker ends
