"""The training objective of each defense, for one batch (METHOD.md C and Baselines).

    none      L_clip
    roclip    L_clip on the captions the re-match stage chose (global nearest caption), augmented images
    otcclip   L_clip + lambda_inter L_inter + lambda_intra L_intra from the first step; OT re-matching upstream
    safeclip  unimodal warm-up (image-image, text-text) for `safeclip_warmup` epochs, then L_clip on the
              batch's most similar ("safe") pairs and the unimodal loss on the rest. The split is the
              batch-level form of SafeCLIP's per-epoch Gaussian mixture: the safe share grows from 0.5 by
              0.1 per epoch up to 0.85.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import Config
from ..losses import augment_token_ids, clip_loss, combine_losses, otcclip_terms, unimodal_contrastive_loss
from ..model import features
from .augment import augment_images

UNIMODAL_TEMPERATURE = 0.1


def _view(model: nn.Module, pixels: Tensor, ids: Tensor, cfg: Config, gen: torch.Generator, rows: Tensor):
    """Features of a second augmented view (images shifted/flipped, captions with word dropout), no gradient."""
    with torch.no_grad():
        return features(model, augment_images(pixels[rows], gen), augment_token_ids(ids[rows], cfg.ot.text_drop_prob,
                                                                                    gen))


def safe_share(epoch: int, warmup: int) -> float:
    return min(0.85, 0.5 + 0.1 * max(0, epoch - warmup))


def batch_loss(defense: str, feature_model: nn.Module, bare_model: nn.Module, pixels: Tensor, ids: Tensor,
               cfg: Config, epoch: int, gen: torch.Generator,
               weights: Optional[Tensor] = None) -> tuple[Tensor, dict[str, float]]:
    """(total loss, named terms) for pixels (B,3,S,S) and caption ids (B,L) under `defense`.

    weights (B,): the re-match stage's per-pair loss weights (action drop = 0, downweight < 1), applied to the
    image-caption terms; None when every pair counts fully."""
    tc = cfg.train
    if defense == "roclip":
        pixels = augment_images(pixels, gen)
    f = feature_model(pixels, ids)
    if defense in ("none", "roclip"):
        return combine_losses({"clip_loss": clip_loss(f.image, f.text, f.logit_scale, weights=weights)}, {})
    if defense == "otcclip":
        n = f.image.shape[0] if cfg.ot.intra_samples == 0 else min(cfg.ot.intra_samples, f.image.shape[0])
        rows = torch.randperm(f.image.shape[0], generator=gen)[:n].to(pixels.device)
        view = _view(bare_model, pixels, ids, cfg, gen, rows) if tc.lambda_intra > 0 else None
        terms = otcclip_terms(f, tc.tau_ot, cfg.ot, tc.lambda_inter, tc.lambda_intra, view=view, view_index=rows,
                              weights=weights)
        return combine_losses(terms, {"inter_loss": tc.lambda_inter, "intra_loss": tc.lambda_intra})
    if defense == "safeclip":
        all_rows = torch.arange(f.image.shape[0], device=pixels.device)
        view = _view(bare_model, pixels, ids, cfg, gen, all_rows)
        if epoch < tc.safeclip_warmup:
            return combine_losses({"image_unimodal_loss": unimodal_contrastive_loss(f.image, view.image, UNIMODAL_TEMPERATURE),
                                   "text_unimodal_loss": unimodal_contrastive_loss(f.text, view.text, UNIMODAL_TEMPERATURE)}, {})
        with torch.no_grad():
            similarity = (f.image * f.text).sum(-1)
        n_safe = max(2, int(round(safe_share(epoch, tc.safeclip_warmup) * len(similarity))))
        order = similarity.argsort(descending=True)
        safe, risky = order[:n_safe], order[n_safe:]
        terms = {"clip_loss": clip_loss(f.image[safe], f.text[safe], f.logit_scale)}
        if len(risky) > 1:
            terms["image_unimodal_loss"] = unimodal_contrastive_loss(f.image[risky], view.image[risky], UNIMODAL_TEMPERATURE)
            terms["text_unimodal_loss"] = unimodal_contrastive_loss(f.text[risky], view.text[risky], UNIMODAL_TEMPERATURE)
        return combine_losses(terms, {})
    raise ValueError(f"unknown defense {defense!r}")
