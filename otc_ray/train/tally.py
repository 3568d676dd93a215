"""Per-epoch statistics of the re-match stage as one worker saw them: shares flagged, re-captioned and dropped
(loss weight 0), the mean loss weight; when the poison manifest is known, detection precision / recall; when
class labels are known, the damage (clean pairs given a caption of another class). See otc_ray.evaluate.detection."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data import schema as S
from ..evaluate.detection import damage_metrics, detection_metrics
from ..track import metric_names as N
from ..data.schema import FLAGGED, RECAPTIONED, SOURCE_LABEL, WEIGHT


@dataclass
class RematchTally:
    poisoned_keys: frozenset[str] = field(default_factory=frozenset)
    flags: list[np.ndarray] = field(default_factory=list)
    truth: list[np.ndarray] = field(default_factory=list)
    recaptioned: int = 0
    weights: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    source_labels: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Count one training batch (a no-op when the batch did not pass through the re-match stage)."""
        if FLAGGED not in batch:
            return
        self.flags.append(np.asarray(batch[FLAGGED], dtype=bool))
        self.truth.append(np.fromiter((str(k) in self.poisoned_keys for k in batch[S.KEY]), dtype=bool,
                                      count=len(batch[S.KEY])))
        self.recaptioned += int(np.asarray(batch[RECAPTIONED], dtype=bool).sum())
        self.weights.append(np.asarray(batch[WEIGHT], dtype=np.float32))
        if S.LABEL in batch:
            self.labels.append(np.asarray(batch[S.LABEL], dtype=np.int64))
            self.source_labels.append(np.asarray(batch[SOURCE_LABEL], dtype=np.int64))

    def metrics(self) -> dict[str, float]:
        if not self.flags:
            return {}
        flags, truth = np.concatenate(self.flags), np.concatenate(self.truth)
        weights = np.concatenate(self.weights)
        out = {N.REMATCH_FLAG_RATE: float(flags.mean()), N.REMATCH_RECAPTIONED_RATE: self.recaptioned / len(flags),
               N.REMATCH_DROPPED_RATE: float((weights == 0).mean()), N.REMATCH_MEAN_WEIGHT: float(weights.mean())}
        if self.poisoned_keys:
            out |= N.prefixed(N.REMATCH, detection_metrics(flags, truth))
        if self.labels:
            labels, sources = np.concatenate(self.labels), np.concatenate(self.source_labels)
            known = (labels >= 0) & (sources >= 0)
            clean = ~truth & known
            if clean.any():         # damage: clean pairs now trained with a caption of another class
                out |= N.prefixed(N.REMATCH, damage_metrics(clean, labels, sources))
        return out
