"""The poisoning transform: clean shards in, poisoned shards plus a ground-truth manifest out.

    report = poison_shards("shards/train", "shards/train_bd", cfg.poison, cfg.data)                  # backdoor
    report = poison_shards("shards/train", "shards/train_tg", tcfg, cfg.data, target_source="shards/test")
    print("\\n".join(report.lines()))

Two streaming passes over the input, shard by shard, in this process (local or s3://; no Ray):
  1. scan:    validate every sample (JSON meta, caption, image) and keep a 64-bit keyed hash of each one
              eligible for the attack; targeted: pick the target images from the test shards and, with
              `caption_source=data`, real captions of the adversarial class from the training shards.
  2. rewrite: input shard i becomes output shard i with the same samples in the same order. Chosen samples
              are rewritten; every other sample is copied as raw bytes (image, caption and JSON byte-identical,
              defective samples included); targeted copies are appended to shards chosen by hash.
Selection ranks eligible keys by blake2b(key; seed) and takes the N smallest, so it depends on the keys and
the seed only, never on shard order or sharding, and the realised count is exactly the requested one.

Classes come from the input's `_info.json` (`dataset` section). A sample's class is its meta `label` (or
`class` name); when neither names a known class, its caption decides: it "names" a class when one of the
class's synonyms occurs in it as words. Backdoor: eligible = good samples of another class (not naming the
target); label-consistent: good samples of the target class (caption kept). Poisoned images are decoded at
`data.image_size` (the size training and evaluation see), triggered and re-encoded in the input's format
(PNG; JPEG is lossy, which the manifest records). A poisoned sample's meta keeps its true `label` and gains
`"poisoned": true` and the attack fields.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import json
import posixpath
import re
import tarfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..config import DataConfig, PoisonConfig
from ..data import schema as S
from ..data.builtin import DatasetInfo
from ..data.decode import DecodeLimits, decode_caption, decode_image, decode_meta
from ..data.parquet_format import iter_parquet_samples
from ..data.shards import INFO_FILE, SUFFIX, ShardSetError, commit_file, encode_image, list_shards, read_info
from ..data.storage import display, resolve
from ..data.tar_format import iter_tar_samples
from .manifest import MANIFEST_FILE, read_manifest, write_manifest
from .triggers import TriggerSpec, apply_trigger, trigger_region_mask

_TARGETED_KEY = "tgt{t:03d}-{k:04d}"
_TARGETED_KEY_RE = re.compile(r"tgt\d{3}-\d{4}")


# ----------------------------------------------------------------------------------------- report
@dataclass
class PoisonReport:
    """What `poison_shards` did. Every reader row of the input is in exactly one of: passed (clean),
    passed_bad (defective but copied unchanged, by reason), poisoned, skipped (not written, by reason)."""

    out: str
    attack: str
    read: int = 0
    passed: int = 0
    poisoned: int = 0
    inserted: int = 0
    eligible: int = 0
    requested: int = 0
    passed_bad: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    num_shards: int = 0
    written: int = 0
    seconds: float = 0.0
    manifest: str = ""
    trigger: dict | None = None
    target: str = ""

    @property
    def samples_per_second(self) -> float:
        """Input samples processed per second, both passes included."""
        return self.read / max(self.seconds, 1e-9)

    def lines(self) -> list[str]:
        out = [f"poisoned set   {self.out} ({self.num_shards} shards, {self.written} samples)",
               f"attack         {self.attack} -> {self.target}"
               + (f"  trigger {json.dumps(self.trigger, sort_keys=True)}" if self.trigger else ""),
               f"read           {self.read}",
               f"passed         {self.passed} clean, {sum(self.passed_bad.values())} defective copied unchanged",
               f"poisoned       {self.poisoned} of {self.eligible} eligible (requested {self.requested})"
               if self.attack == "backdoor" else
               f"inserted       {self.inserted} (requested {self.requested}; targets from {self.eligible} eligible "
               "test images)"]
        out += [f"  passed bad   {k:<18} {v}" for k, v in sorted(self.passed_bad.items())]
        out += [f"  skipped      {k:<18} {v}" for k, v in sorted(self.skipped.items())]
        out += [f"manifest       {self.manifest}", f"throughput     {self.samples_per_second:.0f} samples/s"]
        return out


# ----------------------------------------------------------------------------------------- helpers
def keyed_hash(key: str, seed: int, purpose: bytes) -> int:
    """64-bit blake2b of `key` keyed by (seed, purpose): the order that selects samples (seed-determined)."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8,
                        key=int(seed).to_bytes(8, "little"), person=purpose[:16])
    return int.from_bytes(h.digest(), "little")


def _class_patterns(info: DatasetInfo) -> list[re.Pattern]:
    """Per class: a regex matching any of its synonyms (or its name) as whole words."""
    out = []
    for name in info.classes:
        words = sorted({name, *info.synonyms.get(name, [])}, key=len, reverse=True)
        out.append(re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])", re.I))
    return out


def class_of(meta: dict, caption: str, info: DatasetInfo, patterns: list[re.Pattern]) -> int:
    """Class index of a sample: meta `label` (int in range), else meta `class` name, else the single class
    its caption names; -1 when unknown or ambiguous."""
    label = meta.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(info.classes):
        return label
    if meta.get("class") in info.classes:
        return info.classes.index(meta["class"])
    named = [c for c, p in enumerate(patterns) if p.search(caption)]
    return named[0] if len(named) == 1 else -1


@dataclass(frozen=True)
class _Checked:
    """A reader row after validation: error "" for a good sample."""

    error: str
    label: int = -1
    caption: str = ""
    meta: dict = field(default_factory=dict)
    from_reader: bool = False        # the reader flagged it (not re-writable: skipped)


def _check(row: dict, limits: DecodeLimits, info: DatasetInfo, patterns: list[re.Pattern],
           with_image: bool = True) -> _Checked:
    """Validate one reader row as the training reader would (meta JSON, caption, image)."""
    if row[S.ERROR]:
        return _Checked(row[S.ERROR], from_reader=True)
    meta, err = decode_meta(row[S.META])
    caption, err = decode_caption(row[S.CAPTION_RAW], limits) if not err else ("", err)
    if not err and with_image:
        _, err = decode_image(row[S.IMAGE_BYTES], limits)
    if err:
        return _Checked(err)
    return _Checked("", class_of(meta, caption, info, patterns), caption, meta)


def _iter_rows(fs, path: str, fmt: str) -> Iterator[dict]:
    """Reader rows of one shard (tar streamed, parquet read whole)."""
    with fs.open(path, "rb") as f:
        source = display(fs, path)
        yield from (iter_tar_samples(f, source) if fmt == "wds" else iter_parquet_samples(f, source))


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


def _sniff_ext(ext: str, data: bytes) -> str:
    """A tar-readable image extension for image bytes from a column named `ext` (e.g. parquet 'image')."""
    if ext in S.IMAGE_EXTENSIONS:
        return ext
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"


# ----------------------------------------------------------------------------------------- writers
def _tar_bytes(samples: list[tuple]) -> bytes:
    """Raw samples (key, image bytes, ext, caption bytes | None, meta bytes) -> tar bytes (same headers as
    `write_tar_shard`: mtime 0, mode 644, no owner; pax headers only for names over 100 characters)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, image, ext, caption, meta in samples:
            members = ([(_sniff_ext(ext, image), image)] if image else []) \
                + ([("txt", caption)] if caption is not None else []) + [("json", meta)]
            for suffix, payload in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _parquet_bytes(samples: list[tuple]) -> bytes:
    """Raw samples -> parquet bytes with columns key, <image column>, caption, json (as `write_parquet_shard`).

    The image column is named after the shard's most common image extension; bytes are stored as they are
    (decoders detect the format), so a mixed-format tar shard converts without re-encoding.
    """
    exts = Counter("jpg" if e == "jpeg" else e for _, img, e, _, _ in samples if img)
    ext = exts.most_common(1)[0][0] if exts else "png"
    table = pa.table({
        "key": pa.array([s[0] for s in samples], pa.string()),
        ext: pa.array([s[1] or None for s in samples], pa.binary()),
        "caption": pa.array([None if s[3] is None else s[3].decode("utf-8") for s in samples], pa.string()),
        "json": pa.array([s[4].decode("utf-8") for s in samples], pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _raw(row: dict, out_fmt: str) -> tuple | str:
    """A reader row as a raw sample tuple, or the skip reason when `out_fmt` cannot hold it unchanged."""
    caption, meta = row[S.CAPTION_RAW], row[S.META] or b"{}"
    caption = bytes(caption) if caption is not None else None
    meta = bytes(meta) if not isinstance(meta, str) else meta.encode("utf-8")
    if out_fmt == "parquet":
        for value, reason in ((caption, S.BAD_UTF8), (meta, S.BAD_META)):
            try:
                value is None or value.decode("utf-8")
            except UnicodeDecodeError:
                return reason
    return (row[S.KEY], bytes(row[S.IMAGE_BYTES] or b""), row[S.IMAGE_EXT], caption, meta)


# ----------------------------------------------------------------------------------------- pass 1
@dataclass
class _Scan:
    """What pass 1 learns from the training shards."""

    read: int = 0
    good: int = 0                                           # rows that decode (the base of poison.rate)
    decode_bad: Counter = field(default_factory=Counter)    # reason -> rows the reader passed but decoding rejects
    hashes: array = field(default_factory=lambda: array("Q"))  # keyed hashes of backdoor-eligible samples (uint64)
    data_captions: list[str] = field(default_factory=list)  # targeted, caption_source=data
    reserved: set[str] = field(default_factory=set)         # input keys shaped like targeted keys


def _requested_count(cfg: PoisonConfig, eligible: int, total: int) -> int:
    """Samples to poison: `rate` x all good training samples (rounded) when rate > 0, else `count`."""
    n = int(round(cfg.rate * total)) if cfg.rate > 0 else cfg.count
    if cfg.rate > 0 and n == 0:
        raise ValueError(f"poison.rate {cfg.rate} of {total} training samples rounds to 0 samples")
    if n > eligible:
        which = "of" if cfg.label_consistent else "not of"
        raise ValueError(f"poison: asked for {n} samples but only {eligible} are eligible ({which} class {cfg.target!r})")
    return n


def _is_eligible(c: _Checked, cfg: PoisonConfig, target: int, names_target: re.Pattern) -> bool:
    if c.error or (c.meta or {}).get("poisoned"):
        return False
    if cfg.label_consistent:
        return c.label == target
    return c.label != target and not (c.label < 0 and names_target.search(c.caption))


def _scan(files: list[str], fs, fmt: str, cfg: PoisonConfig, info: DatasetInfo, limits: DecodeLimits,
          progress: bool) -> _Scan:
    """Pass 1 over the training shards: validate every row, collect what selection needs."""
    patterns = _class_patterns(info)
    target = info.label_of(cfg.target if cfg.attack == "backdoor" else cfg.adversarial)
    want_captions = cfg.attack == "targeted" and cfg.caption_source == "data"
    captions = _Smallest(cfg.targets * cfg.per_target if want_captions else 0)
    scan = _Scan()
    bar = tqdm(desc="poison scan", unit="sample", disable=not progress)
    for path in files:
        for row in _iter_rows(fs, path, fmt):
            scan.read += 1
            c = _check(row, limits, info, patterns)
            if c.error and not c.from_reader:
                scan.decode_bad[c.error] += 1
            scan.good += not c.error
            key = row[S.KEY]
            if _TARGETED_KEY_RE.fullmatch(key):
                scan.reserved.add(key)
            if cfg.attack == "backdoor" and _is_eligible(c, cfg, target, patterns[target]):
                scan.hashes.append(keyed_hash(key, cfg.seed, b"select"))
            elif want_captions and not c.error and c.label == target and not c.meta.get("poisoned"):
                captions.offer(keyed_hash(key, cfg.seed, b"data-caption"), key, c.caption)
        bar.update(scan.read - bar.n)
    bar.close()
    scan.data_captions = captions.items()
    return scan


def _pick_targets(source: str, cfg: PoisonConfig, data_cfg: DataConfig, info: DatasetInfo,
                  limits: DecodeLimits) -> tuple[list[dict], int]:
    """(the T target images, eligible count) of the test shards: good samples of a known class other than the
    adversarial one with the smallest keyed hashes. Each: key, image, ext, caption, label, meta, source."""
    fs, files, fmt = list_shards(source, data_cfg.format, data_cfg.s3)
    test_info = (read_info(source, data_cfg.s3) or {}).get("dataset")
    if test_info and tuple(test_info.get("classes", ())) != info.classes:
        raise ValueError(f"target source {source} has classes {test_info.get('classes')}, training shards "
                         f"{list(info.classes)}")
    patterns, adversarial = _class_patterns(info), info.label_of(cfg.adversarial)
    best = _Smallest(cfg.targets)
    eligible = 0
    for path in files:
        for row in _iter_rows(fs, path, fmt):
            c = _check(row, limits, info, patterns)
            if c.error or c.label < 0 or c.label == adversarial:
                continue
            eligible += 1
            best.offer(keyed_hash(row[S.KEY], cfg.seed, b"target"), row[S.KEY],
                       {"key": row[S.KEY], "image": bytes(row[S.IMAGE_BYTES]), "ext": row[S.IMAGE_EXT],
                        "caption": c.caption, "label": c.label, "meta": c.meta, "source": row[S.SOURCE]})
    chosen = best.items()
    if len(chosen) < cfg.targets:
        raise ValueError(f"poison.targets={cfg.targets} but the target source {source} holds only {eligible} "
                         f"good samples of a known class other than {cfg.adversarial!r}")
    return chosen, eligible


def _targeted_inserts(cfg: PoisonConfig, info: DatasetInfo, targets: list[dict], data_captions: list[str],
                      num_shards: int) -> list[dict]:
    """T x K new samples: key tgtTTT-KKKK, the target image's bytes, an adversarial-class caption, the
    target's meta (true label) plus the attack fields; `shard` is the output shard index (by hash)."""
    adversarial = info.label_of(cfg.adversarial)
    if cfg.caption_source == "data" and not data_captions:
        raise ValueError(f"poison.caption_source=data but the training shards hold no good sample of "
                         f"class {cfg.adversarial!r}")
    out = []
    for t, tgt in enumerate(targets):
        for k in range(cfg.per_target):
            key = _TARGETED_KEY.format(t=t, k=k)
            h = keyed_hash(key, cfg.seed, b"caption")
            caption = (data_captions[(t * cfg.per_target + k) % len(data_captions)] if cfg.caption_source == "data"
                       else _template_caption(info, adversarial, h))
            meta = {**tgt["meta"], "poisoned": True, "attack": "targeted", "poison_class": cfg.adversarial,
                    "source_key": tgt["key"]}
            ext = _sniff_ext(tgt["ext"], tgt["image"])
            out.append({"key": key, "image": tgt["image"], "ext": ext, "caption": caption, "meta": meta,
                        "shard": keyed_hash(key, cfg.seed, b"placement") % num_shards,
                        "manifest": {"key": key, "attack": "targeted", "trigger": "",
                                     "original_caption": tgt["caption"], "poisoned_caption": caption,
                                     "original_class": info.classes[tgt["label"]], "original_label": tgt["label"],
                                     "target_class": cfg.adversarial, "target_label": adversarial,
                                     "source_key": tgt["key"], "source": tgt["source"],
                                     "image_format": "jpg" if ext == "jpeg" else ext, "lossy": False,
                                     "image_bytes": tgt["image"]}})
    return out


def _template_caption(info: DatasetInfo, label: int, h: int) -> str:
    """A caption naming class `label`, template and synonym chosen by the hash `h` (deterministic variety)."""
    n_templates = len(info.caption_templates)
    n_synonyms = max(1, len(info.synonyms.get(info.classes[label], [])))
    return info.caption_for(label, h % n_templates, (h // n_templates) % n_synonyms)


# ----------------------------------------------------------------------------------------- rewrite
def _backdoor_sample(row: dict, c: _Checked, cfg: PoisonConfig, info: DatasetInfo, spec: TriggerSpec,
                     limits: DecodeLimits) -> tuple[tuple, dict]:
    """(raw sample tuple, manifest row without `shard`) of one backdoored sample."""
    key = row[S.KEY]
    image, _ = decode_image(row[S.IMAGE_BYTES], limits)
    triggered = apply_trigger(image[None], spec, rng_seed=[keyed_hash(key, cfg.seed, b"trigger") >> 1])[0]
    image_format = "jpg" if row[S.IMAGE_EXT] in ("jpg", "jpeg") else "png"
    target = info.label_of(cfg.target)
    if cfg.label_consistent:                 # caption kept as stored (raw bytes)
        caption, caption_bytes = c.caption, bytes(row[S.CAPTION_RAW])
    else:
        caption = _template_caption(info, target, keyed_hash(key, cfg.seed, b"caption"))
        caption_bytes = caption.encode("utf-8")
    meta = {**c.meta, "poisoned": True, "attack": "backdoor", "poison_class": cfg.target, "trigger": spec.kind}
    sample = (key, encode_image(triggered, image_format), image_format, caption_bytes,
              json.dumps(meta, sort_keys=True).encode("utf-8"))
    manifest = {"key": key, "attack": "backdoor", "trigger": json.dumps(spec.to_dict(), sort_keys=True),
                "original_caption": c.caption, "poisoned_caption": caption,
                "original_class": info.classes[c.label] if c.label >= 0 else "", "original_label": c.label,
                "target_class": cfg.target, "target_label": target, "source_key": key, "source": row[S.SOURCE],
                "image_format": image_format, "lossy": image_format == "jpg", "image_bytes": None}
    return sample, manifest


def _insert_sample(ins: dict) -> tuple:
    return (ins["key"], ins["image"], ins["ext"], ins["caption"].encode("utf-8"),
            json.dumps(ins["meta"], sort_keys=True).encode("utf-8"))


# ----------------------------------------------------------------------------------------- entry point
def _load_info(in_path: str, data_cfg: DataConfig) -> tuple[dict, DatasetInfo]:
    info = read_info(in_path, data_cfg.s3)
    if not info or "dataset" not in info:
        raise ValueError(f"{in_path} has no {INFO_FILE} with a 'dataset' section (classes, synonyms, templates); "
                         "poisoning needs the class names")
    return info, DatasetInfo.from_dict(info["dataset"])


def prior_attacks(info: dict) -> list[dict]:
    """The attacks already applied to a shard set (its `_info.json` `poison` section and `poison_history`)."""
    return list(info.get("poison_history", [])) + ([info["poison"]] if "poison" in info else [])


def _check_args(in_path: str, out_path: str, cfg: PoisonConfig, data_cfg: DataConfig, info: DatasetInfo,
                target_source: str | None) -> None:
    if cfg.attack == "none":
        raise ValueError("poison.attack is 'none'; choose backdoor or targeted")
    done = [p.get("attack") for p in prior_attacks(read_info(in_path, data_cfg.s3) or {})]
    if cfg.attack in done:
        raise ValueError(f"{in_path} already carries a {cfg.attack} attack; attacks compose only across kinds "
                         "(one backdoor and one targeted), each recorded in the one manifest")
    in_root, out_root = resolve(in_path, data_cfg.s3)[1], resolve(out_path, data_cfg.s3)[1]
    if out_root == in_root or out_root.startswith(in_root.rstrip("/") + "/"):
        raise ValueError(f"output {out_path} is the input shard set {in_path} or inside it")
    info.label_of(cfg.target if cfg.attack == "backdoor" else cfg.adversarial)
    if cfg.attack == "backdoor":
        trigger_region_mask(TriggerSpec.from_config(cfg), data_cfg.image_size, data_cfg.image_size)
    elif not target_source:
        raise ValueError("the targeted attack needs target_source: the test shards to take target images from")
    elif cfg.targets > 1000 or cfg.per_target > 10000:
        raise ValueError(f"targeted keys tgtTTT-KKKK allow up to 1000 targets x 10000 copies, got "
                         f"{cfg.targets} x {cfg.per_target}")
    try:
        list_shards(out_path, "auto", data_cfg.s3)
    except ShardSetError:
        return
    raise ValueError(f"output {out_path} already holds shards; choose an empty folder or prefix")


def poison_shards(in_path: str, out_path: str, cfg: PoisonConfig, data_cfg: DataConfig,
                  target_source: str | None = None, progress: bool = True) -> PoisonReport:
    """Poison the shard set at `in_path` into `out_path` (local or s3://; see the module docstring).

    Writes `out_path/NNNNN.tar|.parquet` (one per input shard), `_poison_manifest.parquet` and `_info.json`
    (the input's plus a `poison` section). Raises ValueError for a bad request (unknown class, too few
    eligible samples, non-empty output, ...) before writing anything.
    """
    start = time.perf_counter()
    in_info, info = _load_info(in_path, data_cfg)
    _check_args(in_path, out_path, cfg, data_cfg, info, target_source)
    fs, files, fmt = list_shards(in_path, data_cfg.format, data_cfg.s3)
    out_fmt = fmt if cfg.out_format == "same" else cfg.out_format
    limits = DecodeLimits.from_config(data_cfg)
    spec = TriggerSpec.from_config(cfg) if cfg.attack == "backdoor" else None

    scan = _scan(files, fs, fmt, cfg, info, limits, progress)
    inserts: list[dict] = []
    if cfg.attack == "backdoor":
        unique = np.unique(np.frombuffer(scan.hashes, dtype=np.uint64))
        requested = _requested_count(cfg, len(unique), scan.good)
        selected, eligible = set(unique[:requested].tolist()), len(unique)
    else:
        targets, eligible = _pick_targets(target_source, cfg, data_cfg, info, limits)
        inserts = _targeted_inserts(cfg, info, targets, scan.data_captions, len(files))
        clash = scan.reserved & {i["key"] for i in inserts}
        if clash:
            raise ValueError(f"the input already holds keys of the form tgtTTT-KKKK ({sorted(clash)[:3]}); "
                             "targeted copies would collide")
        selected, requested = set(), cfg.targets * cfg.per_target

    report = PoisonReport(out=out_path, attack=cfg.attack, read=scan.read, eligible=eligible, requested=requested,
                          num_shards=len(files), trigger=spec.to_dict() if spec else None,
                          target=cfg.target if cfg.attack == "backdoor" else cfg.adversarial)
    manifest, not_copied = _rewrite(files, fs, fmt, out_path, out_fmt, cfg, data_cfg, info, spec, limits,
                                    selected, inserts, report, progress)
    report.passed_bad = {r: n - not_copied[r] for r, n in scan.decode_bad.items() if n > not_copied[r]}
    report.passed = (report.read - report.poisoned - sum(report.skipped.values())
                     - sum(report.passed_bad.values()))
    out_fs, out_root = resolve(out_path, data_cfg.s3)
    if prior_attacks(in_info):                       # composed attacks: one manifest holds every poisoned key
        ext = {"wds": ".tar", "parquet": ".parquet"}[out_fmt]
        prior = [{**r, "shard": posixpath.splitext(r["shard"])[0] + ext}
                 for r in read_manifest(in_path, data_cfg.s3).to_pylist()]
        manifest = prior + manifest
    write_manifest(out_fs, posixpath.join(out_root, MANIFEST_FILE), manifest)
    report.manifest = display(out_fs, posixpath.join(out_root, MANIFEST_FILE))
    _write_info(out_fs, out_root, in_info, in_path, cfg, report, target_source, out_fmt)
    report.seconds = time.perf_counter() - start
    return report


def _rewrite(files, fs, fmt, out_path, out_fmt, cfg, data_cfg, info, spec, limits, selected, inserts,
             report: PoisonReport, progress: bool) -> tuple[list[dict], Counter]:
    """Pass 2: write every output shard and count into `report`. Returns the manifest rows and, by reason,
    the defective rows the reader accepted that the output format cannot hold unchanged (skipped)."""
    out_fs, out_root = resolve(out_path, data_cfg.s3)
    patterns = _class_patterns(info)
    target = info.label_of(cfg.target) if cfg.attack == "backdoor" else -1
    done: set[int] = set()
    manifest: list[dict] = []
    skipped: Counter = Counter()
    not_copied: Counter = Counter()
    bar = tqdm(total=report.read, desc="poison write", unit="sample", disable=not progress)
    for index, path in enumerate(files):
        shard_name = f"{index:05d}{SUFFIX[out_fmt]}"
        shard = posixpath.join(out_root, shard_name)
        samples: list[tuple] = []
        for row in _iter_rows(fs, path, fmt):
            bar.update(1)
            h = keyed_hash(row[S.KEY], cfg.seed, b"select") if selected else -1
            if h in selected and h not in done:
                c = _check(row, limits, info, patterns)
                if _is_eligible(c, cfg, target, patterns[target]):
                    sample, entry = _backdoor_sample(row, c, cfg, info, spec, limits)
                    samples.append(sample)
                    manifest.append({**entry, "shard": shard_name})
                    done.add(h)
                    report.poisoned += 1
                    continue
            if row[S.ERROR]:
                skipped[row[S.ERROR]] += 1
                continue
            raw = _raw(row, out_fmt)
            if isinstance(raw, str):
                skipped[raw] += 1
                not_copied[raw] += 1
                continue
            samples.append(raw)
        for ins in (i for i in inserts if i["shard"] == index):
            samples.append(_insert_sample(ins))
            manifest.append({**ins["manifest"], "shard": shard_name})
            report.inserted += 1
        commit_file(out_fs, shard, (_tar_bytes if out_fmt == "wds" else _parquet_bytes)(samples))
        report.written += len(samples)
    bar.close()
    if report.poisoned != len(selected):
        raise RuntimeError(f"poisoned {report.poisoned} samples, selected {len(selected)}: the input changed "
                           "between the two passes")
    report.skipped = dict(skipped)
    return manifest, not_copied


def _write_info(fs, root: str, in_info: dict, in_path: str, cfg: PoisonConfig, report: PoisonReport,
                target_source: str | None, out_fmt: str) -> None:
    """The input's `_info.json` with num_samples / format updated and a `poison` section added."""
    count = report.poisoned + report.inserted
    poison = {"attack": cfg.attack, "source": in_path, "manifest": MANIFEST_FILE, "seed": cfg.seed,
              "count": count, "requested_count": report.requested, "rate": cfg.rate, "eligible": report.eligible,
              "poison_fraction": count / max(report.written, 1), "target": report.target,
              "target_label": DatasetInfo.from_dict(in_info["dataset"]).label_of(report.target)}
    if cfg.attack == "backdoor":
        poison.update(trigger=report.trigger, label_consistent=cfg.label_consistent)
    else:
        poison.update(targets=cfg.targets, per_target=cfg.per_target, caption_source=cfg.caption_source,
                      target_source=target_source)
    info = {**in_info, "num_samples": report.written, "format": out_fmt, "poison": poison}
    if "poison" in in_info:
        info["poison_history"] = prior_attacks(in_info)
    commit_file(fs, posixpath.join(root, INFO_FILE), json.dumps(info, indent=2, sort_keys=True).encode())
