"""Poison detection quality of the re-matching flags, and the damage re-captioning does to clean pairs.

    detection_metrics(flags, poisoned)                       # boolean (N,) each
    detection_metrics(flags, manifest_keys, keys=keys)       # ground truth as a set of sample keys
    detection_auroc(suspicion, poisoned)                     # threshold-free separation of a score
    damage_metrics(clean, original_class, new_class)

Undefined ratios (no flags, no poison, no clean samples) are NaN, not 0 or 1.
"""
from __future__ import annotations

from typing import Any, Collection, Sequence

import numpy as np

from otc_ray.evaluate._tensors import as_mask, ratio


def poison_mask(keys: Sequence[str], poison_keys: Collection[str]) -> np.ndarray:
    """bool (N,): whether each sample key is in the ground-truth poison set."""
    truth = set(poison_keys)
    return np.fromiter((k in truth for k in keys), dtype=bool, count=len(keys))


def detection_metrics(flags: Any, poisoned: Any, keys: Sequence[str] | None = None) -> dict[str, float]:
    """Precision / recall / F1 of per-sample flags (N,) against the ground truth.

    poisoned: bool (N,) aligned with `flags`, or (when `keys` (N,) is given) a collection of poisoned keys.
    Also returns the flag rate and the confusion counts (as floats, for MLflow).
    """
    f = as_mask(flags, "flags")
    if keys is not None:
        if len(keys) != len(f):
            raise ValueError(f"keys has {len(keys)} entries, flags {len(f)}")
        p = poison_mask(keys, poisoned)
    else:
        p = as_mask(poisoned, "poisoned", len(f))
    tp, fp, fn = int((f & p).sum()), int((f & ~p).sum()), int((~f & p).sum())
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "detect_precision": precision,
        "detect_recall": recall,
        "detect_f1": ratio(2 * tp, 2 * tp + fp + fn),
        "detect_flag_rate": ratio(tp + fp, len(f)),
        "detect_tp": float(tp),
        "detect_fp": float(fp),
        "detect_fn": float(fn),
        "detect_tn": float(len(f) - tp - fp - fn),
    }


def detection_auroc(scores: Any, poisoned: Any) -> dict[str, float]:
    """{"detect_auroc"}: P(score of a poisoned sample > score of a clean one), ties counting 1/2.

    scores: float (N,), higher = more suspicious; poisoned: bool (N,). NaN without both classes.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise ValueError(f"scores must be finite and 1-D (N,), got shape {s.shape}")
    p = as_mask(poisoned, "poisoned", len(s))
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return {"detect_auroc": float("nan")}
    ranks = _average_ranks(s)
    u = ranks[p].sum() - n_pos * (n_pos + 1) / 2.0          # Mann-Whitney U of the poisoned scores
    return {"detect_auroc": float(u / (n_pos * n_neg))}


def damage_metrics(clean: Any, original_class: Any, new_class: Any) -> dict[str, float]:
    """{"damage"}: share of clean samples whose training caption now names another class.

    clean: bool (N,); original_class, new_class: int (N,) — the class of the sample's own caption and of
    the caption it is trained with (equal when unchanged). Also returns the count behind it.
    """
    c = as_mask(clean, "clean")
    orig, new = np.asarray(original_class), np.asarray(new_class)
    if orig.shape != c.shape or new.shape != c.shape:
        raise ValueError(f"clean {c.shape}, original_class {orig.shape}, new_class {new.shape} must all be (N,)")
    changed = int((orig[c] != new[c]).sum())
    return {"damage": ratio(changed, int(c.sum())), "damage_count": float(changed)}


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x (N,), ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])    # first index of each tie group
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0                                           # mean of ranks start+1..end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks
