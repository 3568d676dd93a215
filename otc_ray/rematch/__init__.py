"""Caption re-matching (docs/method.md, Caption re-matching): the pure-torch matcher, its Ray Data stage, weight
publication.

    from otc_ray.rematch import match_block, Matcher, add_rematch_stage

The matcher (`matcher.py`, `gates.py`) is plain torch; importing it, or this package, does not import Ray. The Ray
parts (the stage, the weight and flag stores) load on first use of one of their names. The columns the stage adds
are in `otc_ray.data.schema` (OUTPUT_COLUMNS); the cleaning job is `otc_ray.pipelines.clean`.
"""
from __future__ import annotations

import importlib

from .matcher import (BlockMatch, CaptionBank, CaptionFeatures, ImageFeatures, Matcher, MatchResult, Pool,
                      build_pool, match_block)

_RAY_PARTS = {"RematchActor": "stage", "add_rematch_stage": "stage", "rematch_batch": "stage",
              "WeightFollower": "weights", "WeightStore": "weights", "publish": "weights", "weight_store": "weights",
              "FlagStore": "flags", "flag_store": "flags"}

__all__ = ["BlockMatch", "CaptionBank", "CaptionFeatures", "ImageFeatures", "Matcher", "MatchResult", "Pool",
           "build_pool", "match_block", *_RAY_PARTS]


def __getattr__(name: str):
    """The Ray parts, imported on first use (module __getattr__, PEP 562)."""
    if name in _RAY_PARTS:
        return getattr(importlib.import_module(f".{_RAY_PARTS[name]}", __name__), name)
    raise AttributeError(f"module 'otc_ray.rematch' has no attribute {name!r}")
