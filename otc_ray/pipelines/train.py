"""`otc-ray train`: the driver side of a training run — data, the MLflow run, the trainer, the final report.

    result = run_training(load_config("jobs/configs/tiny.yaml", ["train.defense=otcclip"]))
    result.run_id, result.metrics["final/backdoor_asr"], result.checkpoint

Joins the stages: `prepare_data` (make / poison the shard sets), the read + re-match stream the workers consume
(`training_datasets`), the held-out evaluation inputs (`pipelines.evaluate`), the MLflow run (`track`) and the
TorchTrainer (`train.trainer.build_trainer`). A rerun with the same `name` resumes: Ray Train restores the
newest checkpoint of that run name and the same MLflow run continues (`otc-ray train` gives each new run a new name
unless asked to `--resume`). A training set poisoned by `otc-ray poison` sets the run's `poison.*` from its own
history (`prepare.carried_poison`). Status lines (Ray starting, the MLflow run and its UI link) go to stderr.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import ray

from ..config import Config
from ..credentials import move_secrets_to_env
from ..data.decode import good_rows
from ..data.ray_io import decoded_batches, in_memory_dataset, load_samples, read_in_driver
from ..model import check_image_size
from ..process_exit import SETUP_WAIT_S, setup_threads_ended
from ..track import metric_names
from ..track.mlflow_logger import RunLogger, start_or_resume_run, tracking_uri
from ..track.run_context import (PARENT_RUN_TAG, ShardSet, log_config, log_shard_sets, mark_model_development,
                                  run_link)
from ..train.chaos import chaos_spec
from ..train.defenses import get_defense
from ..train.evaluation import EpochEvaluator, final_report
from ..train.progress import EpochProgress
from ..train.loop import LoopConfig
from ..train.phases import PhaseTimer
from ..train.trainer import build_trainer, run_folder
from .evaluate import eval_inputs
from .prepare import TrainData, carried_poison, count_usable, data_name, prepare_data, shard_set_name
from .runtime import init_ray, side_by_side


ROW_OVERHEAD_BYTES = 256        # a decoded row's caption, key and metadata columns, roughly


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint: str | None
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)   # the driver's phase timers (metric_names.TIME_DRIVER/...)


def _poison_keys(cfg: Config, data: TrainData):
    """ObjectRef of {poisoned key: attack} from the manifest (detection metrics of the re-match stage), or None."""
    if data.manifest is None:
        return None
    from ..poison.manifest import read_manifest

    manifest = read_manifest(data.manifest, cfg.data.s3)
    return ray.put(dict(zip(manifest.column("key").to_pylist(), manifest.column("attack").to_pylist())))


def fits_cache(rows: int, cfg: Config) -> bool:
    """Whether `rows` decoded training rows ((S, S, 3) uint8 images plus caption and key) fit `data.cache_mb` and
    half of the object store Ray has: read and decoded once, they are then every epoch's input (a 5,000-pair
    epoch otherwise re-reads its shards in a dozen short-lived read tasks next to the training step)."""
    size = rows * (cfg.data.image_size ** 2 * 3 + ROW_OVERHEAD_BYTES)
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    return size <= min(cfg.data.cache_mb << 20, store / 2)


def training_datasets(cfg: Config, data: TrainData, rows: int) -> tuple[dict[str, ray.data.Dataset], object, int]:
    """The streams workers consume: "train", decoded good rows (of `rows` usable ones; held in the object store when
    they `fits_cache`, read and decoded in this process when the shards are small: `data.driver_read_mb`) through
    the re-match stage when the defense needs it, and, when the stage screens epoch 0,
    "warmup": the raw rows of the `rematch.warmup_steps` steps trained before epoch 0 so that the gate does not
    screen with an untrained model.

    Returns (datasets, publisher, warmup steps): the publisher (or None) is called by rank 0 at epoch starts and
    every `rematch.publish_every` steps with the current model, for the re-match actors.
    """
    if fits_cache(rows, cfg) and read_in_driver(data.train, cfg.data):
        ds = in_memory_dataset([good_rows(b) for b in decoded_batches(data.train, cfg.data)])
    else:
        ds = load_samples(data.train, cfg.data).map_batches(good_rows, batch_format="numpy")
        if fits_cache(rows, cfg):
            ds = ds.materialize()
    rematch = get_defense(cfg.train.defense).rematch(cfg)
    if rematch is None:
        return {"train": ds}, None, 0
    from ..rematch.stage import add_rematch_stage
    from ..rematch.weights import newest_checkpoint_model, weight_store
    from ..train.publish import WeightPublisher

    run = cfg.tracking.run_name or cfg.name
    store_name = f"otc-weights-{run}"
    checkpoints = run_folder(cfg)
    store = weight_store(store_name, recover_from=checkpoints)       # a restarted store resumes from a checkpoint
    journal = str(Path(cfg.output_dir).resolve() / "rematch" / f"flags-{run}.txt")
    resumed = newest_checkpoint_model(checkpoints) is not None       # Train resumes it: keep its earlier flags
    datasets = {"train": add_rematch_stage(ds, rematch, cfg.model, cfg.ot, weights=store, flag_journal=journal,
                                           resume_flags=resumed)}
    warmup = rematch.warmup_steps if rematch.start_epoch == 0 else 0
    if warmup > 0:
        datasets["warmup"] = ds.limit(warmup * cfg.train.batch_size * cfg.train.num_workers)
    return datasets, WeightPublisher(store_name, rematch), warmup


def say(text: str) -> None:
    """One status line on stderr, at once (stdout keeps the results: metrics, tables)."""
    print(text, file=sys.stderr, flush=True)


def _describe_run(cfg: Config, uri: str, run_id: str, data: TrainData, rows: int, test_rows: int,
                  parent_run_id: str | None) -> None:
    """What a person sees in MLflow beside the metrics: the experiment's kind (model development), the training and
    test shard sets as dataset inputs, the config as `config.yaml`, and the parent run (a demo's, a benchmark's)."""
    mark_model_development(uri, cfg.tracking.experiment)
    log_shard_sets(uri, run_id, [ShardSet(shard_set_name(data.train), data.train, "training", rows),
                                 ShardSet(shard_set_name(data.test), data.test, "evaluation", test_rows)])
    log_config(uri, run_id, cfg)
    if parent_run_id:
        RunLogger(uri, run_id).tags({PARENT_RUN_TAG: parent_run_id})


def run_training(cfg: Config, progress: bool = True, parent_run_id: str | None = None) -> TrainResult:
    """Prepare data, open the MLflow run (a child of `parent_run_id` when given), fit, evaluate the final model,
    log artifacts; returns the result. The config's secrets move to this process's environment first
    (`credentials.move_secrets_to_env`): what the workers, the MLflow params and `TrainResult.tracking_uri` get
    carries none."""
    start = time.perf_counter()
    timer = PhaseTimer(cpu_clock=time.thread_time)     # driver phases run on two threads at once
    cfg = move_secrets_to_env(cfg)
    check_image_size(cfg.model.arch, cfg.data.image_size)
    cfg, notes = carried_poison(cfg)
    for note in notes:
        say(note)
    say("starting Ray" + (f" at {cfg.ray.address}" if cfg.ray.address else "") + " ...")
    with timer("ray_init"):
        init_ray(cfg.ray)
    with timer("prepare_data"):
        data = prepare_data(cfg, progress)
    with timer("count_rows"):
        outcomes = count_usable(data.train, cfg)
    rows = outcomes["ok"]
    uri = tracking_uri(cfg)
    opened: list[str] = []          # the run's id as soon as it exists (a signal during set-up marks it KILLED)

    def open_run():
        with timer("eval_inputs"):
            inputs = eval_inputs(data.test, data.manifest, cfg.data, cfg.poison, cfg.eval)
        with timer("mlflow_setup"):
            run_id = start_or_resume_run(cfg, tags={"defense": cfg.train.defense, "attack": cfg.poison.attack_name,
                                                    "dataset": data_name(cfg, inputs[1].name),
                                                    "train_data": data.train, "test_data": data.test})
            opened.append(run_id)
            say(f"MLflow run {cfg.tracking.run_name or cfg.name} ({run_id}): "
                f"{run_link(uri, cfg.tracking.experiment, run_id)}")
            _describe_run(cfg, uri, run_id, data, rows, len(inputs[0].keys), parent_run_id)
        return inputs, run_id

    def streams():
        with timer("streams"):
            return training_datasets(cfg, data, rows)

    # the held-out inputs and the MLflow run beside the training stream (read into the object store when it fits):
    # both mostly wait, on Ray's read tasks and on the tracking store
    try:
        ((test, classes, attack), run_id), (datasets, publisher, warmup) = side_by_side(open_run, streams)
    except (KeyboardInterrupt, SystemExit):     # stopped during set-up: the run, once it exists, is KILLED too
        if setup_threads_ended(SETUP_WAIT_S) and opened:
            RunLogger(uri, opened[0], cfg.tracking.flush_timeout_s).finish(
                "KILLED", timeout_s=min(30.0, cfg.tracking.flush_timeout_s))
        raise
    logger = RunLogger(uri, run_id, cfg.tracking.flush_timeout_s)
    try:        # from here on the run exists: a signal or an error before fit() returns ends it KILLED or FAILED
        steps = max(1, rows // (cfg.train.batch_size * cfg.train.num_workers))
        evaluator = EpochEvaluator.create(cfg, test, classes, attack)
        loop = LoopConfig(cfg, run_id, uri, steps, evaluate=evaluator, publish=publisher, chaos=chaos_spec(),
                          poison_keys=_poison_keys(cfg, data), warmup_steps=warmup, classes=classes)
        logger.metrics({metric_names.DATA_OK: rows}
                       | {metric_names.data_skipped(k): n for k, n in outcomes.items() if k != "ok"}, step=0)
        timer.marks[f"{metric_names.TIME_DRIVER}/fit_start_unix_s"] = time.time()
        with timer("fit"), EpochProgress(cfg, uri, run_id, steps_per_epoch=steps) if progress else nullcontext():
            result = build_trainer(datasets, loop).fit()
    except (KeyboardInterrupt, SystemExit):        # Ctrl-C, or SIGTERM (the CLI turns it into SystemExit)
        logger.finish("KILLED", timeout_s=min(30.0, cfg.tracking.flush_timeout_s))
        raise
    except Exception:
        logger.finish("FAILED")
        raise
    checkpoint = None
    metrics = dict(result.metrics or {})
    if result.checkpoint:
        checkpoint = result.checkpoint.path
        if cfg.train.storage_path.startswith("s3://") and not checkpoint.startswith("s3://"):
            checkpoint = f"s3://{checkpoint}"
        with timer("final_report"), result.checkpoint.as_directory() as local:     # downloads when storage is remote
            metrics |= final_report(cfg, local, evaluator, logger)
    elapsed = time.perf_counter() - start
    phases = timer.metrics(metric_names.TIME_DRIVER) | timer.marks
    logger.metrics({metric_names.RUN_SECONDS: elapsed,
                    metric_names.RUN_SAMPLES_PER_S: rows * cfg.train.epochs / max(elapsed, 1e-9)} | phases,
                   step=cfg.train.epochs)
    logger.tags({"checkpoint": checkpoint or ""})
    logger.finish()
    return TrainResult(run_id, uri, metrics, checkpoint, elapsed, phases)
