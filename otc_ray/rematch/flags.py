"""Sticky flags (`rematch.sticky`): a sample flagged once stays flagged in later epochs (METHOD.md B: what stops
the late creep of a backdoor as the detector's recall slips).

A small actor holds the set of keys flagged so far; each re-matching actor asks it about a block's keys before
matching and reports the block's new flags after (fire and forget). It is created by `add_rematch_stage` in the
driver, so it lives as long as the job and is shared by every epoch's actors. It is a helper actor (placement.py:
on the driver's node, restarted when its process dies); given a `journal` file, it appends every new key to it
(one per line) and a restarted store reads it back, so no flag is forgotten; so does a store created with
`resume=True` (a run resumed from its checkpoint keeps the flags of its earlier epochs), while a fresh one starts
the journal empty.

    store = flag_store(journal="runs/x/flags-run1.txt")   # a FlagStore (0 CPUs)
    prior = ray.get(store.query.remote(keys))  # list[bool]: flagged in an earlier block / epoch
    store.add.remote(newly_flagged_keys)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import ray

from .placement import helper_options, restarted


@ray.remote(num_cpus=0)
class FlagStore:
    """The set of sample keys flagged so far (memory: one Python string per flagged key), journalled to a file
    when one is given (a fresh store starts it empty, a restarted one reads it)."""

    def __init__(self, journal: Optional[str] = None, resume: bool = False) -> None:
        self.journal = Path(journal) if journal else None
        self.keys: set[str] = set()
        if self.journal is not None:
            if (resume or restarted()) and self.journal.exists():
                self.keys = set(self.journal.read_text(encoding="utf-8").splitlines())
            else:
                self.journal.parent.mkdir(parents=True, exist_ok=True)
                self.journal.write_text("", encoding="utf-8")

    def query(self, keys: list[str]) -> list[bool]:
        return [k in self.keys for k in keys]

    def add(self, keys: list[str]) -> int:
        new = [k for k in dict.fromkeys(keys) if k not in self.keys]
        if new and self.journal is not None:
            with self.journal.open("a", encoding="utf-8") as f:     # keys are safe names: no newline in them
                f.write("".join(k + "\n" for k in new))
        self.keys.update(new)
        return len(self.keys)

    def size(self) -> int:
        return len(self.keys)


def flag_store(name: Optional[str] = None, journal: Optional[str] = None,
               resume: bool = False) -> "ray.actor.ActorHandle":
    """A FlagStore on this node, restartable: named (get or create) when `name` is given, else anonymous;
    `journal`: the file that lets a restarted (or, with `resume`, a new) store recover its keys."""
    options = helper_options() | ({"name": name, "get_if_exists": True} if name is not None else {})
    return FlagStore.options(**options).remote(journal, resume)
