"""The re-matching stage: `Matcher` on a Ray Data actor pool (map_batches), one block per batch.

    ds = load_samples("s3://bkt/train", cfg.data)                             # decoded rows, bad ones marked
    ds = add_rematch_stage(ds, cfg.rematch, cfg.model, cfg.ot, weights=store)  # + schema.OUTPUT_COLUMNS

Each actor builds the model once (seeded random init, so all actors agree), then before every batch asks the
weight store (see weights.py) for a newer version and loads it. With a store, a batch is re-matched only while the
newest version is published `active` (nothing published yet, or a warm-up epoch: rows pass through unmatched). Rows whose `error` is not "" pass through
untouched with neutral outputs: the stage never drops a row, so the accounting downstream stays exact (action
`drop` is expressed as weight 0). Actors use CUDA when `actor_num_gpus > 0` and a GPU is visible. Ray Data
restarts a dead actor and retries its batch (max_restarts / max_task_retries default to -1 for actor pools).

With `rematch.sticky`, a FlagStore actor (flags.py) shared by every epoch's actors keeps the keys flagged so far:
they stay flagged (and re-captioned / dropped / down-weighted) in later epochs whatever the gate says then. With
`rematch.propagate` the store also estimates the pixel pattern the gate's flagged images share (trigger.py): each
block reports the pixels of its new gate flags and of its reference-sample keys, and an image that carries the
current pattern is flagged as if flagged before.

Fault injection for tests: when OTC_RAY_FAULT_BATCH=N and OTC_RAY_FAULT_MARKER=<path> are in the actor's
environment (e.g. `ray_remote_args={"runtime_env": {"env_vars": {...}}}`), the actor that processes its N-th
batch while <path> does not exist creates <path> and exits the process at once (os._exit), once per marker.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import torch

from otc_ray.config import ModelConfig, OTConfig, RematchConfig, validate
from otc_ray.data import schema
from otc_ray.model import build_model

from .flags import flag_store
from .matcher import BlockMatch, Matcher
from .trigger import PropagateConfig, in_reference_sample, pattern_match, pixel_grid
from .weights import StoreRef, WeightFollower, weight_store

FAULT_BATCH_ENV = "OTC_RAY_FAULT_BATCH"
ACTOR_RESOURCE_SHARE = 0.01        # of `rematch.actor_resource` per actor: a node declaring 1 hosts up to 100
FAULT_MARKER_ENV = "OTC_RAY_FAULT_MARKER"


def _device(cfg: RematchConfig) -> str:
    return "cuda" if cfg.actor_num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _encoding_model(cfg: RematchConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The model config the actors build: `model_cfg` at `rematch.precision` unless that is "model"."""
    return model_cfg if cfg.precision == "model" else dataclasses.replace(model_cfg, precision=cfg.precision)


def _maybe_fault(batches_seen: int) -> None:
    """The test hook described in the module docstring."""
    at, marker = os.environ.get(FAULT_BATCH_ENV), os.environ.get(FAULT_MARKER_ENV)
    if at and marker and batches_seen == int(at) and not Path(marker).exists():
        Path(marker).write_text(f"pid {os.getpid()} exited at batch {batches_seen}\n")
        os._exit(1)


class RematchActor:
    """Callable class for `map_batches`: decoded batch (n rows) -> same rows + schema.OUTPUT_COLUMNS."""

    def __init__(self, cfg: RematchConfig, model_cfg: ModelConfig, ot_cfg: OTConfig,
                 weights: Optional[StoreRef] = None, namespace: Optional[str] = None,
                 flags: Optional["ray.actor.ActorHandle"] = None, reference: Optional[dict] = None):
        validate(cfg)
        torch.set_num_threads(max(1, round(cfg.actor_num_cpus)))
        self.cfg = cfg
        self.matcher: Optional[Matcher] = None
        if cfg.enabled:
            torch.manual_seed(cfg.seed)
            self.matcher = Matcher(build_model(_encoding_model(cfg, model_cfg)), cfg, ot_cfg, device=_device(cfg))
            if reference is not None:
                self.matcher.set_reference(reference[schema.IMAGE], reference[schema.CAPTION], reference[schema.KEY],
                                           reference[schema.LABEL])
        self.follower = WeightFollower(weights, namespace) if weights is not None else None
        self.flags = flags if cfg.sticky else None
        self.batches = 0
        self._refresh()

    def _refresh(self) -> None:
        if self.follower is None or self.matcher is None:
            return
        state = self.follower.poll()
        if state is not None:
            self.matcher.load_state_dict(state)

    @property
    def version(self) -> int:
        return self.follower.version if self.follower is not None else 0

    @property
    def active(self) -> bool:
        """Whether batches are re-matched now: always without a store, else as the newest version says."""
        return self.matcher is not None and (self.follower is None or self.follower.active)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        _maybe_fault(self.batches)
        self._refresh()
        return rematch_batch(batch, self.matcher if self.active else None, self.version, self.flags)


def rematch_batch(batch: dict[str, np.ndarray], matcher: Optional[Matcher], version: int = 0,
                  flags: Optional["ray.actor.ActorHandle"] = None) -> dict[str, np.ndarray]:
    """Add schema.OUTPUT_COLUMNS to a decoded batch: good rows are matched as one block, bad rows get neutral
    values (caption_used = caption, source_key = key, not flagged, weight 1, scores NaN). matcher None = re-matching
    off (`rematch.enabled` false).
    flags: a FlagStore; its keys stay flagged, and the block's new flags are added to it."""
    keys = np.asarray(batch[schema.KEY], dtype=object)
    n = len(keys)
    good = np.fromiter((not e for e in batch[schema.ERROR]), dtype=bool, count=n)
    captions = np.asarray(batch[schema.CAPTION], dtype=object)
    labels = np.asarray(batch[schema.LABEL], dtype=np.int64) if schema.LABEL in batch else np.full(n, -1, np.int64)
    out = {schema.CAPTION_USED: captions.copy(), schema.RECAPTIONED: np.zeros(n, bool), schema.SOURCE_KEY: keys.copy(),
           schema.SOURCE_LABEL: labels.copy(),
           schema.OWN_SCORE: np.full(n, np.nan, np.float32), schema.BEST_SCORE: np.full(n, np.nan, np.float32),
           schema.SUSPICION: np.full(n, np.nan, np.float32), schema.GATE_Z: np.full(n, np.nan, np.float32),
           schema.FLAGGED: np.zeros(n, bool), schema.GATE_FLAGGED: np.zeros(n, bool), schema.SCREENED: np.zeros(n, bool),
           schema.GROUP_SIZE: np.zeros(n, np.int64), schema.WEIGHT: np.ones(n, np.float32),
           schema.WEIGHTS_VERSION: np.full(n, version, np.int64)}
    if matcher is not None and good.any():
        rows = np.flatnonzero(good)
        block_keys = [str(k) for k in keys[rows]]
        images = np.asarray(batch[schema.IMAGE])[rows]
        grid = None
        if flags is not None and matcher.cfg.propagate:
            prior, grid = _propagate(flags, images, block_keys)
        else:
            prior = ray.get(flags.query.remote(block_keys)) if flags is not None else None
        m: BlockMatch = matcher.match(images, [str(c) for c in captions[rows]], block_keys, prior=prior,
                                      labels=labels[rows])
        r = m.result
        if flags is not None:
            new = [k for k, f, p in zip(block_keys, r.flagged.tolist(), prior) if f and not p]
            # the gate's own new flags (never a propagated one) feed the pattern, copies weighing 1 / group size
            by_gate = None if grid is None else \
                (r.flagged if r.gate_flagged is None else r.gate_flagged) & ~torch.tensor(prior)
            if by_gate is not None and bool(by_gate.any()):
                w = by_gate.float() / (1.0 if r.group_size is None else r.group_size.float())
                flags.add.remote(new, (w.unsqueeze(1) * grid).sum(0).numpy(), float(w.sum()))   # fire and forget
            elif new:
                flags.add.remote(new)
        out[schema.CAPTION_USED][rows] = np.asarray(m.caption_used, dtype=object)
        out[schema.SOURCE_KEY][rows] = np.asarray(m.source_key, dtype=object)
        out[schema.SOURCE_LABEL][rows] = np.asarray(m.source_label, dtype=np.int64)
        out[schema.RECAPTIONED][rows] = r.recaptioned.numpy()
        out[schema.OWN_SCORE][rows] = r.own_score.float().numpy()
        out[schema.BEST_SCORE][rows] = r.best_score.float().numpy()
        out[schema.SUSPICION][rows] = r.suspicion.float().numpy()
        out[schema.GATE_Z][rows] = r.gate_z.float().numpy()
        out[schema.FLAGGED][rows] = r.flagged.numpy()
        out[schema.GATE_FLAGGED][rows] = (r.flagged if r.gate_flagged is None else r.gate_flagged).numpy()
        out[schema.SCREENED][rows] = True
        out[schema.GROUP_SIZE][rows] = 1 if r.group_size is None else r.group_size.numpy()
        out[schema.WEIGHT][rows] = r.weight.float().numpy()
    return {**batch, **out}


def _propagate(flags: "ray.actor.ActorHandle", images: np.ndarray, keys: list[str]) -> tuple[list[bool], "torch.Tensor"]:
    """Trigger propagation for one block: the store's prior flags, OR-ed with the images that carry its current
    pattern (score above its match); sends the block's reference-sample keys' grids. Returns (prior, grid (B, D))."""
    prior, pat, wants = ray.get([flags.query.remote(keys), flags.pattern.remote(), flags.wants_reference.remote()])
    grid = pixel_grid(images)
    if wants:
        pick = [i for i, k in enumerate(keys) if in_reference_sample(k)]
        if pick:
            flags.add_reference.remote([keys[i] for i in pick], grid[pick].round().to(torch.uint8).numpy())
    if pat is not None:
        hits = (pattern_match(grid, pat) >= pat.match).tolist()
        prior = [p or h for p, h in zip(prior, hits)]
    return prior, grid


def add_rematch_stage(ds: "ray.data.Dataset", cfg: RematchConfig, model_cfg: ModelConfig, ot_cfg: OTConfig,
                      weights: Optional[StoreRef] = None, namespace: Optional[str] = None,
                      ray_remote_args: Optional[dict[str, Any]] = None,
                      flags: Optional["ray.actor.ActorHandle"] = None,
                      flag_journal: Optional[str] = None, resume_flags: bool = False,
                      reference: Optional[dict] = None) -> "ray.data.Dataset":
    """`ds.map_batches(RematchActor, compute=ActorPoolStrategy(min_actors, max_actors), batch_size=block_size)`.

    weights: a WeightStore handle or name (got or created here; None = the seeded random init); ray_remote_args: extra actor options
    (runtime_env, accelerator_type, ...); flags: a FlagStore for sticky flags (with cfg.sticky and None, one is
    created here, owned by this driver, shared by every execution of the returned dataset, journalled to
    `flag_journal` when given so that a restarted store keeps its flags, and reading it back at once with
    `resume_flags`: a resumed run); reference: decoded rows {key, image, caption, label} that every actor uses as a
    fixed bank (`Matcher.set_reference`; None = the FIFO bank). `cfg.actor_resource` places the actors on
    the nodes that declare that custom resource.
    Output rows = input rows, in blocks of at most block_size.
    """
    validate(cfg)
    if isinstance(weights, str):
        # a handle, not a name, goes to the actors: the dataset then holds a reference that keeps the named store
        # alive (Ray collects a named actor once no handle is left), and no actor depends on a name lookup
        weights = weight_store(weights, namespace)
    if cfg.sticky and flags is None and cfg.enabled:
        flags = flag_store(journal=flag_journal, resume=resume_flags, reference=cfg.propagate_reference,
                           propagate=PropagateConfig() if cfg.propagate else None)
    resources: dict[str, Any] = {"num_cpus": cfg.actor_num_cpus}
    if cfg.actor_num_gpus > 0:
        resources["num_gpus"] = cfg.actor_num_gpus
    if cfg.actor_resource:
        resources["resources"] = {cfg.actor_resource: ACTOR_RESOURCE_SHARE}
    return ds.map_batches(
        RematchActor,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        batch_size=cfg.block_size,
        batch_format="numpy",
        fn_constructor_kwargs={"cfg": cfg, "model_cfg": model_cfg, "ot_cfg": ot_cfg, "weights": weights,
                               "namespace": namespace, "flags": flags, "reference": reference},
        **resources,
        **(ray_remote_args or {}),
    )
