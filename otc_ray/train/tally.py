"""Per-epoch statistics of the re-match stage as one worker saw them: shares screened, flagged, re-captioned and
dropped (loss weight 0), the mean loss weight; when the poison manifest is known, detection precision / recall of
all flags (sticky ones included) and of the gate's own verdict this epoch (new flags: does the gate keep finding
poison as training goes on?), backdoor and targeted apart; when class labels are known, the damage (clean pairs given
a re-captioned clean pair whose new caption names another class than its image's: the class the caption names
(`data.class_info.named_class`, with the training set's classes), else the label of the image it came from). See
otc_ray.evaluate.detection."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..data import schema
from ..data.class_info import named_class
from ..evaluate.detection import damage_metrics, detection_metrics
from ..track import metric_names


@dataclass
class RematchTally:
    """poisoned: {poisoned key: attack ("backdoor" / "targeted")} from the manifest (empty = unknown); patterns: the
    training set's `class_patterns` (empty = unknown: damage falls back to the caption's source image label)."""

    poisoned: dict[str, str] = field(default_factory=dict)
    patterns: list[re.Pattern] = field(default_factory=list)
    flags: list[np.ndarray] = field(default_factory=list)
    gate_flags: list[np.ndarray] = field(default_factory=list)
    screened: list[np.ndarray] = field(default_factory=list)
    attack: list[np.ndarray] = field(default_factory=list)
    recaptioned: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    versions: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    source_labels: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Count one training batch (a no-op when the batch did not pass through the re-match stage)."""
        if schema.FLAGGED not in batch:
            return
        n = len(batch[schema.KEY])
        self.flags.append(np.asarray(batch[schema.FLAGGED], dtype=bool))
        self.gate_flags.append(np.asarray(batch.get(schema.GATE_FLAGGED, batch[schema.FLAGGED]), dtype=bool))
        self.screened.append(np.asarray(batch.get(schema.SCREENED, np.ones(n, bool)), dtype=bool))
        self.attack.append(np.asarray([self.poisoned.get(str(k), "") for k in batch[schema.KEY]], dtype=object))
        recaptioned = np.asarray(batch[schema.RECAPTIONED], dtype=bool)
        self.recaptioned.append(recaptioned)
        self.weights.append(np.asarray(batch[schema.WEIGHT], dtype=np.float32))
        self.versions.append(np.asarray(batch.get(schema.WEIGHTS_VERSION, np.zeros(n)), dtype=np.int64))
        if schema.LABEL in batch:
            self.labels.append(np.asarray(batch[schema.LABEL], dtype=np.int64))
            source = np.asarray(batch[schema.SOURCE_LABEL], dtype=np.int64)
            if self.patterns and schema.CAPTION_USED in batch:     # the class the new caption names, where it names one
                named = np.array([named_class(str(batch[schema.CAPTION_USED][i]), self.patterns) if recaptioned[i] else -1
                                  for i in range(n)], dtype=np.int64)
                source = np.where(named >= 0, named, source)
            self.source_labels.append(source)

    def metrics(self, published_version: int = 0) -> dict[str, float]:
        """This worker's epoch; published_version: the newest version rank 0 published (0 = unknown)."""
        if not self.flags:
            return {}
        flags, gate, screened = map(np.concatenate, (self.flags, self.gate_flags, self.screened))
        attack, weights = np.concatenate(self.attack), np.concatenate(self.weights)
        truth = attack != ""
        recaptioned = np.concatenate(self.recaptioned)
        out = {metric_names.REMATCH_FLAG_RATE: float(flags.mean()), metric_names.REMATCH_RECAPTIONED_RATE: float(recaptioned.mean()),
               metric_names.REMATCH_DROPPED_RATE: float((weights == 0).mean()), metric_names.REMATCH_MEAN_WEIGHT: float(weights.mean()),
               metric_names.REMATCH_SCREENED_RATE: float(screened.mean()), metric_names.rematch_gate("flag_rate"): float(gate.mean())}
        if published_version > 0:
            versions = np.concatenate(self.versions)
            out[metric_names.REMATCH_STALENESS] = float(np.mean(published_version - versions[screened])) if screened.any() else \
                float("nan")
        if self.poisoned:
            out |= metric_names.prefixed(metric_names.REMATCH, detection_metrics(flags, truth))
            new = detection_metrics(gate, truth)
            out[metric_names.rematch_gate("precision")] = new["detect_precision"]
            out[metric_names.rematch_gate("recall")] = new["detect_recall"]
            for kind in ("backdoor", "targeted"):
                rows = attack == kind
                if rows.any():
                    out[metric_names.rematch_recall(kind)] = float(flags[rows].mean())
                    out[metric_names.rematch_gate(f"recall_{kind}")] = float(gate[rows].mean())
        if self.labels:
            labels, sources = np.concatenate(self.labels), np.concatenate(self.source_labels)
            known = (labels >= 0) & (sources >= 0)
            clean = ~truth & known
            if clean.any():         # damage: clean pairs now trained with a caption of another class
                out |= metric_names.prefixed(metric_names.REMATCH, damage_metrics(clean, labels, np.where(recaptioned, sources, labels)))
        return out
