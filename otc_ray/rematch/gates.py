"""Poison detectors for re-matching (METHOD.md B.4): which samples of a block are suspicious. Pure torch.

Convention: every gate turns a per-sample *trust* score into a block-level robust z-score and flags the low
outliers, z < threshold (default -2), except `margin`, which is a plain rule on the score gap.

    z = robust_z(trust)                                       # (B,), median / MAD over the block
    flags = margin_flags(own_in_topk, own_score, best_score, margin)
    agree, nbrs = neighbour_agreement(img, pool_img, own_txt, pool_txt, n, exclude)
    vote = neighbour_vote(nbrs, trusted)                      # nearest trusted neighbour per image, -1 if none
    p_clean = gmm_clean_probability(pair_similarities)        # SafeCLIP's split (gate gmm): no z-score
"""
from __future__ import annotations

import torch
from torch import Tensor

MAD_TO_STD = 1.4826      # MAD of a normal distribution times this is its standard deviation


def robust_z(x: Tensor) -> Tensor:
    """Robust z-scores of x (B,) over its finite entries: (x - median) / (1.4826 * MAD) -> (B,).

    When the MAD is 0 (more than half the values equal) the standard deviation is the scale; when that is 0
    too, every z is 0. Non-finite entries get z = 0 (never flagged).
    """
    if x.dim() != 1:
        raise ValueError(f"robust_z takes a 1-D tensor (B,), got shape {tuple(x.shape)}")
    ok = torch.isfinite(x)
    z = torch.zeros_like(x, dtype=torch.float32)
    if int(ok.sum()) < 2:
        return z
    v = x[ok].float()
    med = v.median()
    scale = MAD_TO_STD * (v - med).abs().median()
    if not float(scale) > 0:
        scale = v.std()
    if not float(scale) > 0:
        return z
    z[ok] = (v - med) / scale
    return z


def margin_flags(own_in_topk: Tensor, own_score: Tensor, best_score: Tensor, margin: float) -> Tensor:
    """bool (B,): the own caption left the natural top-k, or trails the best candidate by more than `margin`."""
    return ~own_in_topk | (best_score - own_score > margin)


def neighbour_agreement(
    image: Tensor, pool_image: Tensor, own_text: Tensor, pool_text: Tensor, neighbours: int, exclude: Tensor,
    duplicate_similarity: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Image-neighbour caption agreement (METHOD.md B, the best measured detector).

    image (B, d): the block's image embeddings; pool_image (N, d): the image embedding behind each pool caption;
    own_text (B, d): the block's own caption embeddings; pool_text (N, d); exclude (B, N) bool: pairs that are
    not neighbours (the image itself, bank copies of the same key). All rows unit-norm. Pool images with cosine
    >= duplicate_similarity to an image are its copies, not independent witnesses, and are skipped too: K copies
    of one image with the same false caption (a targeted attack) would otherwise vouch for each other.
    Returns agreement (B,) = mean over the n nearest pool images j of <own_text_i, pool_text_j>, and the
    neighbour indices (B, n) into the pool, nearest first (n = min(neighbours, N - 1)); rows with fewer
    allowed neighbours average over those they have (a row with none gets NaN).
    """
    n = min(neighbours, pool_image.shape[0] - 1)
    if n < 1:
        return torch.full((image.shape[0],), float("nan"), device=image.device), \
            torch.zeros((image.shape[0], 0), dtype=torch.long, device=image.device)
    sim = image @ pool_image.T                                                           # (B, N)
    sim = sim.masked_fill_(exclude | (sim >= duplicate_similarity), float("-inf"))
    top, nbrs = sim.topk(n, dim=1)                                                       # (B, n)
    valid = torch.isfinite(top)
    text_sim = torch.einsum("bd,bnd->bn", own_text, pool_text[nbrs])                     # (B, n)
    count = valid.sum(1)
    agreement = (text_sim * valid).sum(1) / count.clamp_min(1)
    agreement = agreement.masked_fill(count == 0, float("nan"))
    nbrs = nbrs.masked_fill(~valid, -1)
    return agreement, nbrs


def neighbour_vote(nbrs: Tensor, trusted: Tensor) -> Tensor:
    """The nearest trusted neighbour of each image: nbrs (B, n) pool indices (-1 = none), trusted (N,) bool.

    Returns (B,) int64 pool indices, -1 where no neighbour is trusted.
    """
    if nbrs.shape[1] == 0:
        return torch.full((nbrs.shape[0],), -1, dtype=torch.long, device=nbrs.device)
    ok = (nbrs >= 0) & trusted[nbrs.clamp_min(0)]                                        # (B, n)
    first = ok.to(torch.int8).argmax(dim=1)                                              # first True, nearest first
    pick = nbrs.gather(1, first.unsqueeze(1)).squeeze(1)
    return torch.where(ok.any(dim=1), pick, torch.full_like(pick, -1))


def gmm_clean_probability(values: Tensor, iters: int = 100) -> Tensor:
    """SafeCLIP's split: a 2-component 1-D Gaussian mixture fitted by EM to values (N,) (pair similarities); returns
    (N,) the posterior of the component with the higher mean (the "clean" one). Means start at the 25th and 75th
    percentiles, variances at the overall variance and never below 1% of it (a component cannot collapse onto a
    few points); constant values give 1 everywhere."""
    x = values.double()
    var0 = x.var(unbiased=False)
    if x.numel() < 2 or not float(var0) > 0:
        return torch.ones_like(values, dtype=torch.float32)
    mean = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device))
    var = var0.repeat(2)
    share = torch.full((2,), 0.5, dtype=x.dtype, device=x.device)
    floor = var0 * 0.01
    for _ in range(iters):
        log_p = torch.log(share) - 0.5 * torch.log(2 * torch.pi * var) - (x.unsqueeze(1) - mean) ** 2 / (2 * var)
        resp = torch.softmax(log_p, dim=1)                                                   # (N, 2)
        mass = resp.sum(0).clamp_min(1e-12)
        share = mass / x.numel()
        mean = (resp * x.unsqueeze(1)).sum(0) / mass
        var = ((resp * (x.unsqueeze(1) - mean) ** 2).sum(0) / mass).clamp_min(floor)
    log_p = torch.log(share) - 0.5 * torch.log(2 * torch.pi * var) - (x.unsqueeze(1) - mean) ** 2 / (2 * var)
    return torch.softmax(log_p, dim=1)[:, int(mean.argmax())].float()
