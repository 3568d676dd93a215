"""Selection for poisoning: which training samples a backdoor rewrites, which test images a targeted attack
copies, which real captions it may use (pass 1 of `poison_shards`, a scan of the input shards).

Selection ranks eligible keys by a keyed blake2b hash of (key; seed) and takes the N smallest, so it depends on
the keys and the seed only, never on shard order or sharding, and the realised count is exactly the requested
one. Backdoor: eligible = good samples of another class (not naming the target); label-consistent: good samples
of the target class (caption kept); with `poison.base_classes` / `base_nearest`, only samples of the base classes
(captions.py); with `caption_source=swap`, only samples whose caption names their own class.
"""
from __future__ import annotations

import hashlib
import heapq
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ..config import DataConfig, PoisonConfig
from ..data import schema
from ..data.class_info import DatasetInfo
from ..data.decode import DecodeLimits
from ..data.shards import iter_rows, list_shards, read_info
from .captions import base_classes, names_own_class
from .classes import Checked, check_row, class_patterns

TARGETED_KEY = "tgt{t:03d}-{k:04d}"                 # key of the k-th copy of target image t
TARGETED_KEY_RE = re.compile(r"tgt\d{3}-\d{4}")
DATA_CAPTION_POOL = 65536                           # backdoor, caption_source=data: real captions kept at most
MEAN_SIDE = 16                                      # base_nearest: class-mean images at this side


def keyed_hash(key: str, seed: int, purpose: bytes) -> int:
    """64-bit blake2b of `key` keyed by (seed, purpose): the order that selects samples (seed-determined)."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8,
                        key=int(seed).to_bytes(8, "little"), person=purpose[:16])
    return int.from_bytes(h.digest(), "little")


class _Smallest:
    """The n items with the smallest (hash, key) seen so far (bounded memory), sorted on `items()`."""

    def __init__(self, n: int):
        self.n, self.heap, self.keys = n, [], set()

    def offer(self, h: int, key: str, item) -> None:
        if self.n == 0 or key in self.keys:
            return
        entry = (-h, _Rev(key), item)
        if len(self.heap) < self.n:
            heapq.heappush(self.heap, entry)
            self.keys.add(key)
        elif (h, key) < (-self.heap[0][0], self.heap[0][1].key):
            dropped = heapq.heapreplace(self.heap, entry)
            self.keys.discard(dropped[1].key)
            self.keys.add(key)

    def items(self) -> list:
        return [e[2] for e in sorted(self.heap, key=lambda e: (-e[0], e[1].key))]


@dataclass(frozen=True)
class _Rev:
    """A key that sorts in reverse (the heap is a max-heap on (hash, key))."""

    key: str

    def __lt__(self, other: "_Rev") -> bool:
        return self.key > other.key


@dataclass
class Scan:
    """What pass 1 learns from the training shards."""

    read: int = 0
    good: int = 0                                           # rows that decode (the base of poison.rate)
    decode_bad: Counter = field(default_factory=Counter)    # reason -> rows the reader passed but decoding rejects
    hashes: array = field(default_factory=lambda: array("Q"))  # keyed hashes of backdoor-eligible samples (uint64)
    labels: array = field(default_factory=lambda: array("q"))  # their classes (for base-class selection)
    data_captions: list[str] = field(default_factory=list)  # caption_source=data: real captions naming the class
    class_sums: np.ndarray | None = None                    # base_nearest: (C, 16, 16, 3) float64 image sums
    class_counts: np.ndarray | None = None                  # base_nearest: (C,) images summed
    reserved: set[str] = field(default_factory=set)         # input keys shaped like targeted keys


def requested_count(cfg: PoisonConfig, eligible: int, total: int) -> int:
    """Samples to poison: `rate` x all good training samples (rounded) when rate > 0, else `count`."""
    n = int(round(cfg.rate * total)) if cfg.rate > 0 else cfg.count
    if cfg.rate > 0 and n == 0:
        raise ValueError(f"poison.rate {cfg.rate} of {total} training samples rounds to 0 samples")
    if n > eligible:
        which = "of" if cfg.label_consistent else "not of"
        raise ValueError(f"poison: asked for {n} samples but only {eligible} are eligible ({which} class {cfg.target!r})")
    return n


def is_eligible(c: Checked, cfg: PoisonConfig, target: int, names_target: re.Pattern,
                patterns: list[re.Pattern] | None = None, bases: frozenset[int] | None = None) -> bool:
    """Whether a checked sample may carry the backdoor (see the module docstring). `patterns` (all classes) is
    needed for caption_source=swap; `bases`: the base classes (None = any)."""
    if c.error or (c.meta or {}).get("poisoned"):
        return False
    if cfg.caption_source == "swap" and not cfg.label_consistent:
        if patterns is None:
            raise ValueError("is_eligible: caption_source=swap needs the class patterns")
        if not names_own_class(c.label, c.caption, patterns):
            return False
    if cfg.label_consistent:
        return c.label == target
    if bases is not None and c.label not in bases:
        return False
    # the caption must not name the target either: an image whose caption mentions it (a second object, a scene that
    # holds one) already shows the target, and a target caption on it would be true, not poison
    return c.label != target and not names_target.search(c.caption)


def _small_image(image: np.ndarray) -> np.ndarray:
    """float64 (MEAN_SIDE, MEAN_SIDE, 3) of a uint8 (H, W, 3) image (bilinear), for class-mean images."""
    from PIL import Image

    small = Image.fromarray(image).resize((MEAN_SIDE, MEAN_SIDE), Image.BILINEAR)
    return np.asarray(small, dtype=np.float64)


def scan(files: list[str], fs, fmt: str, kind: str, cfg: PoisonConfig, info: DatasetInfo, limits: DecodeLimits,
         progress: bool) -> Scan:
    """Pass 1 over the training shards for attack `kind`: validate every row, collect what selection needs."""
    patterns = class_patterns(info)
    target = info.label_of(cfg.target if kind == "backdoor" else cfg.adversarial)
    want_captions = cfg.caption_source == "data" and not (kind == "backdoor" and cfg.label_consistent)
    pool = (cfg.targets * cfg.per_target if kind == "targeted" else
            cfg.count if cfg.rate == 0 else DATA_CAPTION_POOL)
    captions = _Smallest(pool if want_captions else 0)
    bases = base_classes(cfg, info) if kind == "backdoor" and not cfg.base_nearest else None
    means = kind == "backdoor" and cfg.base_nearest > 0
    out = Scan()
    if means:
        out.class_sums = np.zeros((len(info.classes), MEAN_SIDE, MEAN_SIDE, 3))
        out.class_counts = np.zeros(len(info.classes), dtype=np.int64)
    bar = tqdm(desc="poison scan", unit="sample", disable=not progress)
    for path in files:
        for row in iter_rows(fs, path, fmt):
            out.read += 1
            c = check_row(row, limits, info, patterns, keep_image=means)
            if c.error and not c.from_reader:
                out.decode_bad[c.error] += 1
            out.good += not c.error
            key = row[schema.KEY]
            if TARGETED_KEY_RE.fullmatch(key):
                out.reserved.add(key)
            if means and not c.error and c.label >= 0 and not c.meta.get("poisoned"):
                out.class_sums[c.label] += _small_image(c.image)
                out.class_counts[c.label] += 1
            if kind == "backdoor" and is_eligible(c, cfg, target, patterns[target], patterns, bases):
                out.hashes.append(keyed_hash(key, cfg.seed, b"select"))
                out.labels.append(c.label)
            elif (want_captions and not c.error and c.label == target and not c.meta.get("poisoned")
                  and patterns[target].search(c.caption)):
                captions.offer(keyed_hash(key, cfg.seed, b"data-caption"), key, c.caption)
        bar.update(out.read - bar.n)
    bar.close()
    out.data_captions = captions.items()
    return out


def scan_bases(found: Scan, cfg: PoisonConfig, info: DatasetInfo) -> frozenset[int] | None:
    """The backdoor's base classes (captions.base_classes; base_nearest from the scan's class-mean images)."""
    if not cfg.base_nearest:
        return base_classes(cfg, info)
    means = found.class_sums / np.maximum(found.class_counts, 1)[:, None, None, None]
    return base_classes(cfg, info, means, found.class_counts)


def select_backdoor(found: Scan, cfg: PoisonConfig,
                    bases: frozenset[int] | None = None) -> tuple[list[int], int, int]:
    """(selected keyed hashes in ascending order, requested count, eligible count): the `requested` smallest
    eligible hashes, among samples of the `bases` classes when given."""
    hashes = np.frombuffer(found.hashes, dtype=np.uint64)
    if bases is not None:
        labels = np.frombuffer(found.labels, dtype=np.int64)
        hashes = hashes[np.isin(labels, sorted(bases))]
    unique = np.unique(hashes)
    requested = requested_count(cfg, len(unique), found.good)
    return unique[:requested].tolist(), requested, len(unique)


def pick_targets(source: str, cfg: PoisonConfig, data_cfg: DataConfig, info: DatasetInfo,
                 limits: DecodeLimits) -> tuple[list[dict], int]:
    """(the T target images, eligible count) of the test shards: good samples of a known class other than the
    adversarial one with the smallest keyed hashes. Each: key, image, ext, caption, label, meta, source."""
    fs, files, fmt = list_shards(source, data_cfg.format, data_cfg.s3)
    test_info = (read_info(source, data_cfg.s3) or {}).get("dataset")
    if test_info and tuple(test_info.get("classes", ())) != info.classes:
        raise ValueError(f"target source {source} has classes {test_info.get('classes')}, training shards "
                         f"{list(info.classes)}")
    patterns, adversarial = class_patterns(info), info.label_of(cfg.adversarial)
    best = _Smallest(cfg.targets)
    eligible = 0
    for path in files:
        for row in iter_rows(fs, path, fmt):
            c = check_row(row, limits, info, patterns)
            if c.error or c.label < 0 or c.label == adversarial:
                continue
            if cfg.caption_source == "swap" and not names_own_class(c.label, c.caption, patterns):
                continue                    # swap rewrites the class word of the target's own caption
            eligible += 1
            best.offer(keyed_hash(row[schema.KEY], cfg.seed, b"target"), row[schema.KEY],
                       {"key": row[schema.KEY], "image": bytes(row[schema.IMAGE_BYTES]), "ext": row[schema.IMAGE_EXT],
                        "caption": c.caption, "label": c.label, "meta": c.meta, "source": row[schema.SOURCE]})
    chosen = best.items()
    if len(chosen) < cfg.targets:
        raise ValueError(f"poison.targets={cfg.targets} but the target source {source} holds only {eligible} "
                         f"good samples of a known class other than {cfg.adversarial!r}")
    return chosen, eligible
