"""Sticky flags (`rematch.sticky`): a sample flagged once stays flagged in later epochs (docs/method.md, Caption
re-matching: what stops the late creep of a backdoor as the detector's recall slips).

A small actor holds the set of keys flagged so far; each re-matching actor asks it about a block's keys before
matching and reports the block's new flags after (fire and forget). It is created by `add_rematch_stage` in the
driver, so it lives as long as the job and is shared by every epoch's actors. It is a helper actor (placement.py:
on the driver's node, restarted when its process dies); given a `journal` file, it appends every new key to it
(one per line) and a restarted store reads it back, so no flag is forgotten; so does a store created with
`resume=True` (a run resumed from its checkpoint keeps the flags of its earlier epochs), while a fresh one starts
the journal empty.

With `rematch.propagate` (trigger.py) the store also keeps what the trigger pattern is estimated from: the weighted
pixel sum of the images the gate flagged (each key once) and a reference sample of pixel grids (the keys whose hash
falls in 1/8 of the range, up to `reference` of them); `pattern()` returns the current pattern or None. These are
not journalled: a restarted store estimates the pattern afresh from the flags that follow.

    store = flag_store(journal="runs/x/flags-run1.txt")   # a FlagStore (0 CPUs)
    prior = ray.get(store.query.remote(keys))  # list[bool]: flagged in an earlier block / epoch
    store.add.remote(newly_flagged_keys)
    store.add.remote(gate_flagged_keys, grid_sum, weight)   # with propagation: their pixels too
    pattern = ray.get(store.pattern.remote())               # TriggerPattern or None
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import ray
import torch

from .placement import helper_options, restarted
from .trigger import PropagateConfig, TriggerPattern, estimate_pattern


@ray.remote(num_cpus=0)
class FlagStore:
    """The set of sample keys flagged so far (memory: one Python string per flagged key), journalled to a file
    when one is given (a fresh store starts it empty, a restarted one reads it); with `propagate`, the statistics
    of the trigger pattern (memory: `reference` pixel grids)."""

    def __init__(self, journal: Optional[str] = None, resume: bool = False,
                 propagate: Optional[PropagateConfig] = None, reference: int = 4096) -> None:
        self.journal = Path(journal) if journal else None
        self.keys: set[str] = set()
        self.propagate, self.reference_size = propagate, reference
        self.flagged_sum: Optional[torch.Tensor] = None                # (D,) float64
        self.flagged_weight = 0.0
        self.reference: dict[str, np.ndarray] = {}                     # key -> (D,) uint8 pixel grid
        self._reference_grid: Optional[torch.Tensor] = None           # (R, D) float, rebuilt when a grid arrives
        self._pattern: Optional[TriggerPattern] = None
        self._stale = False
        if self.journal is not None:
            if (resume or restarted()) and self.journal.exists():
                self.keys = set(self.journal.read_text(encoding="utf-8").splitlines())
            else:
                self.journal.parent.mkdir(parents=True, exist_ok=True)
                self.journal.write_text("", encoding="utf-8")

    def query(self, keys: list[str]) -> list[bool]:
        return [k in self.keys for k in keys]

    def add(self, keys: list[str], grid_sum: Optional[np.ndarray] = None, weight: float = 0.0) -> int:
        """Add flagged keys; grid_sum (D,) / weight: the weighted pixel sum of those of them the gate flagged (only
        keys new to the store may be in it: the caller asks `query` first)."""
        new = [k for k in dict.fromkeys(keys) if k not in self.keys]
        if grid_sum is not None and weight > 0 and self.propagate is not None:
            g = torch.tensor(np.asarray(grid_sum, dtype=np.float64))          # a copy: Ray hands read-only arrays
            self.flagged_sum = g if self.flagged_sum is None else self.flagged_sum + g
            self.flagged_weight += float(weight)
            self._stale = True
        if new and self.journal is not None:
            with self.journal.open("a", encoding="utf-8") as f:     # keys are safe names: no newline in them
                f.write("".join(k + "\n" for k in new))
        self.keys.update(new)
        return len(self.keys)

    def size(self) -> int:
        return len(self.keys)

    def wants_reference(self) -> bool:
        """Whether the reference sample still takes grids (propagation on and the sample not full)."""
        return self.propagate is not None and len(self.reference) < self.reference_size

    def add_reference(self, keys: list[str], grids: np.ndarray) -> int:
        """Pixel grids (n, D) uint8 of sampled keys for the reference sample (first come, up to its size)."""
        for k, g in zip(keys, grids):
            if len(self.reference) >= self.reference_size:
                break
            if k not in self.reference:
                self.reference[k] = np.asarray(g, dtype=np.uint8)
                self._reference_grid, self._stale = None, True
        return len(self.reference)

    def pattern(self) -> Optional[TriggerPattern]:
        """The trigger pattern of the gate's flags so far, or None (trigger.estimate_pattern), re-estimated when
        flags or reference grids arrived since the last call."""
        if self.propagate is None or self.flagged_sum is None:
            return None
        if self._stale:
            if self._reference_grid is None:
                self._reference_grid = torch.as_tensor(np.stack(list(self.reference.values()))).float() \
                    if self.reference else torch.zeros((0, self.flagged_sum.shape[0]))
            self._pattern = estimate_pattern(self.flagged_sum.float(), self.flagged_weight, self._reference_grid,
                                             self.propagate)
            self._stale = False
        return self._pattern


def flag_store(name: Optional[str] = None, journal: Optional[str] = None, resume: bool = False,
               propagate: Optional[PropagateConfig] = None, reference: int = 4096) -> "ray.actor.ActorHandle":
    """A FlagStore on this node, restartable: named (get or create) when `name` is given, else anonymous;
    `journal`: the file that lets a restarted (or, with `resume`, a new) store recover its keys; `propagate`: keep
    the trigger pattern's statistics (`reference` grids at most)."""
    options = helper_options() | ({"name": name, "get_if_exists": True} if name is not None else {})
    return FlagStore.options(**options).remote(journal, resume, propagate, reference)
