"""Zero-shot classification: a (d, C) classifier from class names x prompt templates, top-k accuracy.

    weights = build_zeroshot_classifier(encoder, classnames, templates)      # (d, C)
    zeroshot_metrics(image_emb, labels, weights)   # {"zeroshot_top1": ..., "zeroshot_top5": ...}

Per class: the mean of the L2-normalized template embeddings, renormalized (CLIP / CLIP_benchmark).
Ties between logits go to the lower class index everywhere (argmax predictions and top-k agree).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from otc_ray.evaluate._tensors import as_embeddings, as_labels
from otc_ray.evaluate.encoder import Encoder, encode_images, encode_texts

PLACEHOLDER = "{c}"


def expand_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts in class-major order: C * T strings, prompt [c * T + t] = templates[t] with {c} -> classnames[c]."""
    if not classnames or not templates:
        raise ValueError(f"need >= 1 class name and >= 1 template, got {len(classnames)} and {len(templates)}")
    bad = [t for t in templates if PLACEHOLDER not in t]
    if bad:
        raise ValueError(f"templates must contain the placeholder {PLACEHOLDER!r}; these do not: {bad[:3]}")
    return [t.replace(PLACEHOLDER, c) for c in classnames for t in templates]


def classifier_from_text_embeddings(text_emb: Any) -> torch.Tensor:
    """text_emb (C, T, d): template embeddings per class -> zero-shot weights (d, C), unit columns."""
    t = torch.as_tensor(text_emb).detach().to("cpu", torch.float32)
    if t.ndim != 3 or 0 in t.shape:
        raise ValueError(f"text embeddings must be (C, T, d) with no empty axis, got {tuple(t.shape)}")
    return F.normalize(F.normalize(t, dim=-1).mean(dim=1), dim=-1).T.contiguous()


def build_zeroshot_classifier(encoder: Encoder, classnames: Sequence[str], templates: Sequence[str],
                              batch_size: int = 256) -> torch.Tensor:
    """Encode every (class, template) prompt and average per class -> weights (d, C)."""
    emb = encode_texts(encoder, expand_templates(classnames, templates), batch_size)   # (C*T, d)
    return classifier_from_text_embeddings(emb.reshape(len(classnames), len(templates), -1))


def class_index(classnames: Sequence[str], name: str) -> int:
    """Index of class `name` (e.g. the backdoor target from the config) in `classnames`."""
    try:
        return list(classnames).index(name)
    except ValueError:
        raise ValueError(f"class {name!r} is not one of the {len(classnames)} classes {list(classnames)}") from None


def zeroshot_logits(image_emb: Any, weights: Any) -> torch.Tensor:
    """Cosine logits (N, C) of image embeddings (N, d) against zero-shot weights (d, C)."""
    w = torch.as_tensor(weights).detach().to("cpu", torch.float32)
    if w.ndim != 2:
        raise ValueError(f"zero-shot weights must be (d, C), got shape {tuple(w.shape)}")
    return as_embeddings(image_emb, "image embeddings", dim=w.shape[0]) @ w


def zeroshot_predict(image_emb: Any, weights: Any) -> torch.Tensor:
    """Predicted class per image: int64 (N,) (ties -> lower class index)."""
    return zeroshot_logits(image_emb, weights).argmax(dim=1)


def topk_accuracy(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of rows whose label ranks < k} for logits (N, C), labels (N,) in [0, C).

    Rank of the label = classes scoring strictly higher + lower-index classes scoring equal (so k = 1
    matches argmax). k larger than C counts as C (accuracy 1.0). N = 0 gives NaN.
    """
    lg = torch.as_tensor(logits).detach().cpu()
    if lg.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(lg.shape)}")
    y = as_labels(labels, "labels", lg.shape[0], num_classes=lg.shape[1])
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    true = lg.gather(1, y[:, None])                                     # (N, 1)
    lower = torch.arange(lg.shape[1])[None, :] < y[:, None]             # (N, C)
    rank = ((lg > true) | ((lg == true) & lower)).sum(dim=1)            # (N,)
    n = lg.shape[0]
    return {k: (float((rank < k).sum()) / n if n else float("nan")) for k in ks}


def zeroshot_metrics(image_emb: Any, labels: Any, weights: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"zeroshot_top1", "zeroshot_top5", ...} for image embeddings (N, d), labels (N,), weights (d, C)."""
    acc = topk_accuracy(zeroshot_logits(image_emb, weights), labels, ks)
    return {f"zeroshot_top{k}": v for k, v in acc.items()}


def evaluate_zeroshot(encoder: Encoder, images: np.ndarray, labels: Any, classnames: Sequence[str],
                      templates: Sequence[str], batch_size: int = 256,
                      weights: torch.Tensor | None = None) -> dict[str, float]:
    """Zero-shot top-1/top-5 of `encoder` on uint8 images (N, H, W, 3) with labels (N,).

    Pass `weights` (from `build_zeroshot_classifier`) to reuse one classifier for accuracy and ASR.
    """
    if weights is None:
        weights = build_zeroshot_classifier(encoder, classnames, templates, batch_size)
    elif weights.shape[-1] != len(classnames):
        raise ValueError(f"weights have {weights.shape[-1]} classes, classnames {len(classnames)}")
    return zeroshot_metrics(encode_images(encoder, images, batch_size), labels, weights)
