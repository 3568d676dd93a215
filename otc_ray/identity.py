"""Content ids: 64-bit hashes of a sample's pixels and of its caption text; equal ids = byte-identical content.

    image_ids(images_uint8)         # (B,) int64, from the decoded pixels (B, H, W, C)
    text_ids(captions)              # (B,) int64, from the UTF-8 bytes
    pixel_signatures(images_uint8)  # (B, 256) unit vectors: cosine ~1 between near-identical images

Used to find exact duplicates: the copies of a targeted attack (the re-match gate judges them as one sample) and
in-batch pairs that are not negatives of each other (identical captions or images, `losses.duplicate_pairs`).

Top level, beside model.py and losses.py: the re-match gate, the losses and the trainer all read these ids, so
no one stage owns them.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def _id(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def image_ids(images: np.ndarray | Sequence[np.ndarray]) -> Tensor:
    """uint8 images (B, H, W, C) -> (B,) int64 hashes of their pixels (shape included)."""
    return torch.tensor([_id(np.ascontiguousarray(im).tobytes() + repr(np.shape(im)).encode()) for im in images],
                        dtype=torch.int64)


def text_ids(captions: Sequence[str]) -> Tensor:
    """B captions -> (B,) int64 hashes of their UTF-8 bytes."""
    return torch.tensor([_id(str(c).encode("utf-8", "surrogatepass")) for c in captions], dtype=torch.int64)


SIGNATURE_SIDE = 16


def pixel_signatures(images: np.ndarray | Sequence[np.ndarray]) -> Tensor:
    """uint8 images (B, H, W, C) -> (B, 256) float32: grey, 16 x 16 area means, mean-centred, unit norm.

    A model-free near-duplicate test: two copies of one image (a re-encode, a pixel of noise) have signature cosine
    ~1, while an untrained encoder maps every image to nearly the same embedding. A constant image is all zeros.
    """
    x = torch.as_tensor(np.ascontiguousarray(images)).float()
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    grey = x.mean(dim=-1).unsqueeze(1)                                                 # (B, 1, H, W)
    sig = torch.nn.functional.adaptive_avg_pool2d(grey, SIGNATURE_SIDE).flatten(1)
    sig = sig - sig.mean(dim=1, keepdim=True)
    return torch.nn.functional.normalize(sig, dim=1)
