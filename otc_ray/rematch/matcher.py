"""Caption re-matching (METHOD.md B): shortlist, OT re-rank, assign, gate, act. Pure torch, no Ray.

Two layers:
  * `match_block(images, pool, key_ids, cfg, ot_cfg) -> MatchResult` is the core. It takes features only
    (hand-built in tests), so every decision is checkable without a model.
  * `Matcher` is the model-facing wrapper: one forward of both towers per block, a FIFO `CaptionBank` of recent
    captions (`rematch.pool: bank`), and strings (caption used, source key) for the Ray stage.

    matcher = Matcher(build_model(model_cfg), cfg.rematch, cfg.ot, device="cpu")
    out = matcher.match(images_uint8, captions, keys)        # BlockMatch: MatchResult + caption_used, source_key

Pool layout: rows 0..B-1 are the block's own captions (row i belongs to image i), rows B.. are the bank.
The cost: one GEMM for the global cosines (B, N), OT only on the B x k shortlisted pairs (one batched call,
word tokens trimmed to the longest real caption), the gates on (B, N) / (B, n) tensors; no loop over samples.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from otc_ray import ot
from otc_ray.config import OTConfig, RematchConfig
from otc_ray.model import ClipBundle, encode_image, encode_text, features, images_to_tensor

from .gates import margin_flags, neighbour_agreement, neighbour_vote, robust_z


# ----------------------------------------------------------------------------------------- containers
@dataclass
class ImageFeatures:
    """B images: g (B, d) unit global embeddings; patches (B, M, d) unit patch tokens (None when unused)."""

    g: Tensor
    patches: Optional[Tensor] = None


@dataclass
class CaptionFeatures:
    """N captions: t (N, d) unit global embeddings; words (N, L, d) unit word tokens and mask (N, L) bool,
    True at real tokens (None when unused)."""

    t: Tensor
    words: Optional[Tensor] = None
    mask: Optional[Tensor] = None


@dataclass
class Pool:
    """The captions a block may be re-matched to (N >= B rows; rows 0..B-1 are the block's own).

    captions: CaptionFeatures (N rows); image: (N, d) unit embedding of the image each caption came with
    (the neighbour gate's image neighbours); key_ids: (N,) int64 sample-key ids (bank copies of a block
    sample are excluded from its candidates and neighbours); trusted: (N,) bool, False for bank entries
    that were flagged when they were matched (the neighbour vote never copies their caption).
    """

    captions: CaptionFeatures
    image: Tensor
    key_ids: Tensor
    trusted: Tensor


@dataclass
class MatchResult:
    """Per-sample outcome of re-matching a block of B images (indices point into the pool, N rows).

    shortlist (B, k) int64: candidate captions, global cosine order, the own caption forced in;
    scores (B, k) float: fused scores alpha*cos + (1-alpha)*(1-D_OT) (roclip: cos), -inf for void slots;
    own_in_topk (B,) bool: the own caption made the natural top-k by global cosine;
    assigned (B,) int64: the method's choice (argmax of scores, or the balanced assignment);
    own_score, best_score, suspicion (B,) float: own caption's score, best candidate's score, best - own;
    gate_z (B,) float: the robust z-score the gate thresholds (NaN for gates none / margin);
    agreement (B,) float: neighbour caption agreement (NaN unless gate neighbour);
    flagged (B,) bool: the gate's verdict (gate none: the method changed the caption);
    source (B,) int64: the pool row whose caption the sample trains with (i itself when unchanged);
    recaptioned (B,) bool: source != i;  weight (B,) float: loss weight (0 = dropped, action drop).
    """

    shortlist: Tensor
    scores: Tensor
    own_in_topk: Tensor
    assigned: Tensor
    own_score: Tensor
    best_score: Tensor
    suspicion: Tensor
    gate_z: Tensor
    agreement: Tensor
    flagged: Tensor
    source: Tensor
    recaptioned: Tensor
    weight: Tensor

    def to(self, device: str | torch.device) -> "MatchResult":
        return MatchResult(**{k: v.to(device) for k, v in self.__dict__.items()})


def check_config(cfg: RematchConfig) -> None:
    """ValueError naming the key for rematch values the config schema does not range-check."""
    if cfg.margin < 0:
        raise ValueError(f"rematch.margin must be >= 0, got {cfg.margin}")
    if not cfg.assign_eps > 0:
        raise ValueError(f"rematch.assign_eps must be > 0, got {cfg.assign_eps}")
    if cfg.assign_iters < 1:
        raise ValueError(f"rematch.assign_iters must be >= 1, got {cfg.assign_iters}")
    if not 0.0 <= cfg.flagged_weight <= 1.0:
        raise ValueError(f"rematch.flagged_weight must be in [0, 1], got {cfg.flagged_weight}")
    if not cfg.duplicate_similarity > 0:
        raise ValueError(f"rematch.duplicate_similarity must be > 0 (> 1 disables), got {cfg.duplicate_similarity}")


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


def _trim(words: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop trailing token positions that are padding in every caption: (N, L, d) -> (N, L', d)."""
    real = mask.any(dim=0).nonzero()
    L = int(real.max()) + 1 if real.numel() else 1
    return words[:, :L], mask[:, :L]


def fused_scores(images: ImageFeatures, pool: Pool, index: Tensor, cos: Tensor, alpha: float,
                 ot_cfg: OTConfig) -> Tensor:
    """alpha * cos + (1 - alpha) * (1 - D_OT) on the shortlist: index (B, k), cos (B, N) -> (B, k).

    D_OT runs once, batched over the B x k (image, candidate) pairs (`ot.candidate_ot_distance_cfg`).
    """
    c = cos.gather(1, index)
    if alpha >= 1.0:
        return c
    caps = pool.captions
    if images.patches is None or caps.words is None or caps.mask is None:
        raise ValueError("OT re-ranking (alpha < 1) needs patch tokens and word tokens with their mask")
    words, mask = _trim(caps.words, caps.mask)
    D = ot.candidate_ot_distance_cfg(images.patches, words, index, None, mask, ot_cfg)
    return alpha * c + (1.0 - alpha) * (1.0 - D.to(c.dtype))


def assign(scores: Tensor, index: Tensor, how: str, eps: float, iters: int) -> Tensor:
    """The chosen pool row per image: scores (B, k) (-inf = void), index (B, k) -> (B,) int64.

    "argmax": each image its best candidate. "balanced": an entropic OT plan between the B images (mass 1/B each)
    and the U distinct shortlisted captions (mass 1/U each) over the shortlist scores, then each image's
    heaviest candidate; a caption wanted by a crowd cannot absorb more than its share.
    """
    if how == "argmax":
        return index.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
    if how != "balanced":
        raise ValueError(f"rematch.assign must be argmax or balanced, got {how!r}")
    valid = torch.isfinite(scores)
    cols, inverse = torch.unique(index[valid], return_inverse=True)                     # U distinct captions
    dense = torch.full((index.shape[0], cols.numel()), float("-inf"), dtype=scores.dtype, device=scores.device)
    rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)[valid]
    dense[rows, inverse] = scores[valid]
    plan = ot.balanced_assignment(dense, eps=eps, iters=iters)
    return cols[plan.argmax(dim=1)]


def match_block(images: ImageFeatures, pool: Pool, key_ids: Tensor, cfg: RematchConfig,
                ot_cfg: OTConfig, prior: Optional[Tensor] = None) -> MatchResult:
    """Re-match a block of B images against the pool (see `MatchResult` for every output).

    images: B images; pool: N >= B captions, rows 0..B-1 the block's own; key_ids (B,) int64;
    prior (B,) bool: samples flagged before (sticky flags, cfg.sticky): they stay flagged whatever the gate says.
    cfg.method "otcclip" (fused OT re-rank) or "roclip" (global cosine only); "none" is the caller's
    pass-through and is refused here.
    """
    if cfg.method not in ("otcclip", "roclip"):
        raise ValueError(f"match_block runs methods otcclip and roclip, got {cfg.method!r}")
    B, N = images.g.shape[0], pool.captions.t.shape[0]
    if N < B:
        raise ValueError(f"the pool must start with the block's own {B} captions, got {N} rows")
    dev = images.g.device
    own = torch.arange(B, device=dev)
    exclude = _exclusions(key_ids.to(dev), pool.key_ids.to(dev))
    cos = images.g @ pool.captions.t.T                                                    # (B, N)
    index, valid, in_top = shortlist(cos, cfg.k, exclude)
    alpha = cfg.alpha if cfg.method == "otcclip" else 1.0
    scores = fused_scores(images, pool, index, cos, alpha, ot_cfg).masked_fill(~valid, float("-inf"))
    assigned = assign(scores, index, cfg.assign, cfg.assign_eps, cfg.assign_iters)
    own_score = scores.masked_fill(index != own.unsqueeze(1), float("-inf")).amax(dim=1)
    best_score = scores.amax(dim=1)
    suspicion = best_score - own_score

    nan = torch.full((B,), float("nan"), device=dev)
    gate_z, agreement, replacement = nan, nan, assigned
    if cfg.gate == "none":
        flagged = assigned != own
    elif cfg.gate == "margin":
        flagged = margin_flags(in_top, own_score, best_score, cfg.margin)
    elif cfg.gate == "zscore":
        gate_z = robust_z(-suspicion)
        flagged = gate_z < cfg.gate_threshold
    elif cfg.gate == "neighbour":
        not_nbr = exclude.clone()
        not_nbr[own, own] = True                                                         # an image is not its own neighbour
        agreement, nbrs = neighbour_agreement(images.g, pool.image, pool.captions.t[:B], pool.captions.t,
                                              cfg.neighbours, not_nbr, cfg.duplicate_similarity)
        gate_z = robust_z(agreement)
        flagged = gate_z < cfg.gate_threshold
        if prior is not None and cfg.sticky:
            flagged = flagged | prior.to(dev)
        trusted = pool.trusted.to(dev).clone()
        trusted[:B] = ~flagged
        vote = neighbour_vote(nbrs, trusted)
        replacement = torch.where(vote >= 0, vote, assigned)
    else:
        raise ValueError(f"rematch.gate must be none, margin, zscore or neighbour, got {cfg.gate!r}")
    if prior is not None and cfg.sticky:
        flagged = flagged | prior.to(dev)

    weight = torch.ones(B, device=dev)
    source = own.clone()
    if cfg.action == "recaption":
        source = torch.where(flagged, replacement, own)
    elif cfg.action == "drop":
        weight = weight.masked_fill(flagged, 0.0)
    elif cfg.action == "downweight":
        weight = weight.masked_fill(flagged, cfg.flagged_weight)
    else:
        raise ValueError(f"rematch.action must be recaption, drop or downweight, got {cfg.action!r}")
    return MatchResult(shortlist=index, scores=scores, own_in_topk=in_top, assigned=assigned, own_score=own_score,
                       best_score=best_score, suspicion=suspicion, gate_z=gate_z, agreement=agreement,
                       flagged=flagged, source=source, recaptioned=source != own, weight=weight)


# ----------------------------------------------------------------------------------------- the bank
@dataclass
class CaptionBank:
    """FIFO of the most recent `size` captions with their features (RoCLIP's memory bank).

    t (S, d), words (S, L, d), mask (S, L), image (S, d), key_ids (S,), trusted (S,), captions / keys (S,)
    strings, labels (S,) class indices (-1 = unknown); S <= size. Tensors live on the matcher's device.
    """

    size: int
    t: Optional[Tensor] = None
    words: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    image: Optional[Tensor] = None
    key_ids: Optional[Tensor] = None
    trusted: Optional[Tensor] = None
    captions: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def clear(self) -> None:
        self.t = self.words = self.mask = self.image = self.key_ids = self.trusted = None
        self.captions, self.keys, self.labels = [], [], []

    def push(self, caps: CaptionFeatures, image: Tensor, key_ids: Tensor, trusted: Tensor,
             captions: Sequence[str], keys: Sequence[str], labels: Sequence[int]) -> None:
        """Append B entries, keeping the newest `size` (their own captions; `trusted` = not flagged)."""
        new = dict(t=caps.t, words=caps.words, mask=caps.mask, image=image, key_ids=key_ids, trusted=trusted)
        for name, value in new.items():
            old = getattr(self, name)
            if value is None:
                setattr(self, name, None)
                continue
            joined = value if old is None else torch.cat([old, value])
            setattr(self, name, joined[-self.size:])
        self.captions = (self.captions + list(captions))[-self.size:]
        self.keys = (self.keys + list(keys))[-self.size:]
        self.labels = (self.labels + list(labels))[-self.size:]


def build_pool(own: CaptionFeatures, image: ImageFeatures, key_ids: Tensor, bank: Optional[CaptionBank]) -> Pool:
    """The pool of a block: its own B captions, then the bank (when given and not empty)."""
    B = own.t.shape[0]
    trusted = torch.ones(B, dtype=torch.bool, device=own.t.device)
    if bank is None or len(bank) == 0:
        return Pool(own, image.g, key_ids, trusted)
    words = mask = None
    if own.words is not None and bank.words is not None:
        L = max(own.words.shape[1], bank.words.shape[1])
        pad = lambda w, n: torch.nn.functional.pad(w, (0, 0, 0, n - w.shape[1]))          # noqa: E731
        padm = lambda m, n: torch.nn.functional.pad(m, (0, n - m.shape[1]))              # noqa: E731
        words = torch.cat([pad(own.words, L), pad(bank.words, L)])
        mask = torch.cat([padm(own.mask, L), padm(bank.mask, L)])
    return Pool(CaptionFeatures(torch.cat([own.t, bank.t]), words, mask), torch.cat([image.g, bank.image]),
                torch.cat([key_ids, bank.key_ids]), torch.cat([trusted, bank.trusted]))


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
        check_config(cfg)
        self.bundle, self.cfg, self.ot_cfg = bundle, cfg, ot_cfg
        self.device = torch.device(device)
        self.model = bundle.model.to(self.device).eval()
        self.bank = CaptionBank(cfg.bank_size) if cfg.pool == "bank" else None

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
        if self.bank is not None:
            self.bank.clear()

    def _autocast(self):
        dtype = self.bundle.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def _needs_tokens(self) -> bool:
        return self.cfg.method == "otcclip" and self.cfg.alpha < 1.0

    @torch.inference_mode()
    def encode(self, images: np.ndarray, captions: Sequence[str]) -> tuple[ImageFeatures, CaptionFeatures]:
        """uint8 images (B, H, W, 3) and B captions -> features on the device, float32, unit norm.

        One forward of both towers; token features only when the OT re-rank needs them."""
        pixels = images_to_tensor(images, self.bundle.image_size, self.device)
        ids = self.bundle.tokenizer(list(captions)).to(self.device)
        with self._autocast():
            if self._needs_tokens():
                f = features(self.model, pixels, ids)
                return (ImageFeatures(f.image.float(), f.patches.float()),
                        CaptionFeatures(f.text.float(), f.words.float(), f.word_mask))
            return (ImageFeatures(encode_image(self.model, pixels).float()),
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
        if self.cfg.method == "none" or B == 0:
            return _passthrough(captions, keys, labels)
        img, own = self.encode(images, captions)
        ids = key_ids_of(keys).to(self.device)
        pool = build_pool(own, img, ids, self.bank)
        prior_t = None if prior is None else torch.as_tensor(np.asarray(prior, dtype=bool), device=self.device)
        res = match_block(img, pool, ids, self.cfg, self.ot_cfg, prior=prior_t).to("cpu")
        pool_caps = list(captions) + (self.bank.captions if self.bank is not None else [])
        pool_keys = list(keys) + (self.bank.keys if self.bank is not None else [])
        pool_labels = labels + (self.bank.labels if self.bank is not None else [])
        src = res.source.tolist()
        same_text = torch.tensor([pool_caps[s] == c for s, c in zip(src, captions)], dtype=torch.bool)
        res.source = torch.where(same_text, torch.arange(B), res.source)              # a copy of the same words
        res.recaptioned = res.source != torch.arange(B)
        if self.bank is not None:
            self.bank.push(own, img.g, ids, ~res.flagged.to(self.device), captions, keys, labels)
        src = res.source.tolist()
        return BlockMatch(res, [pool_caps[s] for s in src], [pool_keys[s] for s in src], [pool_labels[s] for s in src])


def _passthrough(captions: Sequence[str], keys: Sequence[str], labels: Sequence[int]) -> BlockMatch:
    """Method none: every sample keeps its caption, weight 1, nothing flagged, scores NaN."""
    B = len(captions)
    nan = torch.full((B,), float("nan"))
    own = torch.arange(B)
    res = MatchResult(shortlist=own.unsqueeze(1), scores=nan.unsqueeze(1), own_in_topk=torch.ones(B, dtype=torch.bool),
                      assigned=own, own_score=nan, best_score=nan, suspicion=nan, gate_z=nan, agreement=nan,
                      flagged=torch.zeros(B, dtype=torch.bool), source=own, recaptioned=torch.zeros(B, dtype=torch.bool),
                      weight=torch.ones(B))
    return BlockMatch(res, list(captions), list(keys), list(labels))
