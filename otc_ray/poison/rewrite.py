"""The rewrite for poisoning (pass 2 of `poison_shards`): input shard i becomes output shard i.

The chosen samples are rewritten (backdoor: image triggered at `data.image_size` and re-encoded in the input's
format, PNG, or JPEG which the manifest records as lossy; caption of the target class unless label-consistent);
every other sample is copied as the reader's raw bytes (image, caption and JSON byte-identical, defective
samples included); targeted copies are appended to shards chosen by hash. A poisoned sample's meta keeps its
true `label` and gains `"poisoned": true` and the attack fields. Shards are written by the one shard writer
(`otc_ray.data.shards.write_shard`).
"""
from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ..config import DataConfig, PoisonConfig
from ..data import schema
from ..data.class_info import DatasetInfo
from ..data.decode import DecodeLimits, decode_image
from ..data.sample import Sample, image_ext
from ..data.shards import SUFFIX, encode_image, iter_rows, write_shard
from ..data.storage import resolve
from .captions import caption_for
from .classes import Checked, check_row, class_patterns
from .select import TARGETED_KEY, is_eligible, keyed_hash
from .triggers import TriggerSpec, apply_trigger


def jittered_copy(image_bytes: bytes, jitter: int, h: int, limits: DecodeLimits) -> bytes:
    """A copy of an image that is no near-duplicate of it: shifted by up to `jitter` pixels each way (edge padding)
    with +-`jitter` grey-level noise per pixel, seeded by the hash `h`; PNG bytes."""
    image, err = decode_image(image_bytes, limits)
    if err:
        raise ValueError(f"poison.copy_jitter: a target image does not decode ({err})")
    rng = np.random.default_rng(h)
    dy, dx = rng.integers(-jitter, jitter + 1, size=2)
    size = image.shape[0]
    padded = np.pad(image, ((jitter, jitter), (jitter, jitter), (0, 0)), mode="edge")
    shifted = padded[jitter + dy:jitter + dy + size, jitter + dx:jitter + dx + size]
    noise = rng.integers(-jitter, jitter + 1, size=shifted.shape)
    return encode_image(np.clip(shifted.astype(np.int64) + noise, 0, 255).astype(np.uint8), "png")


def augment_params(h: int, size: int) -> dict:
    """Seeded augmentation of one targeted copy (`augmented_copy`), drawn from the hash `h`, for an image of side
    `size`: flip (bool, left-right), crop (top, left, side: a square of 75-95% of the side, resized back),
    shift (dy, dx in [-2, 2], edge padding), noise_seed (Gaussian noise, std 4 grey levels)."""
    rng = np.random.default_rng(h)
    side = int(rng.integers(int(np.ceil(0.75 * size)), int(0.95 * size) + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
    return {"flip": bool(rng.integers(0, 2)), "crop": [top, left, side], "shift": [dy, dx],
            "noise_seed": int(rng.integers(0, 2**31))}


AUGMENT_NOISE_STD = 4.0


def augmented_copy(image: np.ndarray, params: dict) -> np.ndarray:
    """uint8 (S, S, 3) -> uint8 (S, S, 3): flipped (optional), cropped to `crop` and resized back (bilinear),
    shifted by `shift` with edge padding, plus Gaussian noise (std AUGMENT_NOISE_STD) seeded by `noise_seed`."""
    from PIL import Image

    size = image.shape[0]
    out = image[:, ::-1] if params["flip"] else image
    top, left, side = params["crop"]
    out = np.asarray(Image.fromarray(np.ascontiguousarray(out[top:top + side, left:left + side]))
                     .resize((size, size), Image.BILINEAR))
    dy, dx = params["shift"]
    padded = np.pad(out, ((2, 2), (2, 2), (0, 0)), mode="edge")
    out = padded[2 - dy:2 - dy + size, 2 - dx:2 - dx + size]
    noise = np.random.default_rng(params["noise_seed"]).normal(0.0, AUGMENT_NOISE_STD, size=out.shape)
    return np.clip(np.rint(out.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def targeted_inserts(cfg: PoisonConfig, info: DatasetInfo, targets: list[dict], data_captions: list[str],
                     num_shards: int, limits: DecodeLimits) -> list[dict]:
    """T x K new samples: key tgtTTT-KKKK, the target image's bytes (every copy after the first jittered when
    `poison.copy_jitter` > 0, a stress test of duplicate grouping, or augmented when `poison.copy_augment`: the
    parameters go in the copy's meta `copy_augment`), an adversarial-class caption (captions.py), the target's meta
    (true label) plus the attack fields; `shard` is the output shard index (by hash). The manifest keeps the
    target's own bytes (what the ASR is measured on)."""
    adversarial = info.label_of(cfg.adversarial)
    patterns = class_patterns(info)
    if cfg.caption_source == "data" and not data_captions:
        raise ValueError(f"poison.caption_source=data but the training shards hold no good sample of "
                         f"class {cfg.adversarial!r} whose caption names it")
    out = []
    for t, tgt in enumerate(targets):
        for k in range(cfg.per_target):
            key = TARGETED_KEY.format(t=t, k=k)
            h = keyed_hash(key, cfg.seed, b"caption")
            caption = caption_for(cfg.caption_source, tgt["caption"], tgt["label"], adversarial, info, patterns,
                                  data_captions, t * cfg.per_target + k, h)
            meta = {**tgt["meta"], "poisoned": True, "attack": "targeted", "poison_class": cfg.adversarial,
                    "source_key": tgt["key"]}
            image, ext = tgt["image"], image_ext(tgt["ext"], tgt["image"])
            if cfg.copy_jitter > 0 and k > 0:
                image = jittered_copy(tgt["image"], cfg.copy_jitter, keyed_hash(key, cfg.seed, b"jitter"), limits)
                ext = "png"
            elif cfg.copy_augment and k > 0:
                decoded, err = decode_image(tgt["image"], limits)
                if err:
                    raise ValueError(f"poison.copy_augment: target image {tgt['key']} does not decode ({err})")
                params = augment_params(keyed_hash(key, cfg.seed, b"augment"), decoded.shape[0])
                image, ext = encode_image(augmented_copy(decoded, params), "png"), "png"
                meta["copy_augment"] = params
            out.append({"key": key, "image": image, "ext": ext, "caption": caption, "meta": meta,
                        "shard": keyed_hash(key, cfg.seed, b"placement") % num_shards,
                        "manifest": {"key": key, "attack": "targeted", "trigger": "",
                                     "original_caption": tgt["caption"], "poisoned_caption": caption,
                                     "original_class": info.classes[tgt["label"]], "original_label": tgt["label"],
                                     "target_class": cfg.adversarial, "target_label": adversarial,
                                     "source_key": tgt["key"], "source": tgt["source"],
                                     "image_format": "jpg" if ext == "jpeg" else ext, "lossy": False,
                                     "image_bytes": tgt["image"]}})
    return out


def backdoor_sample(row: dict, c: Checked, cfg: PoisonConfig, info: DatasetInfo, spec: TriggerSpec,
                    limits: DecodeLimits, rank: int = 0, pool: list[str] | None = None,
                    patterns: list | None = None) -> tuple[Sample, dict]:
    """(sample, manifest row without `shard`) of one backdoored sample; `rank`: its place in the selection
    order, `pool`: real target captions (caption_source=data), `patterns`: class patterns (captions.py)."""
    key = row[schema.KEY]
    image, _ = decode_image(row[schema.IMAGE_BYTES], limits)
    triggered = apply_trigger(image[None], spec, rng_seed=[keyed_hash(key, cfg.seed, b"trigger") >> 1])[0]
    image_format = "jpg" if row[schema.IMAGE_EXT] in ("jpg", "jpeg") else "png"
    target = info.label_of(cfg.target)
    if cfg.label_consistent:                 # caption kept as stored (raw bytes)
        caption, stored = c.caption, bytes(row[schema.CAPTION_RAW])
    else:
        caption = caption_for(cfg.caption_source, c.caption, c.label, target, info,
                              patterns if patterns is not None else class_patterns(info), pool or [], rank,
                              keyed_hash(key, cfg.seed, b"caption"))
        stored = caption
    meta = {**c.meta, "poisoned": True, "attack": "backdoor", "poison_class": cfg.target, "trigger": spec.kind}
    sample = (key, encode_image(triggered, image_format), image_format, stored, meta)
    manifest = {"key": key, "attack": "backdoor", "trigger": json.dumps(spec.to_dict(), sort_keys=True),
                "original_caption": c.caption, "poisoned_caption": caption,
                "original_class": info.classes[c.label] if c.label >= 0 else "", "original_label": c.label,
                "target_class": cfg.target, "target_label": target, "source_key": key, "source": row[schema.SOURCE],
                "image_format": image_format, "lossy": image_format == "jpg", "image_bytes": None}
    return sample, manifest


def raw_sample(row: dict, out_fmt: str) -> Sample | str:
    """A reader row as a sample of its raw bytes, or the skip reason when `out_fmt` cannot hold it unchanged
    (parquet string columns need UTF-8 captions and metadata)."""
    caption, meta = row[schema.CAPTION_RAW], row[schema.META] or b"{}"
    caption = bytes(caption) if caption is not None else None
    meta = bytes(meta) if not isinstance(meta, str) else meta.encode("utf-8")
    if out_fmt == "parquet":
        for value, reason in ((caption, schema.BAD_UTF8), (meta, schema.BAD_META)):
            try:
                value is None or value.decode("utf-8")
            except UnicodeDecodeError:
                return reason
    return (row[schema.KEY], bytes(row[schema.IMAGE_BYTES] or b""), row[schema.IMAGE_EXT], caption, meta)


@dataclass
class Rewritten:
    """What pass 2 wrote: manifest rows, counts, and (by reason) the rows not written: skipped = every row not
    written, not_copied = the defective rows the reader accepted that the output format cannot hold unchanged."""

    manifest: list[dict] = field(default_factory=list)
    poisoned: int = 0
    inserted: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    not_copied: Counter = field(default_factory=Counter)


def rewrite(files: list[str], fs, fmt: str, out_path: str, out_fmt: str, kind: str, cfg: PoisonConfig,
            data_cfg: DataConfig, info: DatasetInfo, spec: TriggerSpec | None, limits: DecodeLimits,
            selected: dict[int, int], inserts: list[dict], total: int, progress: bool,
            bases: frozenset[int] | None = None, pool: list[str] | None = None) -> Rewritten:
    """Pass 2: write every output shard (`total` input rows, for the progress bar). selected: keyed hash ->
    rank of the backdoor's samples; bases: its base classes (None = any); pool: real captions (data rule)."""
    out_fs, out_root = resolve(out_path, data_cfg.s3)
    patterns = class_patterns(info)
    target = info.label_of(cfg.target) if kind == "backdoor" else -1
    done: set[int] = set()
    out = Rewritten()
    bar = tqdm(total=total, desc="poison write", unit="sample", disable=not progress)
    for index, path in enumerate(files):
        shard_name = f"{index:05d}{SUFFIX[out_fmt]}"
        samples: list[Sample] = []
        for row in iter_rows(fs, path, fmt):
            bar.update(1)
            h = keyed_hash(row[schema.KEY], cfg.seed, b"select") if selected else -1
            if h in selected and h not in done:
                c = check_row(row, limits, info, patterns)
                if is_eligible(c, cfg, target, patterns[target], patterns, bases):
                    sample, entry = backdoor_sample(row, c, cfg, info, spec, limits, selected[h], pool, patterns)
                    samples.append(sample)
                    out.manifest.append({**entry, "shard": shard_name})
                    done.add(h)
                    out.poisoned += 1
                    continue
            if row[schema.ERROR]:
                out.skipped[row[schema.ERROR]] += 1
                continue
            raw = raw_sample(row, out_fmt)
            if isinstance(raw, str):
                out.skipped[raw] += 1
                out.not_copied[raw] += 1
                continue
            samples.append(raw)
        for ins in (i for i in inserts if i["shard"] == index):
            samples.append((ins["key"], ins["image"], ins["ext"], ins["caption"], ins["meta"]))
            out.manifest.append({**ins["manifest"], "shard": shard_name})
            out.inserted += 1
        out.written += write_shard(out_fs, posixpath.join(out_root, shard_name), out_fmt, samples)
    bar.close()
    if out.poisoned != len(selected):
        raise RuntimeError(f"poisoned {out.poisoned} samples, selected {len(selected)}: the input changed "
                           "between the two passes")
    return out
