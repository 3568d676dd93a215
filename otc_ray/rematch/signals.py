"""Per-sample poison evidence for the re-matching gate (docs/method.md, The gate). Pure torch, no Ray.

Four signals, each computed for the block's own (image, caption) pairs, each oriented so that LOW = suspicious:

    cosine         g_i . t_i, the global similarity of the pair; strong before a backdoor forms, then inverted
    agreement      mean text cosine between the own caption and the captions of the image's nearest non-duplicate
                   pool images (`gates.neighbour_agreement`); also shaped by what the encoder has learned
    concentration  minus the OT plan's concentration: for each real caption word, the largest share of its
                   transport mass on one patch, averaged over the words; a backdoored caption's words pile onto
                   the trigger, so a high concentration is suspicious, and it keeps its power after the backdoor forms
    pixel_agreement  the same agreement over the image's nearest pool images by pixel signature
                   (`otc_ray.identity.pixel_signatures`): a neighbour graph no training shapes, so a trigger the model
                   has learnt does not move it (a stand-in, on these small data sets, for a frozen image encoder
                   trained apart; off by default). Its caption side is the model's text embedding: a model-free one
                   (tf-idf word overlap) ranks the poison as well but gives no outliers

Raw values are not comparable across captions (a caption's class sets its typical cosine, agreement and
concentration), so each signal is calibrated within the caption's own cluster: a robust z-score against the same
signal of the `reference` pool samples with the most similar captions (text-text cosine), other members of the
sample's duplicate group excluded. The gate averages the calibrated z-scores (`mean_z`) and flags low outliers.

    conc = plan_concentration(plan, word_mask)                         # (P,)
    z = caption_calibrated_z(values, pool_values, own_text, pool_text, n, exclude)
    score = mean_z({"cosine": z1, "concentration": z2})
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .gates import MAD_TO_STD

SIGNALS = ("cosine", "agreement", "concentration", "pixel_agreement")
NEIGHBOURHOOD_SIGNALS = ("agreement", "pixel_agreement")   # what a duplicate group is judged by (not its own pair)


def plan_concentration(plan: Tensor, word_mask: Optional[Tensor] = None) -> Tensor:
    """How much each caption word's transport mass piles onto a single patch, averaged over the real words.

    plan (P, M, L): OT plans between M patches and L word tokens; word_mask (P, L) bool, True at real words (None =
    all). Returns (P,) in [1/M, 1]: 1/M when every word spreads evenly over the patches, 1 when each word sends all
    its mass to one patch. A problem without real words gets NaN.
    """
    if plan.dim() != 3:
        raise ValueError(f"plan must be (P, M, L), got {tuple(plan.shape)}")
    mass = plan.sum(dim=1)                                                              # (P, L)
    share = plan.amax(dim=1) / mass.clamp_min(torch.finfo(plan.dtype).tiny)            # (P, L)
    real = mass > 0 if word_mask is None else word_mask.to(plan.device) & (mass > 0)
    count = real.sum(dim=1)
    conc = (share * real).sum(dim=1) / count.clamp_min(1)
    return conc.masked_fill(count == 0, float("nan"))


def caption_calibrated_z(values: Tensor, pool_values: Tensor, own_text: Tensor, pool_text: Tensor, reference: int,
                         exclude: Tensor) -> Tensor:
    """Robust z-score of each sample's signal, centred on the samples whose captions are most like its own.

    values (B,): the signal of the block's samples; pool_values (N,): the same signal for the pool rows (rows
    0..B-1 are the block itself, NaN where unknown); own_text (B, d), pool_text (N, d): unit caption embeddings;
    exclude (B, N) bool: rows that may not serve as reference (the sample itself, its duplicates, bank copies).
    Reference of sample i = its `reference` nearest pool captions by text cosine among the allowed rows with a
    finite value; r_i = v_i - median(reference). The scale is block-wide: 1.4826 * median |r| over the block (a
    reference alone is often too tight, e.g. a class whose pairs all agree, and would blow tiny gaps up into huge
    z-scores). z_i = r_i / scale; 0 where fewer than 3 references exist or the scale is 0. Returns (B,) float32.
    """
    B, N = exclude.shape
    if values.shape != (B,) or pool_values.shape != (N,):
        raise ValueError(f"values must be ({B},) and pool_values ({N},), got {tuple(values.shape)}, "
                         f"{tuple(pool_values.shape)}")
    n = min(reference, N)
    zero = torch.zeros(B, dtype=torch.float32, device=values.device)
    if n < 3:
        return zero
    finite = torch.isfinite(pool_values)
    sim = (own_text @ pool_text.T).masked_fill(exclude | ~finite.unsqueeze(0), float("-inf"))  # (B, N)
    top, idx = sim.topk(n, dim=1)
    ok = torch.isfinite(top)                                                            # (B, n)
    ref = pool_values.float()[idx].masked_fill(~ok, float("nan"))                       # (B, n)
    resid = values.float() - ref.nanmedian(dim=1).values
    usable = (ok.sum(dim=1) >= 3) & torch.isfinite(resid)
    if int(usable.sum()) < 3:
        return zero
    scale = MAD_TO_STD * resid[usable].abs().median()
    if not float(scale) > 0:
        return zero
    return torch.where(usable, resid / scale, zero)


def mean_z(z: dict[str, Tensor]) -> Tensor:
    """One gate score (B,) from calibrated z-scores (low = suspicious): their mean, so that an outlier in one signal
    must be backed by the others."""
    if not z:
        raise ValueError("the gate needs at least one signal")
    return torch.stack(list(z.values())).mean(dim=0)                                   # (S, B) -> (B,)
