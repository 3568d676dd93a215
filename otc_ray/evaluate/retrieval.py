"""Image<->text retrieval recall@k from paired embeddings (row i of images goes with row i of texts).

A query counts as a hit at k when its best-scoring correct candidate has fewer than k wrong candidates
scoring at least as high (ties go against the query, so a collapsed model scores 0, not 1). By default
the only correct candidate is the paired one; `groups` (N,) makes every candidate with the query's group
id correct (e.g. identical captions, which template-captioned data has many of).
"""
from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np
import torch

from otc_ray.evaluate._tensors import as_embeddings
from otc_ray.evaluate.encoder import Encoder, encode_images, encode_texts

_CHUNK = 1024   # query rows scored at a time: memory O(_CHUNK * N)


def retrieval_metrics(image_emb: Any, text_emb: Any, ks: Sequence[int] = (1, 5),
                      groups: Sequence[Hashable] | None = None) -> dict[str, float]:
    """{"retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_t2i_r1", "retrieval_t2i_r5"} for paired
    image (N, d) and text (N, d) embeddings; cosine similarity."""
    img = as_embeddings(image_emb, "image embeddings")
    txt = as_embeddings(text_emb, "text embeddings", dim=img.shape[1])
    if img.shape[0] != txt.shape[0] or img.shape[0] == 0:
        raise ValueError(f"need the same number (>= 1) of images and texts, got {img.shape[0]} and {txt.shape[0]}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    gid = _group_ids(groups, img.shape[0])
    out: dict[str, float] = {}
    for name, queries, candidates in (("i2t", img, txt), ("t2i", txt, img)):
        ranks = _ranks(queries, candidates, gid)
        out.update({f"retrieval_{name}_r{k}": float((ranks < k).double().mean()) for k in ks})
    return out


def evaluate_retrieval(encoder: Encoder, images: np.ndarray, captions: Sequence[str], batch_size: int = 256,
                       group_identical_captions: bool = True) -> dict[str, float]:
    """Retrieval R@1/R@5 of `encoder` on paired uint8 images (N, H, W, 3) and N captions.

    With `group_identical_captions`, retrieving any copy of the same caption text (or, text to image, any
    image carrying that caption) is a hit.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images and {len(captions)} captions")
    groups = list(captions) if group_identical_captions else None
    return retrieval_metrics(encode_images(encoder, images, batch_size), encode_texts(encoder, captions, batch_size),
                             groups=groups)


def _group_ids(groups: Sequence[Hashable] | None, n: int) -> torch.Tensor:
    if groups is None:
        return torch.arange(n)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries, expected {n}")
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in groups], dtype=torch.int64)


def _ranks(queries: torch.Tensor, candidates: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
    """Per query (N,): wrong candidates scoring >= the best correct candidate."""
    ranks = []
    for start in range(0, queries.shape[0], _CHUNK):
        sim = queries[start:start + _CHUNK] @ candidates.T                      # (q, N)
        correct = gid[start:start + _CHUNK, None] == gid[None, :]                 # (q, N)
        best = sim.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((sim >= best) & ~correct).sum(dim=1))
    return torch.cat(ranks)
