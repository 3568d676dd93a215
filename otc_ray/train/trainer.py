"""`otc-ray train`: the driver side — data preparation, the MLflow run, the TorchTrainer, the final report.

    result = run_training(load_config("jobs/configs/tiny.yaml", ["train.defense=otcclip"]))
    result.run_id, result.metrics["eval/backdoor_asr"], result.checkpoint

Data: `data.train`/`data.test` shard sets when given; otherwise the built-in data set is generated
(and, with `poison.attack`, poisoned) once under `<output_dir>/data/`, and reused by later runs.
A rerun with the same `name` resumes: Ray Train restores the newest checkpoint of that run name and
the same MLflow run continues.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import Config, content_digest, replace, to_dict
from ..data.decode import good_rows
from ..data.make import make_shards
from ..data.ray_io import count_outcomes, load_samples
from ..data.shards import read_info
from ..poison.transform import poison_shards
from ..track.mlflow_logger import RunLogger, start_or_resume_run, tracking_uri
from .chaos import chaos_spec
from .progress import EpochProgress
from .evaluation import EpochEvaluator, final_report
from .loop import train_loop_per_worker


@dataclass(frozen=True)
class TrainData:
    """Shard sets of one run: train (possibly poisoned), test, and the poison manifest folder (or None)."""

    train: str
    test: str
    manifest: str | None


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint: str | None
    seconds: float


def prepare_data(cfg: Config, progress: bool = True) -> TrainData:
    """Resolve (and generate / poison once, cached by content hash) the shard sets the run needs."""
    d, root = cfg.data, Path(cfg.output_dir).resolve() / "data"
    gen_key = {"dataset": d.dataset, "seed": d.seed, "image_size": d.image_size, "tint": d.tint,
               "per_shard": d.samples_per_shard, "format": d.image_format}

    def built_in(split: str, num: int) -> str:
        out = root / f"{d.dataset}-{split}-{num}-{content_digest(gen_key)}"
        if read_info(str(out), d.s3) is None:
            make_shards(d, split, num, str(out), "wds", progress=progress)
        return str(out)

    train = d.train or built_in("train", d.num_train)
    test = d.test or built_in("test", d.num_test)
    if cfg.poison.attack == "none":
        return TrainData(train, test, None)
    source = train
    for attack in cfg.poison.attack.split("+"):          # "backdoor+targeted" composes two transforms
        step = replace(cfg, poison__attack=attack).poison
        out = root / f"poisoned-{attack}-{content_digest({'in': source, **to_dict(step)})}"
        if read_info(str(out), d.s3) is None:
            poison_shards(source, str(out), step, d, target_source=test, progress=progress)
        source = str(out)
    return TrainData(source, test, source)


def _outcomes(path: str, cfg: Config) -> dict[str, int]:
    """{"ok": good samples, reason: samples skipped for it} of a shard set: one read-and-decode pass, so a
    corrupt or truncated shard shows up in the run's data/* metrics instead of vanishing silently."""
    outcomes = count_outcomes(load_samples(path, cfg.data))
    if not outcomes.get("ok"):
        raise ValueError(f"no usable samples in {path}: {outcomes}")
    return outcomes


def _poison_keys(cfg: Config, data: TrainData):
    """ObjectRef of the manifest's poisoned keys (detection metrics of the re-match stage), or None."""
    if data.manifest is None:
        return None
    from ..poison.manifest import read_manifest

    return ray.put(read_manifest(data.manifest, cfg.data.s3).column("key").to_pylist())


def build_trainer(cfg: Config, train_ds: ray.data.Dataset, loop_config: dict) -> TorchTrainer:
    """TorchTrainer for the config: workers, CPUs/GPUs, storage, checkpoints kept, failures tolerated."""
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    storage = t.storage_path or str(Path(cfg.output_dir).resolve() / "ray_results")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.tracking.run_name or cfg.name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
        datasets={"train": train_ds},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )


def stage_config(cfg: Config):
    """The re-match settings a defense trains with, or None when its stream has no re-match stage.

    roclip is the RoCLIP baseline by definition (global nearest caption, every image, no OT): method and gate
    are fixed. otcclip uses `rematch` as configured (method none disables the stage, for ablations).
    """
    if cfg.train.defense == "roclip":
        return replace(cfg, rematch__method="roclip", rematch__gate="none").rematch
    if cfg.train.defense == "otcclip" and cfg.rematch.method != "none":
        return cfg.rematch
    return None


def training_dataset(cfg: Config, data: TrainData) -> tuple[ray.data.Dataset, object]:
    """The stream workers consume: decoded good rows, through the re-match stage when the defense needs it.

    Returns (dataset, publisher): the publisher (or None) is called by rank 0 at each epoch start with the
    current model, so the re-match actors score that epoch with the weights as they stand.
    """
    ds = load_samples(data.train, cfg.data).map_batches(good_rows, batch_format="numpy")
    rematch = stage_config(cfg)
    if rematch is None:
        return ds, None
    from ..rematch.stage import add_rematch_stage
    from ..rematch.weights import weight_store
    from .publish import EpochPublisher

    store_name = f"otc-weights-{cfg.tracking.run_name or cfg.name}"
    weight_store(store_name)
    return (add_rematch_stage(ds, rematch, cfg.model, cfg.ot, weights=store_name),
            EpochPublisher(store_name, rematch))


def run_training(cfg: Config, progress: bool = True) -> TrainResult:
    """Prepare data, open the MLflow run, fit, evaluate the final model, log artifacts; returns the result."""
    from ..runtime import init_ray

    start = time.perf_counter()
    init_ray(cfg.ray)
    data = prepare_data(cfg, progress)
    outcomes = _outcomes(data.train, cfg)
    uri = tracking_uri(cfg)
    run_id = start_or_resume_run(cfg, tags={"defense": cfg.train.defense, "attack": cfg.poison.attack,
                                            "dataset": cfg.data.dataset, "train_data": data.train})
    train_ds, publisher = training_dataset(cfg, data)
    rows = outcomes["ok"]
    steps = max(1, rows // (cfg.train.batch_size * cfg.train.num_workers))
    evaluator = EpochEvaluator.create(cfg, data.test, data.manifest)
    loop_config = {"config": to_dict(cfg), "run_id": run_id, "tracking_uri": uri, "steps_per_epoch": steps,
                   "evaluate": evaluator, "publish": publisher, "chaos": chaos_spec(),
                   "poison_keys": _poison_keys(cfg, data)}
    logger = RunLogger(uri, run_id)
    logger.metrics({"data/ok": rows} | {f"data/skipped_{k}": n for k, n in outcomes.items() if k != "ok"}, step=0)
    try:
        with EpochProgress(cfg, uri, run_id) if progress else nullcontext():
            result = build_trainer(cfg, train_ds, loop_config).fit()
    except Exception:
        logger.finish("FAILED")
        raise
    checkpoint = None
    metrics = dict(result.metrics or {})
    if result.checkpoint:
        checkpoint = result.checkpoint.path
        if cfg.train.storage_path.startswith("s3://") and not checkpoint.startswith("s3://"):
            checkpoint = f"s3://{checkpoint}"
        with result.checkpoint.as_directory() as local:       # downloads when storage is remote
            metrics |= final_report(cfg, local, evaluator, logger)
    elapsed = time.perf_counter() - start
    logger.metrics({"run/seconds": elapsed, "run/samples_per_s": rows * cfg.train.epochs / max(elapsed, 1e-9)},
                   step=cfg.train.epochs)
    logger.tags({"checkpoint": checkpoint or ""})
    logger.finish()
    return TrainResult(run_id, uri, metrics, checkpoint, elapsed)
