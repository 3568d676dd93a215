"""Caption re-matching (METHOD.md B): the pure-torch matcher, its Ray Data stage, weight publication, cleaning.

    from otc_ray.rematch import match_block, Matcher, add_rematch_stage, clean_shards
"""
from __future__ import annotations

from .flags import FlagStore, flag_store
from .matcher import (BlockMatch, CaptionBank, CaptionFeatures, ImageFeatures, Matcher, MatchResult, Pool,
                      build_pool, match_block)
from .stage import OUTPUT_COLUMNS, RematchActor, add_rematch_stage, rematch_batch
from .weights import WeightFollower, WeightStore, publish, weight_store

__all__ = ["BlockMatch", "CaptionBank", "CaptionFeatures", "ImageFeatures", "Matcher", "MatchResult", "Pool",
           "build_pool", "match_block", "OUTPUT_COLUMNS", "RematchActor", "add_rematch_stage", "rematch_batch",
           "WeightFollower", "WeightStore", "publish", "weight_store", "FlagStore", "flag_store", "clean_shards",
           "CleanSummary"]


def __getattr__(name: str):
    if name in ("clean_shards", "CleanSummary"):      # the cleaning job pulls in storage / evaluate modules
        from . import clean
        return getattr(clean, name)
    raise AttributeError(f"module 'otc_ray.rematch' has no attribute {name!r}")
