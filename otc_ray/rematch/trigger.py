"""Trigger propagation (`rematch.propagate`; docs/method.md, Trigger propagation): from the pairs the gate has
flagged, estimate the pixel pattern they share and flag every image that carries it. Pure torch, no Ray.

A backdoor needs a pattern shared by all its images (a patch, a blend, a signal); a gate that finds a part of them
with some precision leaves the rest to teach the trigger. The flagged images' mean residual, standardised per pixel
against a random reference sample of the data, shows that pattern above the flagged images' varied content; the
pixels where it is strongest (at least half its largest deviation) form a mask, and an image's match is the cosine
between its own residual on the mask and the pattern. The pattern is used only when it marks out a separate cluster
in the reference sample: a few images (at least 3, at most `max_share` of it) whose cosines stand at least `min_gap`
above all the others; an image carries the pattern when its cosine is above the middle of that gap. Flagged images
of one class share its shape too, but that shape makes a continuum of cosines, not a cluster. A trigger at a random
location has no fixed pixels and is not found. Two guards keep propagation off what is no trigger: a mask of at
least `min_mask` pixel values (a pattern of one or two pixels is noise the mask happened to pick), and enrichment:
the share of the flagged images that carry the pattern (read off the projection of their mean residual onto it,
between the cluster's and the rest's mean projections) must be at least `min_enrichment` times the cluster's share
of the reference. A benign pattern that some clean images share (a watermark, a logo) and that the gate flags about
as often as any other image fails it; a trigger, which the gate flags far above its share of the data, passes.

    grid = pixel_grid(images_uint8)                                    # (B, D) float, D = C * S * S
    pat = estimate_pattern(flagged_sum, flagged_weight, reference, cfg)  # TriggerPattern or None
    hits = pattern_match(grid, pat) >= pat.match                      # (B,) bool
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import zlib

import numpy as np
import torch
from torch import Tensor

PATTERN_SIDE = 64              # images larger than this are area-averaged to it (a 4-pixel patch at 224 survives)
MIN_PIXEL_STD = 8.0            # per-pixel scale floor (0-255 units): a constant background pixel would blow up
REFERENCE_EVERY = 8            # a key joins the reference sample when its CRC-32 is 0 modulo this
MIN_CLUSTER = 3                # reference images a cluster needs (one or two high cosines are the tail, not a trigger)


def in_reference_sample(key: str) -> bool:
    """Whether a sample key belongs to the reference sample (1 key in REFERENCE_EVERY, by its CRC-32)."""
    return zlib.crc32(key.encode("utf-8")) % REFERENCE_EVERY == 0


def pixel_grid(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images (B, H, W, C) -> (B, C * S * S) float32 pixels, S = min(H, PATTERN_SIDE) (area-averaged)."""
    x = torch.as_tensor(np.ascontiguousarray(images)).float()
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2)                                                          # (B, C, H, W)
    if max(x.shape[2], x.shape[3]) > PATTERN_SIDE:
        x = torch.nn.functional.adaptive_avg_pool2d(x, PATTERN_SIDE)
    return x.flatten(1)


@dataclass(frozen=True)
class PropagateConfig:
    """The thresholds of `estimate_pattern`: fixed parts of the method (docs/method.md, Trigger propagation), a
    dataclass so that tests can probe them."""

    floor: float = 0.5          # reference cosines below this are never part of the cluster
    min_gap: float = 0.15       # the cluster must stand this far (in cosine) above the rest of the reference
    max_share: float = 0.1      # at most this share of the reference in the cluster (a trigger is a minority)
    min_weight: float = 10.0    # flagged weight (duplicate groups count once) needed before a pattern is tried
    min_mask: int = 12          # pixel values in the mask at least (a 2 x 2 patch in 3 channels)
    min_enrichment: float = 5.0 # carriers' share of the flags / their share of the reference, at least


@dataclass(frozen=True)
class TriggerPattern:
    """mean, scale (D,): per-pixel standardisation; pattern (D,): the masked mean residual of the flagged images
    (0 off the mask); match: the score at which an image carries it (the middle of the gap); weight: the flagged
    weight it rests on; above: reference images in the cluster; gap: the score gap below it (`pattern_match`);
    enrichment: the carriers' share of the flags over their share of the reference (`carrier_enrichment`)."""

    mean: Tensor
    scale: Tensor
    pattern: Tensor
    match: float
    weight: float
    above: int
    gap: float
    enrichment: float = float("inf")


def pattern_match(grid: Tensor, pat: TriggerPattern) -> Tensor:
    """(B,) cosine between each image's standardised residual on the pattern's mask and the pattern."""
    mask = pat.pattern != 0
    r = ((grid - pat.mean) / pat.scale)[:, mask]
    return torch.nn.functional.cosine_similarity(r, pat.pattern[mask].unsqueeze(0), dim=1)


def separate_cluster(cos: Tensor, cfg: PropagateConfig) -> Optional[tuple[int, float, float]]:
    """The top cluster of reference cosines cos (R,): the k >= MIN_CLUSTER highest values (k <= max_share * R, all
    >= floor) with the widest gap below them, when that gap is >= min_gap. Returns (k, match, gap), match = the
    middle of the gap, or None."""
    top = cos[cos >= cfg.floor].sort(descending=True).values
    limit = min(int(cfg.max_share * cos.shape[0]), top.shape[0])
    if limit < MIN_CLUSTER:
        return None
    below = torch.cat([top, top.new_tensor([cfg.floor])])[1:limit + 1]                  # the value under each k
    gaps = top[:limit] - below                                                         # gaps[k-1]: below the top k
    gaps[:MIN_CLUSTER - 1] = -1.0
    k = int(gaps.argmax()) + 1
    if float(gaps[k - 1]) < cfg.min_gap:
        return None
    return k, float(top[k - 1] + below[k - 1]) / 2, float(gaps[k - 1])


def carrier_enrichment(reference: Tensor, pat: TriggerPattern, carries: Tensor) -> float:
    """How much more often the flagged images carry the pattern than the reference does: the flagged share, from
    the projection of the flagged mean residual (pat.pattern) onto the pattern between the mean projections of the
    reference's carriers and non-carriers (carries (R,) bool), clamped to [0, 1], over carries.mean()."""
    mask = pat.pattern != 0
    unit = pat.pattern[mask] / pat.pattern[mask].norm()
    proj = ((reference - pat.mean) / pat.scale)[:, mask] @ unit                       # (R,)
    inside, outside = float(proj[carries].mean()), float(proj[~carries].mean())
    if not inside > outside:
        return 0.0
    share = min(max((float(pat.pattern[mask].norm()) - outside) / (inside - outside), 0.0), 1.0)
    return share / float(carries.float().mean())


def estimate_pattern(flagged_sum: Tensor, flagged_weight: float, reference: Tensor,
                     cfg: PropagateConfig) -> Optional[TriggerPattern]:
    """The shared pattern of the flagged images, or None when there is none to trust.

    flagged_sum (D,): sum over flagged images of weight * pixel_grid (weight 1 / duplicate-group size);
    flagged_weight: the sum of those weights; reference (R, D): pixel grids of a random sample of the data.
    """
    if flagged_weight < cfg.min_weight or reference.shape[0] < 10:
        return None
    mean = reference.mean(dim=0)
    scale = reference.std(dim=0).clamp_min(MIN_PIXEL_STD)
    resid = (flagged_sum / flagged_weight - mean) / scale                               # (D,)
    strength = resid.abs()
    if not float(strength.max()) > 0:
        return None
    mask = strength >= 0.5 * strength.max()
    if int(mask.sum()) < cfg.min_mask:
        return None
    cand = TriggerPattern(mean, scale, resid * mask, 1.0, float(flagged_weight), 0, 0.0)
    scores = pattern_match(reference, cand)
    cluster = separate_cluster(scores, cfg)
    if cluster is None:
        return None
    k, match, gap = cluster
    enrichment = carrier_enrichment(reference, cand, scores >= match)
    if enrichment < cfg.min_enrichment:
        return None
    return TriggerPattern(mean, scale, cand.pattern, match, float(flagged_weight), k, gap, enrichment)
