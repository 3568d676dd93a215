"""Evaluation inside a training run: per-epoch metrics on rank 0, and the final report with plots.

The held-out set, the attack's ground truth and the class names are loaded once by the driver and
shipped to rank 0 through the object store (`EpochEvaluator`), so epochs evaluate from memory.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from ..config import Config
from ..data.class_info import DatasetInfo
from ..evaluate.model_encoder import ModelEncoder
from ..evaluate.report import AttackTruth, EvalSet, evaluate_arrays
from ..model_checkpoint import load_checkpoint_model
from ..track import metric_names
from ..track.mlflow_logger import RunLogger
from ..track.plots import plot_run
from .checkpoint import MODEL_FILE


@dataclass
class EpochEvaluator:
    """Picklable callable: (bundle, model, device) -> metrics, without the linear probe (final report has it)."""

    ref: ray.ObjectRef
    cfg: Config

    @staticmethod
    def create(cfg: Config, test: EvalSet, info: DatasetInfo, attack: AttackTruth) -> "EpochEvaluator":
        """Ship the held-out rows, classes and attack truth (read by the driver: pipelines.evaluate.eval_inputs)
        to the object store once."""
        return EpochEvaluator(ray.put((test, info, attack)), cfg)

    def __call__(self, bundle, model, device, linear_probe: bool = False) -> dict[str, float]:
        test, info, attack = ray.get(self.ref)
        encoder = ModelEncoder(replace(bundle, model=model), device=device, batch_size=self.cfg.eval.batch_size)
        try:
            return evaluate_arrays(encoder, test, info, attack, self.cfg.eval, linear_probe=linear_probe)
        finally:
            model.train()


def final_report(cfg: Config, checkpoint: str, evaluator: EpochEvaluator, logger: RunLogger) -> dict[str, float]:
    """Evaluate the final checkpoint (a local folder) with the linear probe; log the metrics and plots."""
    bundle = load_checkpoint_model(str(Path(checkpoint) / MODEL_FILE), cfg.model)
    metrics = metric_names.prefixed(metric_names.FINAL, evaluator(bundle, bundle.model, "cpu", linear_probe=True))
    logger.metrics(metrics, step=cfg.train.epochs)
    if not logger.flush():                          # the plots read the run's metric history: the server is away,
        return metrics                              # and the run's `finish` names what it did not deliver
    with tempfile.TemporaryDirectory() as folder:
        for path in plot_run(logger.uri, logger.run_id, Path(folder)):
            logger.artifact(str(path), "plots")
    return metrics
