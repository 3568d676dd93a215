"""Image augmentation on normalized pixel tensors: random shifts (pad + crop) and horizontal flips."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def augment_images(pixels: Tensor, generator: torch.Generator | None = None, max_shift: int = 4,
                   flip: bool = True) -> Tensor:
    """(B,3,S,S) -> (B,3,S,S): each image shifted by up to `max_shift` px (reflect padding), maybe flipped."""
    B, _, S, _ = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4, mode="reflect")
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator).tolist()
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + S, dx[i]:dx[i] + S] for i in range(B)])
    if flip:
        mask = torch.rand(B, generator=generator) < 0.5
        out[mask] = out[mask].flip(-1)
    return out
