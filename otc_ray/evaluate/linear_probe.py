"""Linear probe: multinomial logistic regression on frozen image embeddings, accuracy on a test split.

Fixed recipe (deterministic, no tuning): features standardized with the train mean/std, float64,
objective ``mean cross-entropy + ||W||^2 / (2 c N)`` (sklearn's ``C = c`` convention; bias not
penalized), minimized by full-batch L-BFGS with a strong-Wolfe line search from zero weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from otc_ray.evaluate._tensors import as_labels
from otc_ray.evaluate.encoder import Encoder, encode_images


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe. mean, std: (d,); weight: (d, C); bias: (C,); all float64."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: Any) -> torch.Tensor:
        """features (N, d) -> logits (N, C), float64."""
        x = _features(features, "features", dim=self.mean.shape[0])
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, features: Any) -> torch.Tensor:
        """features (N, d) -> predicted class (N,) int64."""
        return self.logits(features).argmax(dim=1)


def fit_linear_probe(features: Any, labels: Any, num_classes: int | None = None, c: float = 1.0,
                     max_iter: int = 300) -> LinearProbe:
    """Fit the probe on features (N, d) and integer labels (N,) in [0, num_classes) (default max + 1)."""
    x = _features(features, "train features")
    n, d = x.shape
    if n == 0:
        raise ValueError("linear probe needs >= 1 training sample, got 0")
    if c <= 0 or max_iter < 1:
        raise ValueError(f"need c > 0 and max_iter >= 1, got c={c}, max_iter={max_iter}")
    y0 = as_labels(labels, "train labels", n)
    num_classes = int(y0.max()) + 1 if num_classes is None else num_classes
    y = as_labels(y0, "train labels", n, num_classes=num_classes)
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    weight = torch.zeros(d, num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    l2 = 1.0 / (2.0 * c * n)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean=mean, std=std, weight=weight.detach(), bias=bias.detach())


def linear_probe_metrics(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                         num_classes: int | None = None, c: float = 1.0, max_iter: int = 300) -> dict[str, float]:
    """{"linear_probe_acc": test accuracy, "linear_probe_train_acc": train accuracy}.

    train_features (N, d), train_labels (N,), test_features (M, d), test_labels (M,); classes default to
    the largest label in either split + 1.
    """
    test_x = _features(test_features, "test features")
    if num_classes is None:
        both = [as_labels(train_labels, "train labels", len(train_labels)),
                as_labels(test_labels, "test labels", test_x.shape[0])]
        num_classes = int(torch.cat(both).max()) + 1
    probe = fit_linear_probe(train_features, train_labels, num_classes, c, max_iter)
    test_y = as_labels(test_labels, "test labels", test_x.shape[0], num_classes=num_classes)
    train_y = as_labels(train_labels, "train labels", len(train_labels), num_classes=num_classes)
    return {
        "linear_probe_acc": _accuracy(probe.predict(test_x), test_y),
        "linear_probe_train_acc": _accuracy(probe.predict(train_features), train_y),
    }


def evaluate_linear_probe(encoder: Encoder, train_images: np.ndarray, train_labels: Any, test_images: np.ndarray,
                          test_labels: Any, num_classes: int | None = None, c: float = 1.0,
                          batch_size: int = 256) -> dict[str, float]:
    """Linear-probe accuracy of `encoder`'s frozen image embeddings; images uint8 (N, H, W, 3)."""
    return linear_probe_metrics(encode_images(encoder, train_images, batch_size), train_labels,
                                encode_images(encoder, test_images, batch_size), test_labels, num_classes, c)


def _features(x: Any, name: str, dim: int | None = None) -> torch.Tensor:
    t = (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach().to("cpu", torch.float64)
    if t.ndim != 2 or (dim is not None and t.shape[1] != dim):
        raise ValueError(f"{name} must be (N, {dim if dim is not None else 'd'}), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain non-finite values")
    return t


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean()) if len(y) else float("nan")
