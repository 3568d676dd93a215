"""One evaluation of a model on a held-out set in memory: every metric of docs/method.md (Metrics), as one flat dict.

    metrics = evaluate_arrays(encoder, test, info, attack, cfg.eval, train=train)   # EvalSet, DatasetInfo, AttackTruth
    print(format_metrics(metrics))

Reading the sets from shards and the attack from a poison manifest is the driver's job
(`otc_ray.pipelines.evaluate`: load_eval_set, resolve_attack, evaluate_model); nothing here
reads files or uses Ray.

Keys (rates in [0, 1], NaN when undefined; `*_count` are sample counts):
    zeroshot_top1, zeroshot_top5            labeled test rows, the set's classes and zero-shot templates
    linear_probe_acc, linear_probe_train_acc, linear_probe_train_count
                                            probe fitted on the `train` rows
    linear_probe_split_acc, linear_probe_split_train_acc, linear_probe_split_train_count
                                            no `train`: fitted on half of the test rows (by key hash),
                                            scored on the other half
    backdoor_asr, backdoor_asr_count        the trigger of the manifest (else of the config) on non-target rows;
                                            absent when the config's target is none of the classes (clean runs)
    targeted_asr, targeted_asr_count        the manifest's target images (targeted attacks only)
    retrieval_{i2t,t2i}_r{1,5}              image <-> caption on all good test rows (identical captions grouped)
    eval_count, eval_labeled_count          good test rows used (up to eval.num_eval), with a known class
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import EvalConfig
from ..data.class_info import DatasetInfo
from ..poison.select import keyed_hash
from ..poison.triggers import TriggerSpec
from .asr import evaluate_backdoor, evaluate_targeted
from .encoder import Encoder, encode_images, encode_texts
from .linear_probe import linear_probe_metrics
from .retrieval import retrieval_metrics
from .zeroshot import build_zeroshot_classifier, zeroshot_metrics


# ----------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class EvalSet:
    """Good rows of a shard set, sorted by key. keys (N,) str; images (N, S, S, 3) uint8; captions N str;
    labels (N,) int64 (-1 unknown)."""

    keys: np.ndarray
    images: np.ndarray
    captions: list[str]
    labels: np.ndarray

    def subset(self, mask: np.ndarray) -> "EvalSet":
        return EvalSet(self.keys[mask], self.images[mask], [c for c, m in zip(self.captions, mask) if m],
                       self.labels[mask])


# ----------------------------------------------------------------------------------------- attack
@dataclass(frozen=True)
class AttackTruth:
    """What the ASRs are measured against. spec/target: the backdoor trigger and target class name;
    source: "manifest", "config" or "base rate"; target_images (T, S, S, 3) uint8 and adversarial class names (T,)
    of a targeted manifest, or of the targets a clean run scores for `eval.targeted_base_rate` (None otherwise)."""

    spec: TriggerSpec
    target: str
    source: str
    target_images: np.ndarray | None = None
    adversarial: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------- metrics
def _split_mask(keys: np.ndarray) -> np.ndarray:
    """bool (N,): the probe-training half of a test set (keyed hash of each key, seed 0)."""
    return np.fromiter((keyed_hash(str(k), 0, b"probe-split") % 2 == 0 for k in keys), dtype=bool, count=len(keys))


def _linear_probe(encoder: Encoder, test_emb, test: EvalSet, num_classes: int, eval_cfg: EvalConfig,
                  train: EvalSet | None) -> dict[str, float]:
    if eval_cfg.linear_probe_train == 0:
        return {}
    if train is not None:
        out = linear_probe_metrics(encode_images(encoder, train.images, eval_cfg.batch_size), train.labels,
                                   test_emb, test.labels, num_classes, eval_cfg.linear_probe_c)
        return {**out, "linear_probe_train_count": float(len(train.keys))}
    fit = _split_mask(test.keys)
    if fit.all() or not fit.any():
        return {}
    mask = torch.from_numpy(fit)
    out = linear_probe_metrics(test_emb[mask], test.labels[fit], test_emb[~mask], test.labels[~fit], num_classes,
                               eval_cfg.linear_probe_c)
    return {"linear_probe_split_acc": out["linear_probe_acc"],
            "linear_probe_split_train_acc": out["linear_probe_train_acc"],
            "linear_probe_split_train_count": float(fit.sum())}


def evaluate_arrays(encoder: Encoder, test: EvalSet, info: DatasetInfo, attack: AttackTruth, eval_cfg: EvalConfig,
                    linear_probe: bool = True, train: EvalSet | None = None) -> dict[str, float]:
    """Every metric of `encoder` on an in-memory test set (keys as in the module docstring).

    linear_probe: fit the probe (on `train` when given, else on half of the test rows); the trainer's
    per-epoch evaluation skips it and runs it once on the final model.
    """
    bs, num_classes = eval_cfg.batch_size, len(info.classes)
    image_emb = encode_images(encoder, test.images, bs)
    metrics: dict[str, float] = {"eval_count": float(len(test.keys))}
    metrics.update(retrieval_metrics(image_emb, encode_texts(encoder, test.captions, bs), groups=test.captions))
    labeled = (test.labels >= 0) & (test.labels < num_classes)
    metrics["eval_labeled_count"] = float(labeled.sum())
    if not labeled.any():
        return metrics
    lab, lab_emb = test.subset(labeled), image_emb[torch.from_numpy(labeled)]
    weights = build_zeroshot_classifier(encoder, info.classes, info.zeroshot_templates, bs)
    metrics.update(zeroshot_metrics(lab_emb, lab.labels, weights))
    if linear_probe:
        metrics.update(_linear_probe(encoder, lab_emb, lab, num_classes, eval_cfg, train))
    if attack.source == "manifest" or attack.target in info.classes:
        # a manifest's target must be a class (label_of says which is missing); the config's default target of a
        # clean run on a user's classes may name none, and then there is no backdoor to measure
        seeds = np.array([keyed_hash(str(k), 0, b"eval-trigger") >> 1 for k in lab.keys], dtype=np.int64)
        metrics.update(evaluate_backdoor(encoder, lab.images, lab.labels, weights, info.label_of(attack.target),
                                         attack.spec, rng_seed=seeds, batch_size=bs))
    if attack.target_images is not None:
        adversarial = np.array([info.label_of(a) for a in attack.adversarial], dtype=np.int64)
        metrics.update(evaluate_targeted(encoder, attack.target_images, adversarial, weights, bs))
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """Two aligned columns, one metric a line: counts as integers, rates with 4 decimals, NaN as 'nan'."""
    width = max((len(k) for k in metrics), default=0)

    def fmt(k: str, v: float) -> str:
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        return f"{int(v)}" if k.endswith("_count") else f"{v:.4f}"

    return "\n".join(f"{k:<{width}}  {fmt(k, v):>10}" for k, v in metrics.items())
