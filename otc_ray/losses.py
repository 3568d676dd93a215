"""Training losses (docs/method.md, Training objective): CLIP InfoNCE, OT inter-/intra-modal alignment, unimodal
InfoNCE, combiner.

Pure functions of features (no model, no state). One OTCCLIP batch, as `otc_ray.train.defenses.OTCCLIP.batch_loss`
computes it (and benchmarks/ot_bench.py times it), t = cfg.train:

    f = features(model, pixels, ids)                                        # (B rows) with grad
    rows = torch.randperm(B, generator=generator)[:cfg.ot.intra_samples or B]   # samples that get a second view
    with torch.no_grad():                                                   # the second view: no gradient
        v = features(model, augment_images(pixels[rows], generator),
                     augment_token_ids(ids[rows], cfg.ot.text_drop_prob, generator))
    terms = otcclip_terms(f, t.tau_ot, cfg.ot, t.lambda_inter, t.lambda_intra, view=v, view_index=rows, weights=w)
    total, logs = combine_losses(terms, {"inter_loss": t.lambda_inter, "intra_loss": t.lambda_intra})

The OT terms use `cfg.ot.train_iters` Sinkhorn iterations and, when `cfg.ot.train_negatives` > 0, only the
hardest in-batch negatives (by mean-token cosine) per anchor, so a step solves B * (k + 1) * 2 small problems
instead of B^2. OT terms are in-batch (per rank); only `clip_loss` gathers across ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from otc_ray.config import OTConfig
from otc_ray.ot import candidate_ot_distance_cfg, pairwise_ot_distance_cfg


# ----------------------------------------------------------------------------------------- checks
def _check_batch(**tensors: Optional[Tensor]) -> int:
    """All given tensors share the batch size (dim 0); returns it. ValueError naming the sizes otherwise."""
    sizes = {k: int(v.shape[0]) for k, v in tensors.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError("batch sizes differ: " + ", ".join(f"{k}={n}" for k, n in sizes.items()))
    return next(iter(sizes.values()))


def _check_tokens(name: str, t: Tensor, mask: Optional[Tensor]) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be (B, T, d) tokens, got {tuple(t.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(t.shape[:2]):
        raise ValueError(f"{name} mask must be {tuple(t.shape[:2])}, got {tuple(mask.shape)}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


# ----------------------------------------------------------------------------------------- CLIP loss
def _gather(image: Tensor, text: Tensor, local_loss: bool, gather_with_grad: bool) -> tuple[Tensor, Tensor, int, int]:
    """Features of all ranks (B * world, d) each, plus (rank, world); identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image, text, 0, 1
    rank, world = dist.get_rank(), dist.get_world_size()
    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather  # autograd-aware

        return torch.cat(all_gather(image)), torch.cat(all_gather(text)), rank, world
    all_i = [torch.zeros_like(image) for _ in range(world)]
    all_t = [torch.zeros_like(text) for _ in range(world)]
    dist.all_gather(all_i, image.detach())
    dist.all_gather(all_t, text.detach())
    if not local_loss:      # the local slice keeps its gradient
        all_i[rank], all_t[rank] = image, text
    return torch.cat(all_i), torch.cat(all_t), rank, world


def duplicate_pairs(row_ids: Optional[Tensor], col_ids: Optional[Tensor] = None, offset: int = 0) -> Optional[Tensor]:
    """(R, C) bool: pairs (i, j) that share a content id but are not the positive pair (j != i + offset).

    row_ids (R, K), col_ids (C, K) int64 (default row_ids): K kinds of content id per sample (e.g. caption text,
    image pixels, `otc_ray.identity`); two samples are duplicates when any kind matches. Such a pair is not a
    negative: a batch-mate with the identical caption is a correct caption of the anchor image too. None -> None.
    """
    if row_ids is None:
        return None
    cols = row_ids if col_ids is None else col_ids
    if row_ids.dim() != 2 or cols.dim() != 2 or row_ids.shape[1] != cols.shape[1]:
        raise ValueError(f"content ids must be (R, K) and (C, K), got {tuple(row_ids.shape)}, {tuple(cols.shape)}")
    same = (row_ids.unsqueeze(1) == cols.unsqueeze(0)).any(dim=-1)
    rows = torch.arange(row_ids.shape[0], device=row_ids.device)
    same[rows, rows + offset] = False
    return same


def _mask_logits(logits: Tensor, not_negative: Optional[Tensor]) -> Tensor:
    return logits if not_negative is None else logits.masked_fill(not_negative, float("-inf"))


def clip_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Optional[Tensor] = None,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    weights: Optional[Tensor] = None,
    content_ids: Optional[Tensor] = None,
) -> Tensor:
    """Symmetric InfoNCE of open_clip's ClipLoss: image (B, d), text (B, d) normalized, logit_scale = exp(t).

    Under torch.distributed the features of all ranks are gathered: `gather_with_grad` back-propagates through
    the gather; `local_loss` scores only the local rows against all columns (labels offset by rank * B).
    weights (B,) >= 0: each pair's anchor terms (both directions) count with its weight (the re-match stage's
    `drop` = 0 / `downweight` actions); the pair still serves as a negative for the others. None = all 1.
    content_ids (B, K) int64: pairs sharing an id (identical caption or image) are not negatives of each other
    (their logits leave both softmax denominators; `duplicate_pairs`); gathered across ranks like the features.
    """
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(f"image and text must both be (B, d), got {tuple(image.shape)} and {tuple(text.shape)}")
    if weights is not None and tuple(weights.shape) != (image.shape[0],):
        raise ValueError(f"weights must be ({image.shape[0]},), got {tuple(weights.shape)}")
    if content_ids is not None and content_ids.shape[0] != image.shape[0]:
        raise ValueError(f"content_ids must have {image.shape[0]} rows, got {tuple(content_ids.shape)}")
    all_i, all_t, rank, world = _gather(image, text, local_loss, gather_with_grad)
    all_ids = _gather_rows(content_ids) if content_ids is not None and world > 1 else content_ids
    if world > 1 and local_loss:
        not_neg = duplicate_pairs(content_ids, all_ids, offset=image.shape[0] * rank)
        logits_i = _mask_logits(logit_scale * image @ all_t.T, not_neg)
        logits_t = _mask_logits(logit_scale * text @ all_i.T, not_neg)
        labels = torch.arange(image.shape[0], device=image.device) + image.shape[0] * rank
    else:
        logits_i = _mask_logits(logit_scale * all_i @ all_t.T, duplicate_pairs(all_ids))
        logits_t = logits_i.T
        labels = torch.arange(all_i.shape[0], device=image.device)
    if logit_bias is not None:
        logits_i, logits_t = logits_i + logit_bias, logits_t + logit_bias
    if weights is None:
        return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
    if world > 1 and not local_loss:
        weights = _gather_rows(weights)
    per_pair = (F.cross_entropy(logits_i, labels, reduction="none")
                + F.cross_entropy(logits_t, labels, reduction="none")) / 2
    return weighted_mean(per_pair, weights)


def weighted_mean(values: Tensor, weights: Optional[Tensor]) -> Tensor:
    """sum(w * v) / sum(w) for values (B,), weights (B,) >= 0; 0 (graph kept) when every weight is 0."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def _gather_rows(x: Tensor) -> Tensor:
    """Per-pair values (B, ...) of all ranks, (B * world, ...), in rank order (no gradient): weights, content ids."""
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------- OT losses
def _mean_token(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Normalized mean of the real tokens: (B, T, d) -> (B, d)."""
    if mask is None:
        return F.normalize(t.mean(1), dim=-1)
    m = mask.to(t.dtype).unsqueeze(-1)
    return F.normalize((t * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def ot_contrastive_loss(
    a: Tensor, a_mask: Optional[Tensor], b: Tensor, b_mask: Optional[Tensor], tau: float, ot_cfg: OTConfig,
    weights: Optional[Tensor] = None, not_negative: Optional[Tensor] = None,
) -> Tensor:
    """Symmetric InfoNCE over logits -D_OT(a_i, b_j) / tau, positives on the diagonal; weights (B,) as clip_loss's.

    a (B, Ta, d), b (B, Tb, d) token sets with masks (B, Ta), (B, Tb) (None = all real); not_negative (B, B) bool:
    off-diagonal pairs that are not negatives (duplicates, `duplicate_pairs`), never chosen or scored as one. With
    ot_cfg.train_negatives = k in [1, B - 2], each anchor (both directions) meets its positive and its k hardest
    negatives by mean-token cosine (chosen without gradient); otherwise all B x B pairs are solved.
    """
    _check_tokens("a", a, a_mask)
    _check_tokens("b", b, b_mask)
    B = _check_batch(a=a, b=b)
    _check_positive("tau", tau)
    k, iters = ot_cfg.train_negatives, ot_cfg.train_iters
    if k <= 0 or k >= B - 1:
        logits = _mask_logits(-pairwise_ot_distance_cfg(a, b, a_mask, b_mask, ot_cfg, iters=iters) / tau, not_negative)
        labels = torch.arange(B, device=a.device)
        return weighted_mean((F.cross_entropy(logits, labels, reduction="none")
                              + F.cross_entropy(logits.T, labels, reduction="none")) / 2, weights)
    with torch.no_grad():
        sim = _mean_token(a, a_mask) @ _mean_token(b, b_mask).T                     # (B, B)
        sim.fill_diagonal_(float("-inf"))
        if not_negative is not None:
            sim.masked_fill_(not_negative, float("-inf"))
        own = torch.arange(B, device=a.device).unsqueeze(1)
        top_ab, top_ba = sim.topk(k, dim=1), sim.T.topk(k, dim=1)
        idx_ab = torch.cat([own, top_ab.indices], dim=1)                            # (B, k + 1): b's for a_i
        idx_ba = torch.cat([own, top_ba.indices], dim=1)                            # (B, k + 1): a's for b_j
        yes = torch.ones_like(own, dtype=torch.bool)
        void_ab = ~torch.cat([yes, torch.isfinite(top_ab.values)], dim=1)           # fewer than k real negatives
        void_ba = ~torch.cat([yes, torch.isfinite(top_ba.values)], dim=1)
    d_ab = candidate_ot_distance_cfg(a, b, idx_ab, a_mask, b_mask, ot_cfg, iters=iters)
    d_ba = candidate_ot_distance_cfg(b, a, idx_ba, b_mask, a_mask, ot_cfg, iters=iters)
    target = torch.zeros(B, dtype=torch.long, device=a.device)
    return weighted_mean((F.cross_entropy((-d_ab / tau).masked_fill(void_ab, float("-inf")), target, reduction="none")
                          + F.cross_entropy((-d_ba / tau).masked_fill(void_ba, float("-inf")), target,
                                            reduction="none")) / 2, weights)


def ot_inter_loss(
    patches: Tensor, patch_mask: Optional[Tensor], words: Tensor, word_mask: Optional[Tensor], tau: float,
    ot_cfg: OTConfig, weights: Optional[Tensor] = None, not_negative: Optional[Tensor] = None,
) -> Tensor:
    """L_inter: image i vs caption j by -D_OT(V_i, W_j) / tau, symmetric cross-entropy over the batch.

    patches (B, M, d), patch_mask (B, M) or None, words (B, L, d), word_mask (B, L), weights (B,) or None,
    not_negative (B, B) bool or None (pairs with an identical caption or image).
    """
    return ot_contrastive_loss(patches, patch_mask, words, word_mask, tau, ot_cfg, weights, not_negative)


def ot_intra_loss(
    view_a: Tensor, mask_a: Optional[Tensor], view_b: Tensor, mask_b: Optional[Tensor], tau: float,
    ot_cfg: OTConfig, not_negative: Optional[Tensor] = None,
) -> Tensor:
    """L_intra for one modality: sample i's tokens under view a vs sample j's under view b, contrastive over the batch.

    view_a (B, T, d), view_b (B, T', d) (patches of two image augmentations, or words of a caption and of its
    `augment_token_ids` version), masks (B, T), (B, T') or None; not_negative (B, B) bool: samples with identical
    content in this modality (identical images, or identical captions), not negatives of each other.
    """
    return ot_contrastive_loss(view_a, mask_a, view_b, mask_b, tau, ot_cfg, not_negative=not_negative)


def augment_token_ids(ids: Tensor, drop_prob: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Caption view: drop each word token with probability drop_prob, keep SOT, EOT and order; re-pad with 0.

    ids (B, L) int64 from open_clip's tokenizer (SOT at position 0, EOT = the row's largest id) -> (B, L).
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, L), got {tuple(ids.shape)}")
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
    B, L = ids.shape
    pos = torch.arange(L, device=ids.device).expand(B, L)
    special = (ids == 0) | (pos == 0) | (pos == ids.argmax(dim=1, keepdim=True))
    rand = torch.rand((B, L), generator=generator, device=ids.device if generator is None else generator.device)
    keep = special | (rand.to(ids.device) >= drop_prob)
    order = torch.where(keep, pos, pos + L).argsort(dim=1)                 # kept tokens first, in order
    out = ids.gather(1, order)
    return out.masked_fill(pos >= keep.sum(1, keepdim=True), 0)


def unimodal_contrastive_loss(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """SafeCLIP's image-image / text-text InfoNCE: a (B, d), b (B, d) embeddings of two views, symmetric."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be (B, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_positive("temperature", temperature)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------------------------------- combining
def otcclip_terms(
    f: "ClipFeatures",  # noqa: F821  (otc_ray.model.ClipFeatures; not imported to keep losses model-free)
    tau: float,
    ot_cfg: OTConfig,
    lambda_inter: float = 0.5,
    lambda_intra: float = 0.5,
    view: Optional["ClipFeatures"] = None,  # noqa: F821
    view_index: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    content_ids: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """The OTCCLIP terms for one batch: {"clip_loss", "inter_loss", "intra_loss"}; a term with weight 0 is skipped.

    f: features of the batch (B rows) with logit_scale; view: features of a second augmented view of the rows
    `view_index` (default: the first len(view) rows), usually computed without gradient. L_intra is the mean of
    the image-view and caption-view terms. weights (B,): per-pair weights of the image-caption terms (clip,
    inter); L_intra pairs a sample with itself, never with a caption, so it keeps every row.
    content_ids (B, 2) int64: [caption text id, image pixel id] (`otc_ray.identity`); pairs sharing either are not
    negatives in L_clip and L_inter, images sharing pixels not in L_intra's image term, captions sharing text not in
    its caption term. None = every other row is a negative.
    """
    if content_ids is not None and (content_ids.dim() != 2 or content_ids.shape[1] != 2):
        raise ValueError(f"content_ids must be (B, 2) [caption id, image id], got {tuple(content_ids.shape)}")
    terms = {"clip_loss": clip_loss(f.image, f.text, f.logit_scale, weights=weights, content_ids=content_ids)}
    if lambda_inter > 0:
        terms["inter_loss"] = ot_inter_loss(f.patches, None, f.words, f.word_mask, tau, ot_cfg, weights,
                                            duplicate_pairs(content_ids))
    if lambda_intra > 0 and view is not None:
        idx = torch.arange(view.image.shape[0], device=f.image.device) if view_index is None else view_index
        sub = None if content_ids is None else content_ids[idx]
        same_image = None if sub is None else duplicate_pairs(sub[:, 1:])
        same_caption = None if sub is None else duplicate_pairs(sub[:, :1])
        terms["intra_loss"] = (ot_intra_loss(f.patches[idx], None, view.patches, None, tau, ot_cfg, same_image)
                               + ot_intra_loss(f.words[idx], f.word_mask[idx], view.words, view.word_mask,
                                               tau, ot_cfg, same_caption)) / 2
    return terms


def combine_losses(terms: dict[str, Tensor], weights: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """total = sum(weights.get(name, 1) * term); terms are scalar tensors named '*_loss'.

    Weights naming absent terms are ignored (a skipped term); weight 0 drops a term from the total. Returns the
    total and {name: float} of every unweighted term plus "total_loss", for logging.
    """
    if not terms:
        raise ValueError("no loss terms to combine")
    total: Optional[Tensor] = None
    logs: dict[str, float] = {}
    for name, value in terms.items():
        if not name.endswith("_loss"):
            raise ValueError(f"loss term names end with '_loss', got {name!r}")
        if value.dim() != 0:
            raise ValueError(f"loss term {name!r} must be a scalar, got shape {tuple(value.shape)}")
        logs[name] = float(value.detach())
        w = float(weights.get(name, 1.0))
        if w != 0.0:
            total = w * value if total is None else total + w * value
    if total is None:
        total = sum(v * 0.0 for v in terms.values())
    logs["total_loss"] = float(total.detach())
    return total, logs
