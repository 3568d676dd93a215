"""Attacks for benchmarks: pure, seeded triggers (`triggers`) and the poisoning transform."""
from otc_ray.poison.triggers import (
    KINDS,
    LOCATIONS,
    TriggerSpec,
    apply_trigger,
    patch_origins,
    trigger_region_mask,
)

__all__ = ["KINDS", "LOCATIONS", "TriggerSpec", "apply_trigger", "patch_origins", "trigger_region_mask"]
