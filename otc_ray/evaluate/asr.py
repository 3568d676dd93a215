"""Attack success rates, with the ONE backdoor-ASR definition of this project (docs/method.md, Metrics).

- Backdoor ASR: among triggered test images whose true class is not the target, the fraction that the
  zero-shot classifier (the same weights as clean accuracy) predicts as the target.
- Targeted ASR: the fraction of the attacked target images predicted as their adversarial class.
Each returns the rate and the number of images it was computed on (rate NaN when that number is 0).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from otc_ray.evaluate._tensors import as_labels, ratio
from otc_ray.evaluate.encoder import Encoder, encode_images
from otc_ray.evaluate.zeroshot import zeroshot_predict
from otc_ray.poison.triggers import TriggerSpec, apply_trigger


def backdoor_asr_from_predictions(predictions: Any, labels: Any, target: int) -> dict[str, float]:
    """predictions (N,), true labels (N,) of triggered images, target class index ->
    {"backdoor_asr", "backdoor_asr_count"}; images whose label is `target` are excluded."""
    labels_t = as_labels(labels, "labels", len(labels))
    pred = as_labels(predictions, "predictions", len(labels_t))
    keep = labels_t != target
    hits = int((pred[keep] == target).sum())
    n = int(keep.sum())
    return {"backdoor_asr": ratio(hits, n), "backdoor_asr_count": float(n)}


def backdoor_asr(triggered_emb: Any, labels: Any, weights: Any, target: int) -> dict[str, float]:
    """Backdoor ASR from embeddings (N, d) of triggered images, labels (N,), zero-shot weights (d, C)."""
    _check_class(target, weights, "target")
    return backdoor_asr_from_predictions(zeroshot_predict(triggered_emb, weights), labels, target)


def targeted_asr_from_predictions(predictions: Any, adversarial: Any) -> dict[str, float]:
    """predictions (T,) for the T target images, adversarial class per image (T,) or one int ->
    {"targeted_asr", "targeted_asr_count"}."""
    pred = as_labels(predictions, "predictions", len(predictions))
    adv = _broadcast_classes(adversarial, len(pred))
    return {"targeted_asr": ratio(int((pred == adv).sum()), len(pred)), "targeted_asr_count": float(len(pred))}


def targeted_asr(target_emb: Any, adversarial: Any, weights: Any) -> dict[str, float]:
    """Targeted ASR from target-image embeddings (T, d), adversarial classes (T,) or int, weights (d, C)."""
    adv = _broadcast_classes(adversarial, len(target_emb))
    for a in adv.unique().tolist():
        _check_class(a, weights, "adversarial class")
    return targeted_asr_from_predictions(zeroshot_predict(target_emb, weights), adv)


def evaluate_backdoor(encoder: Encoder, images: np.ndarray, labels: Any, weights: Any, target: int,
                      spec: TriggerSpec, rng_seed: Sequence[int] | np.ndarray | None = None,
                      batch_size: int = 256) -> dict[str, float]:
    """Trigger the non-target images of a clean test set (uint8 (N, H, W, 3), labels (N,)) and score them.

    `rng_seed` (only for random trigger locations): one seed per image (N,); default the image's index
    in `images`, so an image's trigger position does not depend on which others are evaluated.
    """
    _check_class(target, weights, "target")
    labels_t = as_labels(labels, "labels", len(images))
    seeds = np.arange(len(images)) if rng_seed is None else np.asarray(rng_seed)
    if seeds.shape != (len(images),):
        raise ValueError(f"rng_seed must hold one seed per image ({len(images)},), got shape {seeds.shape}")
    keep = (labels_t != target).numpy()
    if not keep.any():
        return {"backdoor_asr": float("nan"), "backdoor_asr_count": 0.0}
    triggered = apply_trigger(np.asarray(images)[keep], spec, rng_seed=seeds[keep])
    return backdoor_asr(encode_images(encoder, triggered, batch_size), labels_t[keep], weights, target)


def evaluate_targeted(encoder: Encoder, target_images: np.ndarray, adversarial: Any, weights: Any,
                      batch_size: int = 256) -> dict[str, float]:
    """Targeted ASR of `encoder` on the attacked target images, uint8 (T, H, W, 3)."""
    return targeted_asr(encode_images(encoder, target_images, batch_size), adversarial, weights)


def _broadcast_classes(classes: Any, n: int) -> torch.Tensor:
    if np.ndim(classes) == 0:
        return torch.full((n,), int(classes), dtype=torch.int64)
    return as_labels(classes, "adversarial classes", n)


def _check_class(index: int, weights: Any, name: str) -> None:
    num_classes = torch.as_tensor(weights).shape[-1]
    if not 0 <= int(index) < num_classes:
        raise ValueError(f"{name} index {index} is outside the classifier's {num_classes} classes")
