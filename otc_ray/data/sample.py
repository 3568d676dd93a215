"""One sample as the shard writers take it (`tar_format.write_tar_shard`, `parquet_format.write_parquet_shard`,
`shards.ShardWriter`): a tuple (key, image, image_ext, caption, meta).

    key        str                    sample key
    image      bytes                  encoded image, stored as given (never re-encoded); b"" = no image
    image_ext  str                    its format ("png", "jpg", ...); a name that is no image format (a parquet
                                      column such as "image") is replaced by the format sniffed from the bytes
    caption    str | bytes | None     text (written as UTF-8), or the caption bytes exactly as read (a copy stays
                                      byte-identical, defects included); None = no caption
    meta       dict | bytes | str     a mapping (written as sorted-key JSON), or the JSON exactly as read

Writers of new samples pass str and dict; jobs that copy samples (poisoning, cleaning) pass the reader's bytes.
"""
from __future__ import annotations

import json
from typing import Any, Union

from . import schema

Sample = tuple[str, bytes, str, Union[str, bytes, None], Union[dict, bytes, str]]


def image_ext(ext: str, data: bytes) -> str:
    """`ext` when it names an image format, else the format of the bytes (PNG, JPEG or WebP signature; png)."""
    if ext in schema.IMAGE_EXTENSIONS:
        return ext
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"


def caption_bytes(caption: Union[str, bytes, None]) -> bytes | None:
    """The caption as stored: str -> UTF-8, bytes as they are, None stays None."""
    return caption.encode("utf-8") if isinstance(caption, str) else (None if caption is None else bytes(caption))


def meta_bytes(meta: Any) -> bytes:
    """The metadata as stored: a mapping -> sorted-key JSON (UTF-8), str -> UTF-8, bytes as they are."""
    if isinstance(meta, dict):
        return json.dumps(meta, sort_keys=True).encode("utf-8")
    return meta.encode("utf-8") if isinstance(meta, str) else bytes(meta)
