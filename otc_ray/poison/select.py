"""Selection for poisoning: which training samples a backdoor rewrites, which test images a targeted attack
copies, which real captions it may use (pass 1 of `poison_shards`, a scan of the input shards).

Selection ranks eligible keys by a keyed blake2b hash of (key; seed) and takes the N smallest, so it depends on
the keys and the seed only, never on shard order or sharding, and the realised count is exactly the requested
one. Backdoor: eligible = good samples of another class (not naming the target); label-consistent: good samples
of the target class (caption kept).
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
from .classes import Checked, check_row, class_patterns

TARGETED_KEY = "tgt{t:03d}-{k:04d}"                 # key of the k-th copy of target image t
TARGETED_KEY_RE = re.compile(r"tgt\d{3}-\d{4}")


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
    data_captions: list[str] = field(default_factory=list)  # targeted, caption_source=data
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


def is_eligible(c: Checked, cfg: PoisonConfig, target: int, names_target: re.Pattern) -> bool:
    """Whether a checked sample may carry the backdoor (see the module docstring)."""
    if c.error or (c.meta or {}).get("poisoned"):
        return False
    if cfg.label_consistent:
        return c.label == target
    # the caption must not name the target either: an image whose caption mentions it (a second object, a scene that
    # holds one) already shows the target, and a target caption on it would be true, not poison
    return c.label != target and not names_target.search(c.caption)


def scan(files: list[str], fs, fmt: str, kind: str, cfg: PoisonConfig, info: DatasetInfo, limits: DecodeLimits,
         progress: bool) -> Scan:
    """Pass 1 over the training shards for attack `kind`: validate every row, collect what selection needs."""
    patterns = class_patterns(info)
    target = info.label_of(cfg.target if kind == "backdoor" else cfg.adversarial)
    want_captions = kind == "targeted" and cfg.caption_source == "data"
    captions = _Smallest(cfg.targets * cfg.per_target if want_captions else 0)
    out = Scan()
    bar = tqdm(desc="poison scan", unit="sample", disable=not progress)
    for path in files:
        for row in iter_rows(fs, path, fmt):
            out.read += 1
            c = check_row(row, limits, info, patterns)
            if c.error and not c.from_reader:
                out.decode_bad[c.error] += 1
            out.good += not c.error
            key = row[schema.KEY]
            if TARGETED_KEY_RE.fullmatch(key):
                out.reserved.add(key)
            if kind == "backdoor" and is_eligible(c, cfg, target, patterns[target]):
                out.hashes.append(keyed_hash(key, cfg.seed, b"select"))
            elif want_captions and not c.error and c.label == target and not c.meta.get("poisoned"):
                captions.offer(keyed_hash(key, cfg.seed, b"data-caption"), key, c.caption)
        bar.update(out.read - bar.n)
    bar.close()
    out.data_captions = captions.items()
    return out


def select_backdoor(found: Scan, cfg: PoisonConfig) -> tuple[set[int], int, int]:
    """(selected keyed hashes, requested count, eligible count): the `requested` smallest eligible hashes."""
    unique = np.unique(np.frombuffer(found.hashes, dtype=np.uint64))
    requested = requested_count(cfg, len(unique), found.good)
    return set(unique[:requested].tolist()), requested, len(unique)


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
            eligible += 1
            best.offer(keyed_hash(row[schema.KEY], cfg.seed, b"target"), row[schema.KEY],
                       {"key": row[schema.KEY], "image": bytes(row[schema.IMAGE_BYTES]), "ext": row[schema.IMAGE_EXT],
                        "caption": c.caption, "label": c.label, "meta": c.meta, "source": row[schema.SOURCE]})
    chosen = best.items()
    if len(chosen) < cfg.targets:
        raise ValueError(f"poison.targets={cfg.targets} but the target source {source} holds only {eligible} "
                         f"good samples of a known class other than {cfg.adversarial!r}")
    return chosen, eligible
