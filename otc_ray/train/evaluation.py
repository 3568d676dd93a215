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
from ..evaluate.model_encoder import ModelEncoder, load_checkpoint_model
from ..evaluate.report import evaluate_arrays, load_eval_set, resolve_attack, shard_set_classes
from ..track.mlflow_logger import RunLogger, metric_history
from .checkpoint import MODEL_FILE


@dataclass
class EpochEvaluator:
    """Picklable callable: (bundle, model, device) -> metrics, without the linear probe (final report has it)."""

    ref: ray.ObjectRef
    cfg: Config

    @staticmethod
    def create(cfg: Config, test_path: str, manifest: str | None) -> "EpochEvaluator":
        inputs = (load_eval_set(test_path, cfg.data, cfg.eval.num_eval), shard_set_classes(test_path, cfg.data),
                  resolve_attack(manifest, cfg.poison, cfg.data))
        return EpochEvaluator(ray.put(inputs), cfg)

    def __call__(self, bundle, model, device, linear_probe: bool = False) -> dict[str, float]:
        test, info, attack = ray.get(self.ref)
        encoder = ModelEncoder(replace(bundle, model=model), device=device, batch_size=self.cfg.eval.batch_size)
        try:
            return evaluate_arrays(encoder, test, info, attack, self.cfg.eval, linear_probe=linear_probe)
        finally:
            model.train()


def _plot(uri: str, run_id: str, folder: Path) -> list[Path]:
    """ASR and zero-shot accuracy per epoch (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("eval/zeroshot_top1", "zero-shot top-1"), ("eval/backdoor_asr", "backdoor ASR"),
                       ("eval/targeted_asr", "targeted ASR")):
        points = sorted(metric_history(uri, run_id, key))
        if points:
            ax.plot([p[0] + 1 for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    path = folder / "asr_accuracy_per_epoch.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def final_report(cfg: Config, checkpoint: str, evaluator: EpochEvaluator, logger: RunLogger) -> dict[str, float]:
    """Evaluate the final checkpoint (a local folder) with the linear probe; log the metrics and plots."""
    bundle = load_checkpoint_model(str(Path(checkpoint) / MODEL_FILE), cfg.model)
    metrics = {f"final/{k}": v for k, v in evaluator(bundle, bundle.model, "cpu", linear_probe=True).items()}
    logger.metrics(metrics, step=cfg.train.epochs)
    with tempfile.TemporaryDirectory() as folder:
        for path in _plot(logger.uri, logger.run_id, Path(folder)):
            logger.artifact(str(path), "plots")
    return metrics
