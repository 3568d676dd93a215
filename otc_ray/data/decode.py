"""Decode and validate reader rows: UTF-8 captions, length limits, pixel limits, image decoding.

`decode_batch` maps a reader batch to a decoded batch of the same length: good rows get their image
(S,S,3) uint8, caption and label; a bad row keeps a zero image and gets its skip reason in `error`.
Nothing is dropped here, so every sample stays counted; `good_rows` filters afterwards.

No sample can stop a job: JSON nested too deep (RecursionError) or not an object, a label that is not an int64
(10**23, a string) -> `bad_meta`; any other exception while decoding one sample -> `decode_error` (the row keeps
its key and source file, so the skip names both). Images of every mode Pillow opens become RGB: 16-bit and 32-bit
grey (I;16*, I) are scaled to 8 bits (65535 -> 255), float (F) in [0, 1] is scaled and otherwise clipped to
[0, 255], alpha (RGBA, LA, PA, palette transparency) is composited on white, CMYK / YCbCr / LAB / 1-bit / palette
are converted; an animated GIF / multi-page TIFF gives its first frame.
"""
from __future__ import annotations

import io
import json
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..config import DataConfig
from . import schema


@dataclass(frozen=True)
class DecodeLimits:
    """What a sample must satisfy (from DataConfig)."""

    image_size: int
    max_pixels: int
    max_caption_chars: int
    truncate_captions: bool

    @staticmethod
    def from_config(cfg: DataConfig) -> "DecodeLimits":
        return DecodeLimits(cfg.image_size, cfg.max_pixels, cfg.max_caption_chars, cfg.caption_overflow == "truncate")


def decode_caption(raw, limits: DecodeLimits) -> tuple[str, str]:
    """(caption, error) from caption bytes: missing, bad UTF-8, empty after stripping, or too long."""
    if raw is None:
        return "", schema.MISSING_CAPTION
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return "", schema.BAD_UTF8
    text = " ".join(text.split())
    if not text:
        return "", schema.EMPTY_CAPTION
    if len(text) > limits.max_caption_chars:
        if not limits.truncate_captions:
            return "", schema.CAPTION_TOO_LONG
        text = text[:limits.max_caption_chars]
    return text, ""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see module docstring): wide grey scaled, not clipped; alpha on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        wide = img.mode != "I" or a.max(initial=0) > 255 or a.min(initial=0) < 0
        a = np.clip(a / 257.0 if wide else a, 0, 255)
        return Image.fromarray(np.rint(a).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, limits: DecodeLimits) -> tuple[np.ndarray | None, str]:
    """((S,S,3) uint8 or None, error). The pixel limit is checked from the header, before decoding."""
    if not data:
        return None, schema.MISSING_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)         # palette transparency notes, TIFF tags
            img = Image.open(io.BytesIO(bytes(data)))
            width, height = img.size
            if width * height > limits.max_pixels:
                return None, schema.IMAGE_TOO_LARGE
            img.load()
            img = to_rgb(img)
    except Image.DecompressionBombError:
        return None, schema.IMAGE_TOO_LARGE
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError, EOFError, TypeError, KeyError,
            IndexError, MemoryError, struct.error, ZeroDivisionError):
        return None, schema.CORRUPT_IMAGE
    side = limits.image_size
    if img.size != (side, side):
        img = ImageOps.fit(img, (side, side), Image.BICUBIC)   # shorter side to S, centre crop
    return np.asarray(img, dtype=np.uint8), ""


def decode_meta(raw) -> tuple[dict, str]:
    """(metadata dict, error) from JSON bytes; a JSON value that is not an object is bad metadata."""
    try:
        meta = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError):
        return {}, schema.BAD_META
    if not isinstance(meta, dict):
        return {}, schema.BAD_META
    label = meta.get("label", -1)
    if isinstance(label, int) and not isinstance(label, bool) and not INT64_MIN <= label <= INT64_MAX:
        return {}, schema.BAD_META
    return meta, ""


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def decode_row(raw: dict, limits: DecodeLimits) -> tuple[np.ndarray | None, str, int, str]:
    """(image, caption, label, error) of one reader row whose reader `error` is ""."""
    meta, err = decode_meta(raw[schema.META])
    caption, err = (decode_caption(raw[schema.CAPTION_RAW], limits) if not err else ("", err))
    image, err = (decode_image(raw[schema.IMAGE_BYTES], limits) if not err else (None, err))
    if err:
        return None, "", -1, err
    label = meta.get("label", -1)
    return image, caption, (label if isinstance(label, int) and not isinstance(label, bool) else -1), ""


def screen_image(data: bytes, limits: DecodeLimits) -> str:
    """The reason an image is skipped that its header shows (missing, too large, not an image), or "": the
    checks of `decode_image` short of decoding the pixels (a corrupt body is found when the stream decodes it)."""
    if not data:
        return schema.MISSING_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError:
        return schema.IMAGE_TOO_LARGE
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError, EOFError, TypeError, KeyError,
            IndexError, MemoryError, struct.error, ZeroDivisionError):
        return schema.CORRUPT_IMAGE
    return schema.IMAGE_TOO_LARGE if width * height > limits.max_pixels else ""


def screen_row(row: dict, limits: DecodeLimits) -> str:
    """A reader row's skip reason from its metadata, caption and image header, or "" (see `screen_image`); the
    same reasons, in the same order, as `decode_batch` gives."""
    if row.get(schema.ERROR):
        return str(row[schema.ERROR])
    err = decode_meta(row.get(schema.META))[1]
    err = err or decode_caption(row.get(schema.CAPTION_RAW), limits)[1]
    return err or screen_image(row.get(schema.IMAGE_BYTES), limits)


def decode_batch(batch: dict[str, np.ndarray], limits: DecodeLimits) -> dict[str, np.ndarray]:
    """Reader batch (n rows) -> decoded batch (n rows); see module docstring."""
    n = len(batch[schema.KEY])
    side = limits.image_size
    images = np.zeros((n, side, side, 3), np.uint8)
    captions = np.empty(n, dtype=object)
    labels = np.full(n, -1, np.int64)
    errors = np.array([str(e) for e in batch[schema.ERROR]], dtype=object)
    for i in range(n):
        captions[i] = ""
        if errors[i]:
            continue
        try:
            image, caption, label, err = decode_row({c: batch[c][i] for c in (schema.META, schema.CAPTION_RAW, schema.IMAGE_BYTES)},
                                                    limits)
            if not err:
                images[i], captions[i], labels[i] = image, caption, label
        except Exception:                   # noqa: BLE001 - one sample never stops a job: a counted skip
            err = schema.DECODE_ERROR
        if err:
            errors[i], captions[i] = err, ""
    return {schema.KEY: np.asarray(batch[schema.KEY], dtype=object), schema.IMAGE: images, schema.CAPTION: captions,
            schema.LABEL: labels, schema.IMAGE_BYTES: np.asarray(batch[schema.IMAGE_BYTES], dtype=object),
            schema.IMAGE_EXT: np.asarray(batch[schema.IMAGE_EXT], dtype=object),
            schema.META: np.asarray([m if isinstance(m, (bytes, str)) else b"{}" for m in batch[schema.META]], dtype=object),
            schema.SOURCE: np.asarray(batch[schema.SOURCE], dtype=object), schema.ERROR: errors,
            **({schema.ROW: batch[schema.ROW]} if schema.ROW in batch else {})}


def good_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the rows whose `error` is empty."""
    keep = np.asarray([not e for e in batch[schema.ERROR]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}
