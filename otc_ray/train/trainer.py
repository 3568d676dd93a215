"""The TorchTrainer of a run: workers, resources, storage, checkpoints kept, failures tolerated.

    trainer = build_trainer({"train": stream}, LoopConfig(cfg, run_id, uri, steps_per_epoch, ...))
    result = trainer.fit()

The trainer trains: the shard sets, the re-match stream, the MLflow run and the final report are joined by the
driver (`otc_ray.pipelines.train.run_training`); which re-match settings a defense streams with is the defense's
own (`defenses.get_defense(cfg.train.defense).rematch(cfg)`).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import Config
from .loop import LoopConfig, train_loop_per_worker


def ingest_options(preserve_order: bool):
    """Ray Data options of the training streams: Train's defaults, blocks delivered in order when asked (a seeded
    run then trains on the same batches in the same order; without it, block arrival under load decides)."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = preserve_order
    return options


def run_folder(cfg: Config) -> str:
    """The Ray Train run folder of `cfg` (its checkpoints): train.storage_path (or <output_dir>/ray_results) / name."""
    storage = cfg.train.storage_path or str(Path(cfg.output_dir).resolve() / "ray_results")
    return f"{storage.rstrip('/')}/{cfg.tracking.run_name or cfg.name}"


class _KeepCtrlC(TorchTrainer):
    """A TorchTrainer that leaves Ctrl-C to the process: Ray Train's own SIGINT handler (installed by `fit`) aborts
    the run and the command ends with status 1, the MLflow run left RUNNING. Without it, SIGINT is the process's
    KeyboardInterrupt (`otc_ray.process_exit`): the run is marked KILLED, Ray is shut down and the command exits
    130, as after SIGTERM."""

    def _register_sigint_handler(self, controller) -> None:
        return None


def build_trainer(datasets: dict[str, ray.data.Dataset], loop: LoopConfig) -> TorchTrainer:
    """TorchTrainer for `loop.config`: workers, CPUs/GPUs, storage, checkpoints kept, failures tolerated; every
    worker runs `train_loop_per_worker(loop)` on its share of `datasets` ("train": the stream; "warmup": raw rows
    for `loop.warmup_steps`, when there are any)."""
    cfg = loop.config
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    storage, name = run_folder(cfg).rsplit("/", 1)
    return _KeepCtrlC(
        partial(train_loop_per_worker, loop),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(t.preserve_order)),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )
