"""The `Encoder` protocol the metric wrappers take, and batched encoding helpers.

Any object with these two methods works (a trained open_clip model behind its preprocessing, a
re-matching actor's frozen copy, a test double built on a tiny random model).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Encoder(Protocol):
    """Maps raw images and captions to L2-normalized embeddings in one shared space of dimension d."""

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """images: uint8 (B, H, W, 3) -> float (B, d), rows of unit norm."""
        ...

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        """captions: B strings -> float (B, d), rows of unit norm."""
        ...


def encode_images(encoder: Encoder, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Encode uint8 images (N, H, W, 3) in batches without gradients -> float32 CPU (N, d)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    chunks = [images[i:i + batch_size] for i in range(0, len(images), _check_batch_size(batch_size))]
    return _encode(encoder.encode_images, chunks)


def encode_texts(encoder: Encoder, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Encode captions in batches without gradients -> float32 CPU (N, d)."""
    captions = list(captions)
    chunks = [captions[i:i + batch_size] for i in range(0, len(captions), _check_batch_size(batch_size))]
    return _encode(encoder.encode_texts, chunks)


def _encode(fn, chunks: list) -> torch.Tensor:
    if not chunks:
        raise ValueError("nothing to encode: got 0 inputs")
    with torch.no_grad():
        out = [fn(chunk).detach().to("cpu", torch.float32) for chunk in chunks]
    for chunk, emb in zip(chunks, out):
        if emb.ndim != 2 or emb.shape[0] != len(chunk):
            raise ValueError(f"encoder returned shape {tuple(emb.shape)} for {len(chunk)} inputs; expected (B, d)")
    return torch.cat(out)


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size
