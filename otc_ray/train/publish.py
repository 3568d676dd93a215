"""Rank 0's hand-off of the current weights to the re-match actors: at every epoch start and every
`rematch.publish_every` steps inside an epoch (the stage reads ahead of training, so a version published inside an
epoch scores what the stream has not produced yet; on a long stream that is most of it).

    publisher = WeightPublisher("otc-weights-run1", cfg.rematch)
    if publisher.due(step_in_epoch):
        publisher(model, epoch, global_step)              # -> the published version
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RematchConfig


def rematch_epoch(cfg: RematchConfig, epoch: int) -> bool:
    """True when epoch (0-based) is re-matched: from `start_epoch` on, every `every_epochs` epochs."""
    return epoch >= cfg.start_epoch and (epoch - cfg.start_epoch) % cfg.every_epochs == 0


@dataclass
class WeightPublisher:
    """Picklable callable (model, epoch, global_step): publishes the weights and whether the epoch is re-matched."""

    store_name: str
    cfg: RematchConfig

    def due(self, step_in_epoch: int) -> bool:
        """Publish at each epoch start, then every `publish_every` steps (0: epoch starts only)."""
        every = self.cfg.publish_every
        return step_in_epoch == 0 or (every > 0 and step_in_epoch % every == 0)

    def __call__(self, model, epoch: int, global_step: int) -> int:
        from ..rematch.weights import publish, weight_store

        return publish(weight_store(self.store_name), model.state_dict(), active=rematch_epoch(self.cfg, epoch))
