"""The gates' building blocks (docs/method.md, The gate): image-neighbour caption agreement (a signal of the evidence
gate) and SafeCLIP's Gaussian-mixture split (gate gmm). Pure torch.

    agree, nbrs = neighbour_agreement(img, pool_img, own_txt, pool_txt, n, exclude)
    p_clean = gmm_clean_probability(pair_similarities)        # (N,) posterior of the clean component
"""
from __future__ import annotations

import torch
from torch import Tensor

MAD_TO_STD = 1.4826      # MAD of a normal distribution times this is its standard deviation


def neighbour_agreement(
    image: Tensor, pool_image: Tensor, own_text: Tensor, pool_text: Tensor, neighbours: int, exclude: Tensor,
) -> tuple[Tensor, Tensor]:
    """Image-neighbour caption agreement: does the own caption say what the captions of similar images say.

    image (B, d): the block's image embeddings; pool_image (N, d): the image embedding behind each pool caption;
    own_text (B, d): the block's own caption embeddings; pool_text (N, d); exclude (B, N) bool: pairs that are
    not neighbours (the image itself, bank copies of the same key, its duplicates: K copies of one image with the
    same false caption, a targeted attack, would otherwise vouch for each other). All rows unit-norm.
    Returns agreement (B,) = mean over the n nearest pool images j of <own_text_i, pool_text_j>, and the
    neighbour indices (B, n) into the pool, nearest first (n = min(neighbours, N - 1)); rows with fewer
    allowed neighbours average over those they have (a row with none gets NaN).
    """
    n = min(neighbours, pool_image.shape[0] - 1)
    if n < 1:
        return torch.full((image.shape[0],), float("nan"), device=image.device), \
            torch.zeros((image.shape[0], 0), dtype=torch.long, device=image.device)
    sim = image @ pool_image.T                                                           # (B, N)
    sim = sim.masked_fill_(exclude, float("-inf"))
    top, nbrs = sim.topk(n, dim=1)                                                       # (B, n)
    valid = torch.isfinite(top)
    text_sim = torch.einsum("bd,bnd->bn", own_text, pool_text[nbrs])                     # (B, n)
    count = valid.sum(1)
    agreement = (text_sim * valid).sum(1) / count.clamp_min(1)
    agreement = agreement.masked_fill(count == 0, float("nan"))
    nbrs = nbrs.masked_fill(~valid, -1)
    return agreement, nbrs


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
