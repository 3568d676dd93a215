"""Input coercion and checks shared by the metric modules (array-likes in, CPU tensors out)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def as_embeddings(x: Any, name: str, dim: int | None = None) -> torch.Tensor:
    """float32 CPU (N, d); rows L2-normalized. Raises ValueError naming `name` on a bad shape."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} has dimension {t.shape[1]}, expected {dim}")
    return F.normalize(t.to("cpu", torch.float32), dim=1)


def as_labels(y: Any, name: str, n: int, num_classes: int | None = None) -> torch.Tensor:
    """int64 CPU (n,), every value in [0, num_classes) when num_classes is given."""
    if isinstance(y, torch.Tensor):
        ok, t = not (y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool), y.detach().cpu()
    else:
        a = np.asarray(y)
        ok = a.dtype.kind in "iu" or a.size == 0
        t = torch.from_numpy(a.astype(np.int64)) if ok else None
    if not ok:
        raise ValueError(f"{name} must hold integer class indices, got dtype {getattr(y, 'dtype', type(y).__name__)}")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    t = t.to(torch.int64)
    if num_classes is not None and n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{int(t.min())}, {int(t.max())}]")
    return t


def as_mask(x: Any, name: str, n: int | None = None) -> np.ndarray:
    """bool numpy (n,) from a boolean (or 0/1) array-like."""
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(f"{name} must have shape ({'N' if n is None else n},), got {a.shape}")
    if a.dtype != bool:
        if a.size and not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got dtype {a.dtype}")
        a = a.astype(bool)
    return a


def ratio(num: int, den: int) -> float:
    """num / den as a float; NaN when den == 0 (an undefined metric, not a perfect or failed one)."""
    return float(num) / float(den) if den else float("nan")
