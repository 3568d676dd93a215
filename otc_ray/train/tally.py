"""Per-epoch statistics of the re-match stage as one worker saw them: shares flagged and re-captioned,
and, when the poison manifest is known, detection precision / recall (otc_ray.evaluate.detection)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data import schema as S
from ..evaluate.detection import detection_metrics
from ..rematch.stage import FLAGGED, RECAPTIONED


@dataclass
class RematchTally:
    poisoned_keys: frozenset[str] = field(default_factory=frozenset)
    flags: list[np.ndarray] = field(default_factory=list)
    truth: list[np.ndarray] = field(default_factory=list)
    recaptioned: int = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Count one training batch (a no-op when the batch did not pass through the re-match stage)."""
        if FLAGGED not in batch:
            return
        self.flags.append(np.asarray(batch[FLAGGED], dtype=bool))
        self.truth.append(np.fromiter((str(k) in self.poisoned_keys for k in batch[S.KEY]), dtype=bool,
                                      count=len(batch[S.KEY])))
        self.recaptioned += int(np.asarray(batch[RECAPTIONED], dtype=bool).sum())

    def metrics(self) -> dict[str, float]:
        if not self.flags:
            return {}
        flags, truth = np.concatenate(self.flags), np.concatenate(self.truth)
        out = {"rematch/flag_rate": float(flags.mean()), "rematch/recaptioned_rate": self.recaptioned / len(flags)}
        if self.poisoned_keys:
            out |= {f"rematch/{k}": v for k, v in detection_metrics(flags, truth).items()}
        return out
