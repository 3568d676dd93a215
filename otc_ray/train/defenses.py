"""The defenses (docs/method.md, Training objective and Baselines), one class each in the registry `DEFENSES`,
looked up by the value of `train.defense` (`get_defense`): what the training stream re-matches (`Defense.rematch`)
and the objective of one batch (`Defense.batch_loss`). `train.defense` is the one choice of method: roclip and
safeclip set the re-match settings their method needs over `rematch`; otcclip reads `rematch` as it is.

    defense = get_defense(cfg.train.defense)
    defense.rematch(cfg)                    # RematchConfig of the stage, or None
    loss, terms = defense.batch_loss(feature_model, clip_model, pixels, ids, cfg, epoch, generator, weights)

    none      L_clip
    roclip    L_clip on the captions the re-match stage chose (nearest pool caption to the image) every
              `roclip_every` epochs, the crawled captions between; augmented images and captions
    otcclip   L_clip + lambda_inter L_inter + lambda_intra L_intra from the first step; OT re-matching upstream
    safeclip  unimodal warm-up (image-image, text-text) for `safeclip_warmup` epochs, one epoch of L_clip on all
              pairs at a low learning rate, then L_clip on the safe pairs and the unimodal loss on the risky ones;
              the split is the stage's gate gmm (a Gaussian mixture on pair similarities, SafeCLIP's)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from ..config import Config, RematchConfig, replace
from ..losses import augment_token_ids, clip_loss, combine_losses, otcclip_terms, unimodal_contrastive_loss
from ..model import features
from .augment import augment_images

UNIMODAL_TEMPERATURE = 0.1


def _view(model: nn.Module, pixels: Tensor, ids: Tensor, cfg: Config, generator: torch.Generator, rows: Tensor):
    """Features of a second augmented view (images shifted/flipped, captions with word dropout) of the rows `rows`.

    Always without gradient: the view is a same-weights target (the open_clip model, outside DDP, so a second forward
    never meets DDP's once-per-step gradient bookkeeping)."""
    with torch.no_grad():
        return features(model, augment_images(pixels[rows], generator),
                        augment_token_ids(ids[rows], cfg.ot.text_drop_prob, generator), cfg.ot.special_tokens)


class Defense(ABC):
    """One defense: what its training stream re-matches (`rematch`) and what it trains (`batch_loss`)."""

    name: ClassVar[str]

    def rematch(self, cfg: Config) -> Optional[RematchConfig]:
        """The settings of the re-match stage the training stream goes through; None: no re-match stage."""
        return None

    def lr_scale(self, cfg: Config, epoch: int) -> float:
        """Factor on the scheduled learning rate during `epoch` (1: the schedule as it is)."""
        return 1.0

    @abstractmethod
    def batch_loss(self, feature_model: nn.Module, clip_model: nn.Module, pixels: Tensor, ids: Tensor, cfg: Config,
                   epoch: int, generator: torch.Generator, weights: Optional[Tensor] = None,
                   content_ids: Optional[Tensor] = None) -> tuple[Tensor, dict[str, float]]:
        """(total loss, named terms) for pixels (B,3,S,S) and caption ids (B,L).

        feature_model: the (DDP-wrapped) `FeatureModel` that trains; clip_model: the open_clip model inside it
        (second views, no gradient); weights (B,): the re-match stage's per-pair loss weights (action drop = 0,
        downweight < 1) for the image-caption terms, None when every pair counts fully; content_ids (B, 2) int64:
        [caption text id, image pixel id] (`otc_ray.identity`): batch-mates sharing one are not negatives of each
        other in any contrastive term (`losses.duplicate_pairs`); None = every other row is a negative."""


def _clip_only(f, weights: Optional[Tensor], content_ids: Optional[Tensor]) -> tuple[Tensor, dict[str, float]]:
    return combine_losses({"clip_loss": clip_loss(f.image, f.text, f.logit_scale, weights=weights,
                                                  content_ids=content_ids)}, {})


class NoDefense(Defense):
    """Plain CLIP: L_clip on the captions as crawled. No re-match stage."""

    name = "none"

    def batch_loss(self, feature_model, clip_model, pixels, ids, cfg, epoch, generator, weights=None, content_ids=None):
        return _clip_only(feature_model(pixels, ids), weights, content_ids)


class RoCLIP(Defense):
    """RoCLIP (Yang et al., NeurIPS 2023) as its code runs it: on every `train.roclip_every`-th epoch (its
    `break_epoch`, 2; 1-based epochs 2, 4, ..., so 0-based 1, 3, ...) every image takes the caption of the caption
    pool (a FIFO bank) nearest to its image embedding (the stage scores by global cosine alone, alpha 1, gate none,
    no trigger propagation, whatever `rematch` says); the epochs between train on the crawled captions. L_clip with
    augmented images and captions (shift/flip for its crop/flip/jitter, word dropout for its EDA)."""

    name = "roclip"

    def rematch(self, cfg: Config) -> Optional[RematchConfig]:
        every = cfg.train.roclip_every
        return replace(cfg, rematch__enabled=True, rematch__alpha=1.0, rematch__gate="none", rematch__witness=False,
                       rematch__propagate=False, rematch__start_epoch=every - 1, rematch__every_epochs=every).rematch

    def batch_loss(self, feature_model, clip_model, pixels, ids, cfg, epoch, generator, weights=None, content_ids=None):
        f = feature_model(augment_images(pixels, generator), augment_token_ids(ids, cfg.ot.text_drop_prob, generator))
        return _clip_only(f, weights, content_ids)


class OTCCLIP(Defense):
    """OTCCLIP: the stream re-matched as `rematch` says (`rematch.enabled` false removes the stage, an ablation);
    L_clip + lambda_inter L_inter + lambda_intra L_intra from the first step."""

    name = "otcclip"

    def rematch(self, cfg: Config) -> Optional[RematchConfig]:
        return cfg.rematch if cfg.rematch.enabled else None

    def batch_loss(self, feature_model, clip_model, pixels, ids, cfg, epoch, generator, weights=None, content_ids=None):
        tc = cfg.train
        f = feature_model(pixels, ids)
        n = f.image.shape[0] if cfg.ot.intra_samples == 0 else min(cfg.ot.intra_samples, f.image.shape[0])
        rows = torch.randperm(f.image.shape[0], generator=generator)[:n].to(pixels.device)
        view = _view(clip_model, pixels, ids, cfg, generator, rows) if tc.lambda_intra > 0 else None
        terms = otcclip_terms(f, tc.tau_ot, cfg.ot, tc.lambda_inter, tc.lambda_intra, view=view, view_index=rows,
                              weights=weights, content_ids=content_ids)
        return combine_losses(terms, {"inter_loss": tc.lambda_inter, "intra_loss": tc.lambda_intra})


class SafeCLIP(Defense):
    """SafeCLIP (Yang et al., ICML 2024) as its paper and code describe it, on this trainer's stream:
    epochs [0, w) (w = `train.safeclip_warmup`): unimodal contrastive loss only (image-image, text-text views);
    epoch w: L_clip on every pair at `train.safeclip_lr_scale` times the learning rate (its filter_lr 5e-6 for 5e-4);
    epochs > w: the stage's gate gmm splits each block (a Gaussian mixture on pair similarities: safe when the clean
    posterior is >= 0.9, at most 85% safe) and flags the risky pairs with weight 0: L_clip on the safe pairs, the
    unimodal loss on the risky ones. Deviations: the mixture is fitted per pool (block + bank) rather than once per
    epoch on all data, the safe share does not grow by 0.01 per epoch (4 points over this schedule's epochs), risky
    pairs stay in-batch negatives of the CLIP loss, and the unimodal loss is in-batch InfoNCE rather than NNCLR's
    nearest-neighbour bank."""

    name = "safeclip"

    def rematch(self, cfg: Config) -> Optional[RematchConfig]:
        return replace(cfg, rematch__enabled=True, rematch__alpha=1.0, rematch__gate="gmm", rematch__action="drop",
                       rematch__witness=False, rematch__sticky=False, rematch__propagate=False,
                       rematch__start_epoch=cfg.train.safeclip_warmup + 1, rematch__every_epochs=1).rematch

    def lr_scale(self, cfg: Config, epoch: int) -> float:
        return cfg.train.safeclip_lr_scale if epoch == cfg.train.safeclip_warmup else 1.0

    def batch_loss(self, feature_model, clip_model, pixels, ids, cfg, epoch, generator, weights=None, content_ids=None):
        tc = cfg.train
        f = feature_model(pixels, ids)
        if epoch == tc.safeclip_warmup:
            return _clip_only(f, weights, content_ids)
        all_rows = torch.arange(f.image.shape[0], device=pixels.device)
        view = _view(clip_model, pixels, ids, cfg, generator, all_rows)
        if epoch < tc.safeclip_warmup:
            return combine_losses({"image_unimodal_loss": unimodal_contrastive_loss(f.image, view.image, UNIMODAL_TEMPERATURE),
                                   "text_unimodal_loss": unimodal_contrastive_loss(f.text, view.text, UNIMODAL_TEMPERATURE)}, {})
        # L_clip weighted 0 on the risky pairs (the same path on every rank: the weighted loss is gathered), whose
        # images and captions still serve as negatives; the unimodal loss on the risky pairs of this rank's batch
        terms = {"clip_loss": clip_loss(f.image, f.text, f.logit_scale, weights=weights, content_ids=content_ids)}
        risky = torch.zeros(f.image.shape[0], dtype=torch.bool, device=pixels.device) if weights is None else weights <= 0
        if int(risky.sum()) > 1:
            terms["image_unimodal_loss"] = unimodal_contrastive_loss(f.image[risky], view.image[risky], UNIMODAL_TEMPERATURE)
            terms["text_unimodal_loss"] = unimodal_contrastive_loss(f.text[risky], view.text[risky], UNIMODAL_TEMPERATURE)
        return combine_losses(terms, {})


DEFENSES: dict[str, Defense] = {d.name: d for d in (NoDefense(), RoCLIP(), SafeCLIP(), OTCCLIP())}


def get_defense(name: str) -> Defense:
    """The defense registered as `name` (the value of `train.defense`); ValueError naming the known ones."""
    try:
        return DEFENSES[name]
    except KeyError:
        raise ValueError(f"unknown defense {name!r} (train.defense): known are {', '.join(DEFENSES)}") from None
