"""Parquet shards: one row per sample with image bytes, caption and metadata columns.

Written as `key`, `png`|`jpg`|`webp` (binary), `caption`, `json` (string). Read leniently, as img2dataset's
parquet output is laid out: the image is the first of the `jpg`/`png`/`webp`/`image` binary columns,
the caption is `caption` or `txt`, metadata is `json` or else every other scalar column (url, status,
width, ...). A row whose image is null (img2dataset's failed downloads) is `missing_image`; a row whose key is
not a safe key (`otc_ray.data.keys`: `..`, a leading `/`, a dot, a control character) is `unsafe_path`; a file
that pyarrow cannot open is one `corrupt_shard` marker row `{shard}#corrupt`. A file without a `key` column
gets keys `<shard stem>-<row index>`. The writer refuses an unsafe key (`ValueError`).
A column of the wrong type is a counted skip per row, never an error of the read task: an image that is not
binary (a list, an int, a string), a caption that is not a string or binary, a `json` that is not a string, or a
key that is not a string or an integer -> `wrong_type` (a key that is no string gets `<shard stem>-<row index>`).
"""
from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import schema
from .keys import check_key, is_safe_key
from .sample import Sample, caption_bytes, image_ext, meta_bytes

IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image", "gif", "tif", "tiff", "bmp")
CAPTION_COLUMNS = ("caption", "txt")


def _scalar_meta(row: dict, skip: set[str]) -> bytes:
    meta = {k: v for k, v in row.items() if k not in skip and isinstance(v, (str, int, float, bool, type(None)))}
    return json.dumps(meta, sort_keys=True).encode("utf-8")


def row_key(raw_key, default_key: str) -> tuple[str, bool]:
    """(key, wrong type) of a `key` cell: a string or an integer as it is, else `default_key`."""
    wrong = not (raw_key is None or isinstance(raw_key, str)
                 or (isinstance(raw_key, int) and not isinstance(raw_key, bool)))
    return (default_key if wrong or raw_key is None or raw_key == "" else str(raw_key)), wrong


def parquet_keys(stream: BinaryIO, source: str) -> Iterator[str]:
    """The keys `iter_parquet_samples` gives the rows of one file, reading only its `key` column."""
    try:
        pf = pq.ParquetFile(pa.BufferReader(stream.read()))
        stem = posixpath.basename(source).partition(".")[0]
        n = pf.metadata.num_rows
        if "key" not in pf.schema_arrow.names:
            yield from (f"{stem}-{i:09d}" for i in range(n))
            return
        index = 0
        for batch in pf.iter_batches(batch_size=8192, columns=["key"]):
            for raw in batch.column(0).to_pylist():
                yield row_key(raw, f"{stem}-{index:09d}")[0]
                index += 1
    except Exception:                       # noqa: BLE001 - the reader gives such a file one marker row
        yield f"{source}#corrupt"


def _parquet_row(row: dict, names: list[str], image_col, caption_col, used: set, default_key: str, source: str,
                 seen: set[str]) -> dict:
    """One reader row from one parquet row; wrong column types are `wrong_type` (module docstring)."""
    key, wrong = row_key(row.get("key"), default_key)
    image = row.get(image_col) if image_col else None
    caption = row.get(caption_col) if caption_col else None
    meta = row.get("json") if "json" in names else _scalar_meta(row, used)
    wrong = wrong or not isinstance(image, (bytes, type(None))) or not isinstance(caption, (str, bytes, type(None))) \
        or not isinstance(meta, (str, bytes, type(None)))
    if wrong:
        error, image, caption, meta = schema.WRONG_TYPE, None, None, None
    else:
        error = (schema.UNSAFE_PATH if not is_safe_key(key) else schema.DUPLICATE_KEY if key in seen
                 else "" if image else schema.MISSING_IMAGE)
    seen.add(key)
    if isinstance(caption, str):
        caption = caption.encode("utf-8", "surrogatepass")
    return {schema.KEY: key, schema.IMAGE_BYTES: image or b"", schema.IMAGE_EXT: image_col if image else "", schema.CAPTION_RAW: caption,
            schema.META: meta.encode("utf-8", "surrogatepass") if isinstance(meta, str) else (meta or b"{}"),
            schema.SOURCE: source, schema.ERROR: error}


def iter_parquet_samples(stream: BinaryIO, source: str, batch_rows: int = 1024) -> Iterator[dict]:
    """Reader rows from one parquet file (read into memory: parquet needs random access)."""
    seen: set[str] = set()
    try:
        pf = pq.ParquetFile(pa.BufferReader(stream.read()))
        names = pf.schema_arrow.names
        image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
        caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
        used = {image_col, caption_col, "key", "json"}
        stem = posixpath.basename(source).partition(".")[0]
        index = 0
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield _parquet_row(row, names, image_col, caption_col, used, f"{stem}-{index:09d}", source, seen)
                index += 1
    except Exception as e:                  # noqa: BLE001 - a file pyarrow cannot read is one counted marker row
        yield {schema.KEY: f"{source}#corrupt", schema.IMAGE_BYTES: b"", schema.IMAGE_EXT: "", schema.CAPTION_RAW: None,
               schema.META: json.dumps({"detail": str(e)[:200]}).encode(), schema.SOURCE: source, schema.ERROR: schema.CORRUPT_SHARD}


def write_parquet_shard(stream: BinaryIO, samples: Iterable[Sample]) -> int:
    """Write samples (see otc_ray.data.sample) as one parquet file with columns key, <image column>, caption,
    json; returns the count. Image bytes are stored as they are, under a column named after the most common
    image format of the shard (decoders detect each image's format from its bytes, so one shard may mix them);
    an empty image is null (read back as missing_image), a None caption null. A caption or metadata that is not
    UTF-8 raises UnicodeDecodeError (parquet string columns cannot hold it); an unsafe key (`otc_ray.data.keys`)
    raises ValueError naming it."""
    keys, images, captions, metas, exts = [], [], [], [], Counter()
    for key, image, ext, caption, meta in samples:
        text = caption_bytes(caption)
        keys.append(check_key(key))
        images.append(bytes(image) or None)
        captions.append(None if text is None else text.decode("utf-8"))
        metas.append(meta_bytes(meta).decode("utf-8"))
        if image:
            fmt = image_ext(ext, image)
            exts["jpg" if fmt == "jpeg" else fmt] += 1
    column = exts.most_common(1)[0][0] if exts else "png"
    table = pa.table({"key": pa.array(keys, pa.string()), column: pa.array(images, pa.binary()),
                      "caption": pa.array(captions, pa.string()), "json": pa.array(metas, pa.string())})
    pq.write_table(table, stream, compression="zstd")
    return len(keys)
