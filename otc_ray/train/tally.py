"""Per-epoch statistics of the re-match stage as one worker saw them: shares flagged and re-captioned,
and, when the poison manifest is known, detection precision / recall and the confusion counts."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data import schema as S
from ..rematch.stage import FLAGGED, RECAPTIONED


@dataclass
class RematchTally:
    poisoned_keys: frozenset[str] = field(default_factory=frozenset)
    rows: int = 0
    flagged: int = 0
    recaptioned: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Count one training batch (a no-op when the batch did not pass through the re-match stage)."""
        if FLAGGED not in batch:
            return
        flags = np.asarray(batch[FLAGGED], dtype=bool)
        self.rows += len(flags)
        self.flagged += int(flags.sum())
        self.recaptioned += int(np.asarray(batch[RECAPTIONED], dtype=bool).sum())
        if self.poisoned_keys:
            truth = np.fromiter((str(k) in self.poisoned_keys for k in batch[S.KEY]), dtype=bool, count=len(flags))
            self.tp += int((flags & truth).sum())
            self.fp += int((flags & ~truth).sum())
            self.fn += int((~flags & truth).sum())

    def metrics(self) -> dict[str, float]:
        if not self.rows:
            return {}
        out = {"rematch/flag_rate": self.flagged / self.rows, "rematch/recaptioned_rate": self.recaptioned / self.rows}
        if self.poisoned_keys:
            out |= {"rematch/detect_precision": self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan"),
                    "rematch/detect_recall": self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan"),
                    "rematch/detect_tp": float(self.tp), "rematch/detect_fp": float(self.fp),
                    "rematch/detect_fn": float(self.fn)}
        return out
