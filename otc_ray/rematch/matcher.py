"""Caption re-matching (docs/method.md, Caption re-matching; The gate): gate, then OT picks the caption. Pure
torch, no Ray.

Two layers:
  * `match_block(images, pool, key_ids, cfg, ot_cfg) -> MatchResult` is the core. It takes features only
    (hand-built in tests), so every decision is checkable without a model.
  * `Matcher` is the model-facing wrapper: one forward of both towers per block, a FIFO `CaptionBank` of recent
    captions, and strings (caption used, source key) for the Ray stage.

    matcher = Matcher(build_model(model_cfg), cfg.rematch, cfg.ot, device="cpu")
    out = matcher.match(images_uint8, captions, keys)        # BlockMatch: MatchResult + caption_used, source_key

OTCCLIP (gate `evidence`, the default): each pair's evidence (`signals.py`: global cosine, image-neighbour caption
agreement, OT plan concentration), calibrated against the pool pairs with the most similar captions, combined,
and averaged over the pair's duplicate group (exact pixel hash or image cosine >= duplicate_similarity: the K
copies of a targeted attack are judged as one sample and weigh 1/K in the loss). A flagged pair's candidates are
its OT shortlist (top-k trusted pool captions by global cosine) plus the captions of its nearest trusted image
neighbours; it trains with the candidate of best fused score alpha*cos + (1-alpha)*(1-D_OT) (alpha = 1 is the
cosine-only ablation). The gate is a lookup (`GATES`: evidence, gmm, none), and one function (`apply_action`)
applies `rematch.action` to what it flags.

Pool layout: rows 0..B-1 are the block's own captions (row i belongs to image i), rows B.. are the bank.
The cost: one GEMM for the global cosines (B, N), one batched OT over the B own pairs (the concentration), OT on
the flagged rows' candidates only, the gates on (B, N) / (B, n) tensors; no loop over samples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from otc_ray import ot
from otc_ray.config import OTConfig, RematchConfig, validate
from otc_ray import identity
from otc_ray.model import (ClipBundle, encode_image, encode_image_tokens, encode_text, encode_text_tokens,
                           images_to_tensor)

from .gates import gmm_clean_probability, neighbour_agreement
from .signals import NEIGHBOURHOOD_SIGNALS, SIGNALS, caption_calibrated_z, mean_z, plan_concentration

ENCODE_CHUNK = 128      # images per image-tower forward in `Matcher.encode`


# ----------------------------------------------------------------------------------------- containers
@dataclass
class ImageFeatures:
    """B images: image (B, d) unit global embeddings; patches (B, M, d) unit patch tokens (None when unused);
    ids (B,) int64 pixel hashes and signature (B, 256) pixel signatures (`otc_ray.identity`; None when unknown:
    duplicates are then found by the global embeddings)."""

    image: Tensor
    patches: Optional[Tensor] = None
    ids: Optional[Tensor] = None
    signature: Optional[Tensor] = None


@dataclass
class CaptionFeatures:
    """N captions: text (N, d) unit global embeddings; words (N, L, d) unit word tokens and word_mask (N, L) bool,
    True at the OT word set (None when unused)."""

    text: Tensor
    words: Optional[Tensor] = None
    word_mask: Optional[Tensor] = None


@dataclass
class Pool:
    """The captions a block may be re-matched to (N >= B rows; rows 0..B-1 are the block's own).

    captions: CaptionFeatures (N rows); image: (N, d) unit embedding of the image each caption came with
    (the agreement signal's image neighbours); key_ids: (N,) int64 sample-key ids (bank copies of a block
    sample are excluded from its candidates and neighbours); trusted: (N,) bool, False for bank entries
    that were flagged when they were matched (never a candidate caption);
    image_ids: (N,) int64 pixel hashes, signatures: (N, 256) pixel signatures of the image behind each caption
    (`otc_ray.identity`; None = duplicates by global image embedding);
    signals: (N, S) float, the gate evidence of each bank row when it was matched, in `signals.SIGNALS` order
    (rows 0..B-1 and unknown rows NaN; None = all unknown).
    """

    captions: CaptionFeatures
    image: Tensor
    key_ids: Tensor
    trusted: Tensor
    image_ids: Optional[Tensor] = None
    signatures: Optional[Tensor] = None
    signals: Optional[Tensor] = None


@dataclass
class MatchResult:
    """Per-sample outcome of re-matching a block of B images (indices point into the pool, N rows).

    shortlist (B, k) int64: candidate captions, global cosine order, the own caption forced in;
    scores (B, k) float: fused scores alpha*cos + (1-alpha)*(1-D_OT) (alpha 1: cos), -inf for void slots;
    own_in_topk (B,) bool: the own caption made the natural top-k by global cosine;
    own_score, best_score, suspicion (B,) float: own caption's score, best candidate's score, best - own;
    gate_z (B,) float: what the gate thresholds (gate evidence: the combined caption-calibrated z, averaged over the
    duplicate group; gate gmm: the clean posterior; gate none: NaN);
    agreement (B,) float: neighbour caption agreement (NaN unless gate evidence);
    flagged (B,) bool: the gate's verdict, sticky flags included (gate none: the best candidate is not the own caption);
    source (B,) int64: the pool row whose caption the sample trains with (i itself when unchanged);
    recaptioned (B,) bool: source != i;  weight (B,) float: loss weight (0 = dropped, action drop; gate
    evidence: times 1 / group_size);
    signals (B, S) float: raw evidence in `signals.SIGNALS` order, low = suspicious (NaN where not computed);
    signal_z (B, S) float: each signal's caption-calibrated z (NaN for signals not in the gate);
    group_size (B,) int64: pool rows in the sample's duplicate group, itself included (1 = no duplicate);
    gate_flagged (B,) bool: the gate's own verdict on this block, before sticky flags from earlier epochs.
    """

    shortlist: Tensor
    scores: Tensor
    own_in_topk: Tensor
    own_score: Tensor
    best_score: Tensor
    suspicion: Tensor
    gate_z: Tensor
    agreement: Tensor
    flagged: Tensor
    source: Tensor
    recaptioned: Tensor
    weight: Tensor
    signals: Optional[Tensor] = None
    signal_z: Optional[Tensor] = None
    group_size: Optional[Tensor] = None
    gate_flagged: Optional[Tensor] = None

    def to(self, device: str | torch.device) -> "MatchResult":
        return MatchResult(**{k: None if v is None else v.to(device) for k, v in self.__dict__.items()})


# ----------------------------------------------------------------------------------------- core steps
def _exclusions(key_ids: Tensor, pool_keys: Tensor) -> Tensor:
    """(B, N) bool: pool rows that are other copies of the block sample's key (not its own row i)."""
    B = key_ids.shape[0]
    same = key_ids.unsqueeze(1) == pool_keys.unsqueeze(0)
    same[torch.arange(B, device=same.device), torch.arange(B, device=same.device)] = False
    return same


def shortlist(cos: Tensor, k: int, exclude: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k pool captions per image by global cosine, own caption (column i of row i) forced into the last slot
    when it is not there already. cos (B, N), exclude (B, N) bool.

    Returns (index (B, k'), valid (B, k') bool, own_in_topk (B,) bool), k' = min(k, N).
    """
    B, N = cos.shape
    k = min(k, N)
    masked = cos.masked_fill(exclude, float("-inf"))
    top, idx = masked.topk(k, dim=1)
    own = torch.arange(B, device=cos.device)
    in_top = (idx == own.unsqueeze(1)).any(dim=1)
    idx[~in_top, k - 1] = own[~in_top]
    valid = torch.isfinite(top)
    valid[~in_top, k - 1] = True
    return idx, valid, in_top


def fused_scores(images: ImageFeatures, pool: Pool, index: Tensor, cos: Tensor, alpha: float,
                 ot_cfg: OTConfig) -> Tensor:
    """alpha * cos + (1 - alpha) * (1 - D_OT) on the shortlist: index (B, k), cos (B, N) -> (B, k).

    D_OT runs once, batched over the B x k (image, candidate) pairs (`ot.candidate_ot_distance_cfg`).
    """
    c = cos.gather(1, index)
    if alpha >= 1.0:
        return c
    caps = pool.captions
    if images.patches is None or caps.words is None or caps.word_mask is None:
        raise ValueError("OT re-ranking (alpha < 1) needs patch tokens and word tokens with their mask")
    words, mask = ot.trim_padding(caps.words, caps.word_mask)
    D = ot.candidate_ot_distance_cfg(images.patches, words, index, None, mask, ot_cfg)
    return alpha * c + (1.0 - alpha) * (1.0 - D.to(c.dtype))


@dataclass
class Evidence:
    """The evidence gate's view of a block of B images against a pool of N rows.

    signals (B, S): raw values in SIGNALS order, low = suspicious (NaN for signals not asked for);
    signal_z (B, S): each signal's caption-calibrated z (NaN for signals not in the gate);
    z (B,): combined caption-calibrated z, averaged over each sample's duplicate group within the block;
    duplicate (B, N) bool: pool rows that are copies of the sample's image (itself excluded);
    group_size (B,) int64: 1 + duplicates; neighbours (B, n): non-duplicate image neighbours, nearest first (-1 =
    none); own_distance (B,): D_OT of the own pair (NaN when concentration was not computed).
    """

    signals: Tensor
    signal_z: Tensor
    z: Tensor
    duplicate: Tensor
    group_size: Tensor
    neighbours: Tensor
    own_distance: Tensor


def duplicates(images: ImageFeatures, pool: Pool, not_pool: Tensor, similarity: float) -> Tensor:
    """(B, N) bool: pool rows whose image is a copy of block image i: the same pixel hash, or pixel-signature cosine
    >= similarity (without signatures: global-embedding cosine, which an untrained encoder makes ~1 for every
    pair). Rows in not_pool (B, N) (the image itself, bank copies of its key) are never duplicates."""
    if images.signature is not None and pool.signatures is not None:
        dup = (images.signature @ pool.signatures.T) >= similarity
    else:
        dup = (images.image @ pool.image.T) >= similarity
    if images.ids is not None and pool.image_ids is not None:
        dup |= images.ids.unsqueeze(1) == pool.image_ids.to(images.ids.device).unsqueeze(0)
    return dup & ~not_pool


def evidence(images: ImageFeatures, pool: Pool, cos: Tensor, not_pool: Tensor,
             cfg: RematchConfig, ot_cfg: OTConfig) -> Evidence:
    """Signals, calibration and combination of the evidence gate (see the module docstring and `signals.py`).

    cos (B, N): global cosines of the block's images against the pool captions; not_pool (B, N) bool: the image
    itself and bank copies of its key. A sample with copies in the pool is judged by its neighbourhood signals alone
    (agreement, pixel_agreement, those in the gate): K copies teach the model their own caption, so their cosine and
    plan say what they taught.
    """
    B, dev = images.image.shape[0], images.image.device
    own = torch.arange(B, device=dev)
    dup = duplicates(images, pool, not_pool, cfg.duplicate_similarity)
    values = torch.full((B, len(SIGNALS)), float("nan"), device=dev)
    values[:, SIGNALS.index("cosine")] = cos[own, own]
    agreement, nbrs = neighbour_agreement(images.image, pool.image, pool.captions.text[:B], pool.captions.text,
                                          cfg.neighbours, not_pool | dup)
    values[:, SIGNALS.index("agreement")] = agreement
    own_distance = torch.full((B,), float("nan"), device=dev)
    measured = tuple(dict.fromkeys(cfg.gate_signals))                                 # the gate's signals, in order
    if "pixel_agreement" in measured and images.signature is not None and pool.signatures is not None:
        values[:, SIGNALS.index("pixel_agreement")] = neighbour_agreement(
            images.signature, pool.signatures.to(dev), pool.captions.text[:B], pool.captions.text, cfg.neighbours,
            not_pool | dup)[0]
    if "concentration" in measured or cfg.alpha < 1:             # the signal, or the own pair's fused score
        caps = pool.captions
        if images.patches is None or caps.words is None or caps.word_mask is None:
            raise ValueError("gate evidence needs patch tokens and word tokens with their mask")
        words, mask = ot.trim_padding(caps.words[:B], caps.word_mask[:B])
        own_distance, plan = ot.ot_distance(images.patches, words, None, mask, eps=ot_cfg.eps, iters=ot_cfg.iters,
                                            tol=ot_cfg.tol)
        values[:, SIGNALS.index("concentration")] = -plan_concentration(plan, mask)
    pool_values = torch.full((cos.shape[1], len(SIGNALS)), float("nan"), device=dev)
    if pool.signals is not None:
        pool_values[:] = pool.signals.to(dev)
    pool_values[:B] = values
    no_reference = not_pool | dup
    z = {s: caption_calibrated_z(values[:, SIGNALS.index(s)], pool_values[:, SIGNALS.index(s)],
                                 pool.captions.text[:B], pool.captions.text, cfg.gate_reference, no_reference)
         for s in measured}
    combined = mean_z({s: z[s] for s in cfg.gate_signals})
    neighbourhood_z = {s: z[s] for s in NEIGHBOURHOOD_SIGNALS if s in cfg.gate_signals}
    if neighbourhood_z:     # K copies teach the model their own caption (cosine, concentration): a group is judged
        combined = torch.where(dup.any(dim=1), mean_z(neighbourhood_z), combined)    # by its neighbourhood alone
    signal_z = torch.full_like(values, float("nan"))
    for name, zs in z.items():
        signal_z[:, SIGNALS.index(name)] = zs
    group = dup[:, :B] | torch.eye(B, dtype=torch.bool, device=dev)                   # (B, B) block members

    def group_mean(x: Tensor) -> Tensor:
        return (group.float() @ x.unsqueeze(1)).squeeze(1) / group.sum(1)

    return Evidence(values, signal_z, group_mean(combined), dup, 1 + dup.sum(1), nbrs, own_distance)


def fused_replacement(images: ImageFeatures, pool: Pool, cos: Tensor, rows: Tensor, allowed: Tensor,
                      neighbours: Tensor, cfg: RematchConfig, ot_cfg: OTConfig) -> tuple[Tensor, Tensor, Tensor]:
    """New captions for the flagged rows `rows` (F,): the candidate of best fused score.

    Candidates of row i: its top-k allowed pool captions by global cosine (the OT shortlist) and the captions of its
    first `candidate_neighbours` allowed image neighbours (neighbours (B, n), nearest first). allowed (B, N) bool:
    trusted rows that are neither the image itself nor its duplicates. Score: alpha * cos + (1 - alpha) * (1 - D_OT)
    (alpha = 1: no OT). Returns (candidates (F, K) pool rows, scores (F, K) with -inf for void slots, choice (F,)
    pool rows, -1 where no candidate is allowed).
    """
    if rows.numel() == 0:
        empty = torch.zeros((0, 1), dtype=torch.long, device=cos.device)
        return empty, empty.float(), torch.zeros(0, dtype=torch.long, device=cos.device)
    dev = cos.device
    ok = allowed[rows]                                                                 # (F, N)
    k = min(cfg.k, cos.shape[1])
    top, short = cos[rows].masked_fill(~ok, float("-inf")).topk(k, dim=1)              # (F, k)
    short_ok = torch.isfinite(top)
    nb = neighbours[rows]                                                              # (F, n)
    nb_ok = (nb >= 0) & ok.gather(1, nb.clamp_min(0))
    order = torch.where(nb_ok, torch.arange(nb.shape[1], device=dev), nb.shape[1]).argsort(dim=1)
    c = min(cfg.candidate_neighbours, nb.shape[1])
    nb, nb_ok = nb.gather(1, order[:, :c]), nb_ok.gather(1, order[:, :c])              # first c allowed neighbours
    cand = torch.cat([short, nb.clamp_min(0)], dim=1)                                  # (F, k + c)
    valid = torch.cat([short_ok, nb_ok], dim=1)
    cand = torch.where(valid, cand, cand[:, :1])                                       # void slots: any real row
    sub = ImageFeatures(images.image[rows], None if images.patches is None else images.patches[rows])
    scores = fused_scores(sub, pool, cand, cos[rows], cfg.alpha, ot_cfg).masked_fill(~valid, float("-inf"))
    choice = cand.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
    return cand, scores, torch.where(valid.any(dim=1), choice, torch.full_like(choice, -1))


def _sticky(gate_flagged: Tensor, prior: Optional[Tensor], cfg: RematchConfig) -> Tensor:
    """(B,) bool: the gate's verdict, plus the samples flagged in earlier epochs when flags are sticky."""
    return gate_flagged | prior.to(gate_flagged.device) if prior is not None and cfg.sticky else gate_flagged


def _gate_evidence(images: ImageFeatures, pool: Pool, cos: Tensor, exclude: Tensor, cfg: RematchConfig,
                   ot_cfg: OTConfig, prior: Optional[Tensor]) -> tuple[MatchResult, Tensor]:
    """Gate `evidence` (OTCCLIP): flag by calibrated evidence per duplicate group; a flagged sample's replacement is
    its candidate of best fused score (-1: no trusted candidate). Weights start at 1 / group size."""
    B, dev = images.image.shape[0], images.image.device
    own = torch.arange(B, device=dev)
    not_pool = exclude.clone()
    not_pool[own, own] = True
    ev = evidence(images, pool, cos, not_pool, cfg, ot_cfg)
    gate_flagged = ev.z < cfg.gate_threshold
    flagged = _sticky(gate_flagged, prior, cfg)
    trusted = pool.trusted.to(dev).clone()
    trusted[:B] = ~flagged
    allowed = trusted.unsqueeze(0) & ~not_pool & ~ev.duplicate                        # (B, N)
    c = cos[own, own]
    own_score = c if cfg.alpha >= 1.0 else cfg.alpha * c + (1.0 - cfg.alpha) * (1.0 - ev.own_distance)
    rows = flagged.nonzero().squeeze(1)
    width = min(cfg.k, cos.shape[1]) + min(cfg.candidate_neighbours, ev.neighbours.shape[1])
    candidates = own.unsqueeze(1).expand(B, width).clone()
    scores = torch.full((B, width), float("-inf"), device=dev)
    replacement = torch.full((B,), -1, dtype=torch.long, device=dev)
    cand, sc, choice = fused_replacement(images, pool, cos, rows, allowed, ev.neighbours, cfg, ot_cfg)
    candidates[rows, :cand.shape[1]], scores[rows, :sc.shape[1]] = cand, sc
    replacement[rows] = choice
    best_score = torch.maximum(own_score, scores.amax(dim=1))
    result = MatchResult(shortlist=candidates, scores=scores, own_in_topk=torch.ones(B, dtype=torch.bool, device=dev),
                         own_score=own_score, best_score=best_score, suspicion=best_score - own_score, gate_z=ev.z,
                         agreement=ev.signals[:, SIGNALS.index("agreement")], flagged=flagged, source=own,
                         recaptioned=torch.zeros_like(flagged), weight=1.0 / ev.group_size.float(),
                         signals=ev.signals, signal_z=ev.signal_z, group_size=ev.group_size, gate_flagged=gate_flagged)
    return result, replacement


def _gate_gmm(images: ImageFeatures, pool: Pool, cos: Tensor, exclude: Tensor, cfg: RematchConfig,
              ot_cfg: OTConfig, prior: Optional[Tensor]) -> tuple[MatchResult, Tensor]:
    """Gate `gmm`, SafeCLIP's split on the pool: a 2-component Gaussian mixture on the similarities of the pool's own
    pairs (block rows with the current weights, bank rows as banked); a block pair is safe when the clean component's
    posterior is >= `gmm_safe_probability` and its similarity is not among the pool's lowest 1 - `gmm_max_safe`.
    Risky pairs are flagged and keep their caption (replacement: their own; the action decides their weight:
    SafeCLIP drops them from the CLIP loss and trains them unimodally). gate_z carries the clean posterior."""
    B, dev = images.image.shape[0], images.image.device
    own = torch.arange(B, device=dev)
    c = cos[own, own]                                                                   # (B,) the block's own pairs
    pair = (pool.image.to(dev) * pool.captions.text).sum(dim=1)                        # (N,) own-pair similarities
    pair[:B] = c
    p_clean = gmm_clean_probability(pair)
    floor = torch.quantile(pair.double(), 1.0 - cfg.gmm_max_safe).float()
    gate_flagged = (p_clean[:B] < cfg.gmm_safe_probability) | (pair[:B] < floor)
    flagged = _sticky(gate_flagged, prior, cfg)
    result = MatchResult(shortlist=own.unsqueeze(1), scores=c.unsqueeze(1), own_in_topk=torch.ones_like(flagged),
                         own_score=c, best_score=c, suspicion=torch.zeros_like(c), gate_z=p_clean[:B],
                         agreement=torch.full_like(c, float("nan")), flagged=flagged, source=own,
                         recaptioned=torch.zeros_like(flagged), weight=torch.ones(B, device=dev),
                         gate_flagged=gate_flagged)
    return result, own.clone()


def _gate_none(images: ImageFeatures, pool: Pool, cos: Tensor, exclude: Tensor, cfg: RematchConfig,
               ot_cfg: OTConfig, prior: Optional[Tensor]) -> tuple[MatchResult, Tensor]:
    """Gate `none` (RoCLIP; OTCCLIP's rematch-all ablation): every image takes its best-scoring shortlisted caption;
    the samples whose choice is not their own caption count as flagged."""
    B, dev = images.image.shape[0], images.image.device
    own = torch.arange(B, device=dev)
    index, valid, in_top = shortlist(cos, cfg.k, exclude)
    scores = fused_scores(images, pool, index, cos, cfg.alpha, ot_cfg).masked_fill(~valid, float("-inf"))
    choice = index.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
    own_score = scores.masked_fill(index != own.unsqueeze(1), float("-inf")).amax(dim=1)
    best_score = scores.amax(dim=1)
    gate_flagged = choice != own
    nan = torch.full((B,), float("nan"), device=dev)
    result = MatchResult(shortlist=index, scores=scores, own_in_topk=in_top, own_score=own_score,
                         best_score=best_score, suspicion=best_score - own_score, gate_z=nan, agreement=nan,
                         flagged=_sticky(gate_flagged, prior, cfg), source=own, recaptioned=torch.zeros(B, dtype=torch.bool, device=dev),
                         weight=torch.ones(B, device=dev), gate_flagged=gate_flagged)
    return result, choice


GATES = {"evidence": _gate_evidence, "gmm": _gate_gmm, "none": _gate_none}   # rematch.gate -> its gate


def apply_action(result: MatchResult, replacement: Tensor, cfg: RematchConfig) -> MatchResult:
    """The action on the flagged samples: `recaption` trains each with its replacement caption (a pool row; -1 =
    none trusted: the sample is dropped, weight 0), `drop` gives it weight 0, `downweight` multiplies its weight by
    `flagged_weight`. result: a gate's outcome (source = own rows, weight = the gate's base weight); replacement (B,)
    int64. Returns the result with source, recaptioned and weight set."""
    flagged, weight = result.flagged, result.weight
    own = torch.arange(flagged.shape[0], device=flagged.device)
    source = own
    if cfg.action == "recaption":
        has_new = flagged & (replacement >= 0)
        source = torch.where(has_new, replacement, own)
        weight = weight.masked_fill(flagged & ~has_new, 0.0)
    elif cfg.action == "drop":
        weight = weight.masked_fill(flagged, 0.0)
    elif cfg.action == "downweight":
        weight = torch.where(flagged, weight * cfg.flagged_weight, weight)
    else:
        raise ValueError(f"rematch.action must be recaption, drop or downweight, got {cfg.action!r}")
    return dataclasses.replace(result, source=source, recaptioned=source != own, weight=weight)


def match_block(images: ImageFeatures, pool: Pool, key_ids: Tensor, cfg: RematchConfig,
                ot_cfg: OTConfig, prior: Optional[Tensor] = None) -> MatchResult:
    """Re-match a block of B images against the pool (see `MatchResult` for every output).

    images: B images; pool: N >= B captions, rows 0..B-1 the block's own; key_ids (B,) int64;
    prior (B,) bool: samples flagged before (sticky flags, cfg.sticky): they stay flagged whatever the gate says.
    The gate (`GATES[cfg.gate]`) flags and proposes replacements; `apply_action` applies cfg.action.
    """
    if cfg.gate not in GATES:
        raise ValueError(f"rematch.gate must be one of {', '.join(GATES)}, got {cfg.gate!r}")
    B, N = images.image.shape[0], pool.captions.text.shape[0]
    if N < B:
        raise ValueError(f"the pool must start with the block's own {B} captions, got {N} rows")
    dev = images.image.device
    exclude = _exclusions(key_ids.to(dev), pool.key_ids.to(dev))
    cos = images.image @ pool.captions.text.T                                                    # (B, N)
    result, replacement = GATES[cfg.gate](images, pool, cos, exclude, cfg, ot_cfg, prior)
    return apply_action(result, replacement, cfg)


# ----------------------------------------------------------------------------------------- the bank
@dataclass
class CaptionBank:
    """FIFO of the most recent `size` captions with their features (RoCLIP's memory bank).

    text (S, d), words (S, L, d), word_mask (S, L), image (S, d), key_ids (S,), trusted (S,), image_ids (S,) pixel
    hashes, signatures (S, 256) pixel signatures, signals (S, len(SIGNALS)) gate evidence, captions / keys (S,)
    strings, labels (S,) class indices (-1 = unknown); S <= size. Tensors live on the matcher's device.
    """

    size: int
    text: Optional[Tensor] = None
    words: Optional[Tensor] = None
    word_mask: Optional[Tensor] = None
    image: Optional[Tensor] = None
    key_ids: Optional[Tensor] = None
    trusted: Optional[Tensor] = None
    image_ids: Optional[Tensor] = None
    signatures: Optional[Tensor] = None
    signals: Optional[Tensor] = None
    captions: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def clear(self) -> None:
        self.text = self.words = self.word_mask = self.image = self.key_ids = self.trusted = None
        self.image_ids = self.signatures = self.signals = None
        self.captions, self.keys, self.labels = [], [], []

    def push(self, caps: CaptionFeatures, image: Tensor, key_ids: Tensor, trusted: Tensor,
             captions: Sequence[str], keys: Sequence[str], labels: Sequence[int],
             image_ids: Optional[Tensor] = None, signatures: Optional[Tensor] = None,
             signals: Optional[Tensor] = None) -> None:
        """Append B entries, keeping the newest `size` (their own captions; `trusted` = not flagged)."""
        new = dict(text=caps.text, words=caps.words, word_mask=caps.word_mask, image=image, key_ids=key_ids,
                   trusted=trusted, image_ids=image_ids, signatures=signatures, signals=signals)
        for name, value in new.items():
            old = getattr(self, name)
            if value is None:
                setattr(self, name, None)
                continue
            if old is not None and name in ("words", "word_mask") and old.shape[1] != value.shape[1]:
                old, value = _pad_tokens(old, value)
            joined = value if old is None else torch.cat([old, value])
            setattr(self, name, joined[-self.size:])
        self.captions = (self.captions + list(captions))[-self.size:]
        self.keys = (self.keys + list(keys))[-self.size:]
        self.labels = (self.labels + list(labels))[-self.size:]


def _pad_tokens(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pad two token tensors (n, L, ...) to the same L (zeros / False): for concatenation along dim 0."""
    L = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, L - t.shape[1]))  # noqa: E731
    return pad(a), pad(b)


def build_pool(own: CaptionFeatures, image: ImageFeatures, key_ids: Tensor, bank: Optional[CaptionBank]) -> Pool:
    """The pool of a block: its own B captions, then the bank (when given and not empty)."""
    B = own.text.shape[0]
    trusted = torch.ones(B, dtype=torch.bool, device=own.text.device)
    if bank is None or len(bank) == 0:
        return Pool(own, image.image, key_ids, trusted, image.ids, image.signature)
    words = mask = None
    if own.words is not None and bank.words is not None:
        words = torch.cat(_pad_tokens(own.words, bank.words))
        mask = torch.cat(_pad_tokens(own.word_mask, bank.word_mask))
    join = lambda a, b: None if a is None or b is None else torch.cat([a, b])          # noqa: E731
    signals = None
    if bank.signals is not None:
        signals = torch.cat([torch.full((B, bank.signals.shape[1]), float("nan"), device=bank.signals.device),
                             bank.signals])
    return Pool(CaptionFeatures(torch.cat([own.text, bank.text]), words, mask), torch.cat([image.image, bank.image]),
                torch.cat([key_ids, bank.key_ids]), torch.cat([trusted, bank.trusted]),
                join(image.ids, bank.image_ids), join(image.signature, bank.signatures), signals)


# ----------------------------------------------------------------------------------------- the wrapper
@dataclass
class BlockMatch:
    """A matched block as the stage writes it: MatchResult on the CPU plus, per sample, the caption used,
    the key of the sample that caption came from (its own key when unchanged) and that sample's class label
    (-1 when unknown; what the damage metric compares)."""

    result: MatchResult
    caption_used: list[str]
    source_key: list[str]
    source_label: list[int]


def key_ids_of(keys: Sequence[str]) -> Tensor:
    """(B,) int64 ids of sample keys (stable within a process; the bank lives in one process)."""
    return torch.tensor([hash(k) for k in keys], dtype=torch.int64)


class Matcher:
    """A model plus the re-matching config: features for a block, then `match_block`, then the bank update.

    `load_state_dict` swaps weights (and empties the bank: its features came from the old weights).
    """

    def __init__(self, bundle: ClipBundle, cfg: RematchConfig, ot_cfg: OTConfig, device: str | torch.device = "cpu"):
        validate(cfg)
        self.bundle, self.cfg, self.ot_cfg = bundle, cfg, ot_cfg
        self.device = torch.device(device)
        self.model = bundle.model.to(self.device).eval()
        self.bank = CaptionBank(cfg.bank_size)
        self.reference: Optional[tuple] = None      # (images, captions, keys, labels): a fixed bank, see set_reference
        self.frozen = False

    def set_reference(self, images: np.ndarray, captions: Sequence[str], keys: Sequence[str],
                      labels: Sequence[int]) -> None:
        """Use a fixed reference instead of the FIFO bank: before the next block, the reference (R rows: images
        (R, H, W, 3) uint8, captions, keys, labels) is matched as one block and becomes the bank, which then stays
        as it is. Every block is then judged against the same bank, whatever order blocks come in and whichever
        matcher gets them: decisions are a function of the block, the reference and the weights (the cleaning job
        relies on it for reproducible output)."""
        self.reference = (np.asarray(images), list(captions), list(keys), [int(x) for x in labels])
        self.frozen = False
        self.bank.clear()

    def _fill_reference(self) -> None:
        if self.reference is None or self.frozen:
            return
        self.bank.clear()
        reference, self.reference = self.reference, None                 # matched as a plain block, once
        try:
            if len(reference[1]):
                self.match(*reference[:3], labels=reference[3])          # bank := the matched reference
        finally:
            self.reference = reference
        self.frozen = True

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
        self.bank.clear()
        self.frozen = False                         # a fixed reference is matched again with the new weights

    def _needs_tokens(self) -> bool:
        """Token features are needed for OT: the fused scores (alpha < 1) or the evidence gate's concentration."""
        return self.cfg.alpha < 1.0 or (self.cfg.gate == "evidence" and "concentration" in self.cfg.gate_signals)

    @torch.inference_mode()
    def encode(self, images: np.ndarray, captions: Sequence[str]) -> tuple[ImageFeatures, CaptionFeatures]:
        """uint8 images (B, H, W, 3) and B captions -> features on the device, float32, unit norm.

        One forward of both towers, the image tower in chunks of ENCODE_CHUNK rows (a 512-row block at once runs
        ~20% slower per image on CPU: its activations leave the cache); token features only when OT needs them.
        The images also get their pixel hashes and signatures (`otc_ray.identity`: the duplicate test of the
        evidence gate)."""
        pixels = images_to_tensor(images, self.bundle.image_size, self.device)
        ids = self.bundle.tokenizer(list(captions)).to(self.device)
        pixel_ids = identity.image_ids(images).to(self.device)
        signature = identity.pixel_signatures(images).to(self.device)
        chunks = pixels.split(ENCODE_CHUNK)
        with self.bundle.autocast(self.device):
            if self._needs_tokens():
                parts = [encode_image_tokens(self.model, c) for c in chunks]
                image, patches = (torch.cat(x).float() for x in zip(*parts))
                text, words, mask = encode_text_tokens(self.model, ids, self.ot_cfg.special_tokens)
                return (ImageFeatures(image, patches, pixel_ids, signature),
                        CaptionFeatures(text.float(), words.float(), mask))
            return (ImageFeatures(torch.cat([encode_image(self.model, c) for c in chunks]).float(), None, pixel_ids,
                                  signature),
                    CaptionFeatures(encode_text(self.model, ids).float()))

    @torch.inference_mode()
    def match(self, images: np.ndarray, captions: Sequence[str], keys: Sequence[str],
              prior: Optional[Sequence[bool]] = None, labels: Optional[Sequence[int]] = None) -> BlockMatch:
        """Re-match one block: images uint8 (B, H, W, 3), B captions, B keys, optional sticky flags (B,) from
        earlier epochs and class labels (B,) (None = unknown) -> BlockMatch (then bank += block)."""
        B = len(captions)
        labels = [-1] * B if labels is None else [int(x) for x in labels]
        if len(keys) != B or len(images) != B or len(labels) != B:
            raise ValueError(f"a block needs as many images, captions, keys and labels; got {len(images)}, {B}, "
                             f"{len(keys)}, {len(labels)}")
        if not self.cfg.enabled or B == 0:
            return _passthrough(captions, keys, labels)
        self._fill_reference()
        img, own = self.encode(images, captions)
        ids = key_ids_of(keys).to(self.device)
        pool = build_pool(own, img, ids, self.bank)
        prior_t = None if prior is None else torch.as_tensor(np.asarray(prior, dtype=bool), device=self.device)
        res = match_block(img, pool, ids, self.cfg, self.ot_cfg, prior=prior_t).to("cpu")
        pool_caps = list(captions) + self.bank.captions
        pool_keys = list(keys) + self.bank.keys
        pool_labels = labels + self.bank.labels
        src = res.source.tolist()
        same_text = torch.tensor([pool_caps[s] == c for s, c in zip(src, captions)], dtype=torch.bool)
        res.source = torch.where(same_text, torch.arange(B), res.source)              # a copy of the same words
        res.recaptioned = res.source != torch.arange(B)
        if not self.frozen:
            self.bank.push(own, img.image, ids, ~res.flagged.to(self.device), captions, keys, labels, img.ids,
                           img.signature, None if res.signals is None else res.signals.to(self.device))
        src = res.source.tolist()
        return BlockMatch(res, [pool_caps[s] for s in src], [pool_keys[s] for s in src], [pool_labels[s] for s in src])


def _passthrough(captions: Sequence[str], keys: Sequence[str], labels: Sequence[int]) -> BlockMatch:
    """Re-matching off (`rematch.enabled` false): every sample keeps its caption, weight 1, nothing flagged."""
    B = len(captions)
    nan = torch.full((B,), float("nan"))
    own = torch.arange(B)
    res = MatchResult(shortlist=own.unsqueeze(1), scores=nan.unsqueeze(1), own_in_topk=torch.ones(B, dtype=torch.bool),
                      own_score=nan, best_score=nan, suspicion=nan, gate_z=nan, agreement=nan,
                      flagged=torch.zeros(B, dtype=torch.bool), source=own, recaptioned=torch.zeros(B, dtype=torch.bool),
                      weight=torch.ones(B))
    return BlockMatch(res, list(captions), list(keys), list(labels))
