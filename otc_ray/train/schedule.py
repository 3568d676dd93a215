"""Learning-rate schedule: linear warmup, then cosine decay to zero."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier (step+1)/warmup during warmup, then 0.5 * (1 + cos(pi * progress))."""
    total = max(total_steps, 1)
    warmup = min(warmup_steps, total - 1) if total > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
