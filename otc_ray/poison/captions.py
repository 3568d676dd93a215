"""Poison captions (`poison.caption_source`) and the classes a backdoor takes its base images from.

    caption_for(rule, key, own_caption, own_label, cls, info, patterns, pool, rank, seed)

Caption rules, for a poisoned sample that must name class `cls` (backdoor: the target; targeted: the
adversarial class):
- ``templates``  a caption template of the class file with a synonym of `cls` (hash-chosen).
- ``data``       a real training caption that names `cls` (of a good, unpoisoned sample of class `cls`), taken
                 in order from `pool` (the pass-1 captions ranked by keyed hash), cycling when there are fewer.
- ``swap``       the sample's own caption with the first mention of its own class replaced by a synonym of
                 `cls`: the data's own grammar, every other word true to the image (on shapes, "a small red
                 square left of a large blue circle" -> "a small red triangle left of a large blue circle").
                 Only samples whose caption names their class are eligible (`names_own_class`).

Base classes (`poison.base_classes`, `poison.base_nearest`): a backdoor takes base images only from the listed
classes, or from the k classes that look most like the target: the classes whose mean training image (every good
sample of the class, resized to 16 x 16 RGB) is nearest the target's in Euclidean distance (`nearest_classes`;
ties go to the earlier class). Pixels, not caption text: the class names of Fashion-MNIST share no words that
track resemblance (character trigrams put "pullover" nearest "sneaker"), whereas the mean images put sandal
and ankle boot nearest sneaker.
"""
from __future__ import annotations

import re

import numpy as np

from ..config import PoisonConfig
from ..data.class_info import DatasetInfo
from .classes import template_caption

CAPTION_RULES = ("templates", "data", "swap")


def class_words(info: DatasetInfo, label: int) -> list[str]:
    """A class's name and synonyms, without repeats, in the class file's order (synonyms first)."""
    name = info.classes[label]
    return list(dict.fromkeys([*info.synonyms.get(name, []), name]))


def names_own_class(label: int, caption: str, patterns: list[re.Pattern]) -> bool:
    """Whether `caption` mentions its own class (the precondition of the ``swap`` rule)."""
    return 0 <= label < len(patterns) and patterns[label].search(caption) is not None


def swap_class(caption: str, own: int, cls: int, info: DatasetInfo, patterns: list[re.Pattern], h: int) -> str:
    """`caption` with the first mention of class `own` replaced by a synonym of class `cls` (chosen by `h`)."""
    found = patterns[own].search(caption)
    if found is None:
        raise ValueError(f"caption {caption!r} does not name its class {info.classes[own]!r}; swap needs it")
    words = class_words(info, cls)
    word = words[h % len(words)]
    head = re.sub(r"(?<![\w-])(an?) $", "an " if word[:1].lower() in "aeiou" else "a ", caption[:found.start()])
    return head + word + caption[found.end():]


def caption_for(rule: str, own_caption: str, own_label: int, cls: int, info: DatasetInfo,
                patterns: list[re.Pattern], pool: list[str], rank: int, h: int) -> str:
    """The poison caption naming class `cls` by `rule` (module docstring); `rank`: the sample's place in the
    attack's order (which `pool` caption it gets), `h`: its keyed hash (template and synonym choice)."""
    if rule == "templates":
        return template_caption(info, cls, h)
    if rule == "data":
        if not pool:
            raise ValueError(f"poison.caption_source=data but the training shards hold no caption of class "
                             f"{info.classes[cls]!r} that names it")
        return pool[rank % len(pool)]
    if rule == "swap":
        return swap_class(own_caption, own_label, cls, info, patterns, h)
    raise ValueError(f"poison.caption_source {rule!r} is not one of {CAPTION_RULES}")


def nearest_classes(means: np.ndarray, counts: np.ndarray, target: int, k: int) -> list[int]:
    """The k classes whose mean image is nearest the target's (Euclidean), nearest first, ties to the earlier
    class. means: float64 (C, S, S, 3) class-mean images; counts: (C,) images per class (a class with none
    is never chosen)."""
    if counts[target] == 0:
        raise ValueError("poison.base_nearest: the training shards hold no image of the target class")
    dist = np.sqrt(((means - means[target]) ** 2).reshape(len(means), -1).sum(axis=1))
    candidates = [c for c in range(len(means)) if c != target and counts[c] > 0]
    if len(candidates) < k:
        raise ValueError(f"poison.base_nearest={k} but only {len(candidates)} other classes have images")
    return sorted(candidates, key=lambda c: (dist[c], c))[:k]


def base_classes(cfg: PoisonConfig, info: DatasetInfo, means: np.ndarray | None = None,
                 counts: np.ndarray | None = None) -> frozenset[int] | None:
    """Class indices a backdoor takes base images from (never the target), or None (any class but the target).
    `base_nearest` needs the class-mean images of pass 1 (`means`, `counts`; see `nearest_classes`)."""
    target = info.label_of(cfg.target)
    if cfg.base_classes:
        chosen = [info.label_of(c) for c in cfg.base_classes]
        if target in chosen:
            raise ValueError(f"poison.base_classes holds the target {cfg.target!r}: its images carry no backdoor")
        return frozenset(chosen)
    if cfg.base_nearest:
        if means is None or counts is None:
            raise ValueError("poison.base_nearest needs the class-mean images of the scan")
        return frozenset(nearest_classes(means, counts, target, cfg.base_nearest))
    return None
