"""Attacks for benchmarks: pure, seeded triggers (`triggers`) and the poisoning transform.

    from otc_ray.poison import apply_trigger, TriggerSpec, poison_shards

The transform is split by job: `classes` (which class a sample is), `select` (which samples an attack takes),
`rewrite` (writing the poisoned shards), `transform` (the entry point `poison_shards` and its report),
`manifest` (the ground truth). `poison_shards` / `PoisonReport` load on first use (they read and write shards).
"""
from otc_ray.poison.triggers import (
    KINDS,
    LOCATIONS,
    TriggerSpec,
    apply_trigger,
    patch_origins,
    trigger_region_mask,
)

__all__ = ["KINDS", "LOCATIONS", "TriggerSpec", "apply_trigger", "patch_origins", "trigger_region_mask",
           "poison_shards", "PoisonReport"]


def __getattr__(name: str):
    if name in ("poison_shards", "PoisonReport"):
        from otc_ray.poison import transform

        return getattr(transform, name)
    raise AttributeError(f"module 'otc_ray.poison' has no attribute {name!r}")
