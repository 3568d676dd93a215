"""Sticky flags (`rematch.sticky`): a sample flagged once stays flagged in later epochs (METHOD.md B: what stops
the late creep of a backdoor as the detector's recall slips).

A small actor holds the set of keys flagged so far; each re-matching actor asks it about a block's keys before
matching and reports the block's new flags after (fire and forget). It is created by `add_rematch_stage` in the
driver, so it lives as long as the job and is shared by every epoch's actors.

    store = flag_store()                       # an anonymous FlagStore (0 CPUs)
    prior = ray.get(store.query.remote(keys))  # list[bool]: flagged in an earlier block / epoch
    store.add.remote(newly_flagged_keys)
"""
from __future__ import annotations

from typing import Optional

import ray


@ray.remote(num_cpus=0)
class FlagStore:
    """The set of sample keys flagged so far (memory: one Python string per flagged key)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def query(self, keys: list[str]) -> list[bool]:
        return [k in self.keys for k in keys]

    def add(self, keys: list[str]) -> int:
        self.keys.update(keys)
        return len(self.keys)

    def size(self) -> int:
        return len(self.keys)


def flag_store(name: Optional[str] = None) -> "ray.actor.ActorHandle":
    """A FlagStore: named (get or create) when `name` is given, else anonymous."""
    if name is None:
        return FlagStore.remote()
    return FlagStore.options(name=name, get_if_exists=True).remote()
