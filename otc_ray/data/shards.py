"""Shard sets on disk or S3: listing (format detection), reading one shard's rows, the one shard writer
(`write_shard`, and `ShardWriter` rolling over it), the `_info.json` side file.

A shard set is a folder (or prefix) of `NNNNN.tar` or `NNNNN.parquet` files; tar shards may be compressed
(`.tar.gz`, `.tgz`, `.tar.bz2`, `.tar.xz`); any other compressed file beside them is named in a warning. Files whose name starts
with `_` or `.` are side files (`_info.json`, img2dataset's `_stats.json`); in a folder holding tar
shards, `.parquet` files are img2dataset's per-shard metadata and are not read as samples.
Each shard is committed atomically: written whole, then renamed (local) or put in one request (S3).
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import posixpath
import re
import uuid
import warnings
from typing import Iterable, Iterator, Literal

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from ..config import S3Config
from .parquet_format import iter_parquet_samples, write_parquet_shard
from .sample import Sample
from .storage import display, resolve
from .tar_format import iter_tar_samples, write_tar_shard

SUFFIX = {"wds": ".tar", "parquet": ".parquet"}
TAR_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")     # read through the standard library's decompressors
UNREADABLE_COMPRESSED = (".tar.zst", ".tar.zstd", ".tar.lz4", ".parquet.gz", ".parquet.zst", ".zip", ".gz", ".bz2",
                         ".xz", ".zst", ".7z")                   # named in a warning, never skipped silently
COMPRESSED_SUFFIXES = TAR_COMPRESSED + UNREADABLE_COMPRESSED
CLEAN_MARKER = "_clean_summary.json"        # written last by the cleaning job (otc_ray.pipelines.clean)
CLEAN_SHARD_RE = re.compile(r"^clean-[0-9a-f]{16}\.(tar|parquet)$")
_WRITERS = {"wds": write_tar_shard, "parquet": write_parquet_shard}
INFO_FILE = "_info.json"
Format = Literal["wds", "parquet"]


class ShardSetError(FileNotFoundError):
    """No shards where a shard set was expected, or an unfinished one (message names the path)."""


def _is_side_file(path: str) -> bool:
    return posixpath.basename(path).startswith(("_", "."))


def list_shards(path: str, fmt: str, s3: S3Config):
    """(filesystem, sorted shard paths, resolved format) for a folder, a single file or a glob."""
    fs, root = resolve(path, s3)
    if any(c in root for c in "*?["):
        files = fs.glob(root)
    elif fs.isfile(root):
        files = [root]
    elif fs.isdir(root):
        files = fs.find(root)
    else:
        raise ShardSetError(f"no shard set at {path}")
    files = sorted(f for f in files if not _is_side_file(f))
    _refuse_unfinished_clean(fs, files, path)
    by_format = {"wds": [p for p in files if p.endswith((".tar",) + TAR_COMPRESSED)],
                 "parquet": [p for p in files if p.endswith(".parquet")]}
    unread = [p for p in files if p.endswith(UNREADABLE_COMPRESSED) and not p.endswith(TAR_COMPRESSED)]
    if unread:
        warnings.warn(f"{len(unread)} compressed file(s) under {path} are not read (only .tar, "
                      f"{', '.join(TAR_COMPRESSED)} and .parquet are): {', '.join(display(fs, p) for p in unread[:5])}"
                      + (" ..." if len(unread) > 5 else ""), stacklevel=2)
    if fmt == "auto":
        fmt = "wds" if by_format["wds"] else "parquet"
    if not by_format[fmt]:
        raise ShardSetError(f"no {SUFFIX[fmt]} shards at {path}")
    return fs, by_format[fmt], fmt


def _refuse_unfinished_clean(fs, files: list[str], path: str) -> None:
    """ShardSetError for a cleaning job's output without its completion marker (running, or interrupted: its
    shards are not all there, and some may be swept)."""
    cleaned = {posixpath.dirname(f) for f in files if CLEAN_SHARD_RE.match(posixpath.basename(f))}
    for folder in sorted(cleaned):
        if not fs.exists(posixpath.join(folder, CLEAN_MARKER)):
            raise ShardSetError(f"{path} is an unfinished cleaning output (no {CLEAN_MARKER} in "
                                f"{display(fs, folder)}): wait for the job, or rerun it to resume")


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """(H,W,3) uint8 -> PNG (lossless, deterministic) or JPEG (quality 95) bytes."""
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    elif image_format == "jpg":
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    return buf.getvalue()


def commit_file(fs, path: str, data: bytes) -> None:
    """Write a whole file atomically: temp name + rename locally; one PUT on object stores."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def iter_rows(fs, path: str, fmt: str) -> Iterator[dict]:
    """Reader rows (otc_ray.data.schema reader columns) of one shard file, in this process: tar streamed,
    parquet read whole."""
    with fs.open(path, "rb") as f:
        source = display(fs, path)
        yield from (iter_tar_samples(decompressed(f, path), source) if fmt == "wds"
                    else iter_parquet_samples(f, source))


def decompressed(stream, path: str):
    """The stream of a tar shard, through gzip / bz2 / xz when its name says it is compressed."""
    if path.endswith((".tar.gz", ".tgz")):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if path.endswith(".tar.bz2"):
        return bz2.BZ2File(stream, "rb")
    if path.endswith(".tar.xz"):
        return lzma.LZMAFile(stream, "rb")
    return stream


def write_shard(fs, path: str, fmt: Format, samples: Iterable[Sample]) -> int:
    """Commit one shard file of format `fmt` ("wds" tar or "parquet") holding `samples` (otc_ray.data.sample:
    new samples as str / dict, copies as the reader's raw bytes); atomic (`commit_file`). Returns the count."""
    if fmt not in _WRITERS:
        raise ValueError(f"format must be one of {sorted(_WRITERS)}, got {fmt!r}")
    stream = io.BytesIO()
    n = _WRITERS[fmt](stream, samples)
    commit_file(fs, path, stream.getvalue())
    return n


class ShardWriter:
    """Rolling writer: `add(...)` samples, a shard is committed every `samples_per_shard`; `close()` ends.

        with ShardWriter("out/", "wds", 1000, s3_cfg) as w:
            w.add(key, image_bytes, "png", caption, meta)
    """

    def __init__(self, out: str, fmt: Format, samples_per_shard: int, s3: S3Config, start_index: int = 0):
        if fmt not in SUFFIX:
            raise ValueError(f"format must be one of {sorted(SUFFIX)}, got {fmt!r}")
        self.fs, self.root = resolve(out, s3)
        self.fmt, self.per_shard = fmt, samples_per_shard
        self.index, self.buffer, self.written, self.paths = start_index, [], 0, []

    def add(self, key: str, image: bytes, image_ext: str, caption: str | bytes | None, meta: dict | bytes) -> None:
        self.buffer.append((key, image, image_ext, caption, meta))
        if len(self.buffer) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        path = posixpath.join(self.root, f"{self.index:05d}{SUFFIX[self.fmt]}")
        write_shard(self.fs, path, self.fmt, self.buffer)
        self.paths.append(display(self.fs, path))
        self.written += len(self.buffer)
        self.index += 1
        self.buffer = []

    def write_info(self, info: dict) -> None:
        commit_file(self.fs, posixpath.join(self.root, INFO_FILE), json.dumps(info, indent=2, sort_keys=True).encode())

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def read_info(path: str, s3: S3Config) -> dict | None:
    """The `_info.json` written beside a shard set (data set, split, classes), or None."""
    fs, root = resolve(path, s3)
    if fs.isfile(root):
        root = posixpath.dirname(root)
    candidate = posixpath.join(root, INFO_FILE)
    if not fs.exists(candidate):
        return None
    with fs.open(candidate, "rb") as f:
        return json.loads(f.read())
