"""Rank 0's hand-off of the current weights to the re-match actors at each epoch start."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RematchConfig


def rematch_epoch(cfg: RematchConfig, epoch: int) -> bool:
    """True when epoch (0-based) is re-matched: from `start_epoch` on, every `every` epochs."""
    return epoch >= cfg.start_epoch and (epoch - cfg.start_epoch) % cfg.every == 0


@dataclass
class EpochPublisher:
    """Picklable callable (model, epoch): publishes the weights and whether this epoch is re-matched."""

    store_name: str
    cfg: RematchConfig

    def __call__(self, model, epoch: int) -> int:
        from ..rematch.weights import publish, weight_store

        return publish(weight_store(self.store_name), model.state_dict(), active=rematch_epoch(self.cfg, epoch))
