"""Weight publication from the trainer (or the clean job) to the re-matching actors.

A small named actor holds the newest (version, state dict, active). The state dict is put in the object store by
the store itself (the store owns it, so it outlives the publisher) and handed out as an ObjectRef: every actor
fetches the same copy, and nobody fetches anything while the version is unchanged. `active` says whether the
epoch these weights start is re-matched at all (warm-up epochs are not: the stage passes rows through); before
anything is published, a follower is inactive too, so no block is matched with weights nobody chose.

The store is a helper actor (placement.py): pinned to the creating driver's node, restarted when its process
dies. A restarted store starts a new *incarnation* (followers take whatever it holds next, whatever its version
number) and, given `recover_from` (the Ray Train run folder of a local training run), re-publishes the model of
the newest checkpoint there at once, so re-matching never stalls on a store that forgot everything; the trainer's
next publication (at most `rematch.publish_every` steps later) replaces it.

    store = weight_store("otc-weights-run1", recover_from="runs/x/ray_results/run1")   # get or create
    version = publish(store, model.state_dict(), active=epoch >= start_epoch)   # trainer rank 0, each epoch
    follower = WeightFollower(store)                       # in a re-matching actor
    state = follower.poll()                                # None when unchanged, else the new state dict
    follower.active                                        # the flag of the newest version seen
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional, Union

import ray
import torch

from ..model_checkpoint import MODEL_FILE
from .placement import helper_options, restarted


def newest_checkpoint_model(run_folder: Optional[str]) -> Optional[Path]:
    """model.pt of the newest `checkpoint_*` folder under a local Ray Train run folder (None: none, or not local)."""
    if not run_folder or "://" in run_folder or not Path(run_folder).is_dir():
        return None
    found = sorted(Path(run_folder).glob(f"checkpoint_*/{MODEL_FILE}"), key=lambda p: p.parent.name)
    return found[-1] if found else None


@ray.remote(num_cpus=0)
class WeightStore:
    """(incarnation, version, ObjectRef of a CPU state dict, active). Version 0 = nothing published yet."""

    def __init__(self, recover_from: Optional[str] = None) -> None:
        self.incarnation = uuid.uuid4().hex
        self.version = 0
        self.active = False
        self.ref: Optional[ray.ObjectRef] = None
        model = newest_checkpoint_model(recover_from) if restarted() else None
        if model is not None:
            self.publish(torch.load(model, map_location="cpu", weights_only=True), active=True)

    def publish(self, state: dict, active: bool = True) -> int:
        """Store a new state dict (mapping of names to CPU tensors); returns its version (1, 2, ...)."""
        self.ref = ray.put(state)
        self.version += 1
        self.active = bool(active)
        return self.version

    def latest(self, incarnation: str, version_seen: int) -> Optional[tuple[str, int, list, bool]]:
        """None when (incarnation, version_seen) is the newest, else (incarnation, version, [ObjectRef], active)
        (the ref in a list: a nested ref is not resolved by Ray, so the caller fetches the weights only if it
        wants them)."""
        if self.ref is None or (incarnation == self.incarnation and version_seen >= self.version):
            return None
        return self.incarnation, self.version, [self.ref], self.active

    def current_version(self) -> int:
        return self.version


StoreRef = Union[str, "ray.actor.ActorHandle"]


def weight_store(name: str, namespace: Optional[str] = None,
                 recover_from: Optional[str] = None) -> "ray.actor.ActorHandle":
    """The named WeightStore `name` (created when absent, on this node, restartable; `recover_from`: see the module
    docstring). Keep a handle: Ray ends a named actor once no handle to it is left (`add_rematch_stage` keeps one
    for as long as its dataset lives)."""
    return WeightStore.options(name=name, namespace=namespace, get_if_exists=True,
                               **helper_options()).remote(recover_from)


def publish(store: "ray.actor.ActorHandle", state: dict, active: bool = True) -> int:
    """Publish `state` (tensors are detached and copied to the CPU first) and whether to re-match with it;
    returns the new version."""
    cpu = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    return ray.get(store.publish.remote(cpu, active))


class WeightFollower:
    """Used inside an actor: remembers the (incarnation, version) it holds and its active flag, and fetches only
    newer ones (anything a restarted store holds is newer)."""

    def __init__(self, store: StoreRef, namespace: Optional[str] = None):
        self.store = ray.get_actor(store, namespace=namespace) if isinstance(store, str) else store
        self.incarnation = ""
        self.version = 0
        self.active = False

    def poll(self) -> Optional[dict]:
        """The newest state dict when it is newer than the one held, else None (one small actor call)."""
        news = ray.get(self.store.latest.remote(self.incarnation, self.version))
        if news is None:
            return None
        incarnation, version, (ref,), active = news
        state = ray.get(ref)
        self.incarnation, self.version, self.active = incarnation, version, active
        return state
