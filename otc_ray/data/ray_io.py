"""Shard sets as Ray Datasets: a file-based datasource for tar and parquet shards, then decoding.

    ds = read_shards("s3://bkt/train", data_cfg)            # reader rows, bad ones marked in `error`
    ds = decode(ds, data_cfg)                               # + image (S,S,3) uint8, caption, label
    good = ds.map_batches(good_rows)                        # what training consumes
    counts = count_outcomes(ds)                             # {"ok": n, "corrupt_image": m, ...}

Every sample of every shard is a row, so counts of good and bad rows add up to the input. A key met in more than
one file is read once: before the read, a key pass (one task per file, keys only: tar headers seeked over, the
parquet `key` column) finds every key's first file in sorted path order, and the read marks its copies in later
files `duplicate_key` (first wins, whatever order the read tasks run in; copies inside one file are the readers'
own `duplicate_key`). Each row carries (SOURCE, ROW), its file and index there, which names it even when its key
repeats. Reads run
as Ray tasks with `data.read_num_cpus` logical CPUs each, which leaves room for actor pools and
train workers on small machines (see README: Ray on 2 cores).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data.datasource import FileBasedDatasource

from ..config import DataConfig
from ..credentials import without_keys
from . import schema
from .decode import DecodeLimits, decode_batch
from .parquet_format import iter_parquet_samples, parquet_keys
from .shards import decompressed, list_shards
from .tar_format import iter_tar_samples

ROWS_PER_BLOCK = 256
_READER_SCHEMA = pa.schema([(schema.KEY, pa.string()), (schema.IMAGE_BYTES, pa.binary()), (schema.IMAGE_EXT, pa.string()),
                            (schema.CAPTION_RAW, pa.binary()), (schema.META, pa.binary()), (schema.SOURCE, pa.string()),
                            (schema.ERROR, pa.string()), (schema.ROW, pa.int64())])


def key_digest(key: str) -> bytes:
    """16 bytes naming a key in the duplicate search (collisions: about 1 in 2**64 for 10**9 keys)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _to_block(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=_READER_SCHEMA)


class ShardDatasource(FileBasedDatasource):
    """Reads webdataset tar or parquet shards into reader rows (see otc_ray.data.schema).

    Files are opened with the fsspec filesystem itself (its retry settings, `data.s3.retries`, apply in the read
    task), not through pyarrow's wrapper, which checks `isfile` first and turns any error of that check (an
    unreachable endpoint, a 503) into a misleading FileNotFoundError."""

    def __init__(self, paths: list[str], fmt: str, max_member_bytes: int, display_prefix: str, fs,
                 copies: dict[str, frozenset] | None = None, **kwargs):
        super().__init__(paths, filesystem=PyFileSystem(FSSpecHandler(fs)), **kwargs)
        self.fmt, self.max_member_bytes, self.display_prefix, self.fs = fmt, max_member_bytes, display_prefix, fs
        self.copies = copies or {}          # path -> digests of keys whose first file is an earlier one

    def _open_input_source(self, filesystem, path: str, **open_args):
        return open_or_unreadable(self.fs, path)

    def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
        yield from read_file_rows(stream, self.display_prefix + path, self.fmt, self.max_member_bytes, path,
                                  self.copies.get(path, frozenset()))


class _Unreadable:
    """Stands in for a file that could not be opened (a context manager, as Ray's read task wants)."""

    def __init__(self, error: BaseException):
        self.error = error

    def __enter__(self) -> "_Unreadable":
        return self

    def __exit__(self, *exc) -> None:
        return None


def open_or_unreadable(fs, path: str):
    """The open file, or an `_Unreadable` holding why it could not be opened (counted by `read_file_rows`)."""
    try:
        return fs.open(path, "rb")
    except Exception as e:                  # noqa: BLE001 - a file-level skip, never the end of the job
        return _Unreadable(e)


def unreadable_row(source: str, error: BaseException) -> dict:
    """The marker row `{source}#unreadable` of a file that could not be opened or read."""
    detail = f"{type(error).__name__}: {error}"[:200]
    return {schema.KEY: f"{source}#unreadable", schema.IMAGE_BYTES: b"", schema.IMAGE_EXT: "", schema.CAPTION_RAW: None,
            schema.META: json.dumps({"detail": detail}).encode(), schema.SOURCE: source, schema.ERROR: schema.UNREADABLE_FILE}


def read_file_rows(stream, source: str, fmt: str, max_member_bytes: int, path: str,
                   copies: frozenset = frozenset()) -> Iterator[pa.Table]:
    """Blocks of reader rows of one file. No file can stop the read: one that cannot be opened, or that raises
    while being read (a permission error, a decompression error, a bug), ends with a counted `unreadable_file`
    marker row naming it, after the rows read before the fault. A row whose key digest is in `copies` (its key's
    first file is an earlier one) is `duplicate_key` unless it already has a reason."""
    block: list[dict] = []
    index = 0
    try:
        if isinstance(stream, _Unreadable):
            raise stream.error
        rows = (iter_tar_samples(decompressed(stream, path), source, max_member_bytes) if fmt == "wds"
                else iter_parquet_samples(stream, source))
        for row in rows:
            if copies and not row[schema.ERROR] and key_digest(row[schema.KEY]) in copies:
                row[schema.ERROR] = schema.DUPLICATE_KEY
            row[schema.ROW] = index
            index += 1
            block.append(row)
            if len(block) >= ROWS_PER_BLOCK:
                yield _to_block(block)
                block = []
    except Exception as e:                  # noqa: BLE001 - see docstring
        block.append({**unreadable_row(source, e), schema.ROW: index})
    if block:
        yield _to_block(block)


def file_keys(fs, path: str, fmt: str) -> list[bytes]:
    """Digests of the keys of one file's rows, in row order (the keys its read gives them; no image is read)."""
    try:
        with fs.open(path, "rb") as f:
            if fmt == "wds":
                return [key_digest(r[schema.KEY]) for r in iter_tar_samples(decompressed(f, path), path, -1)]
            return [key_digest(k) for k in parquet_keys(f, path)]
    except Exception:                       # noqa: BLE001 - the read counts this file as unreadable
        return []


def find_copies(fs, files: list[str], fmt: str, num_cpus: float) -> dict[str, frozenset]:
    """{path: digests of its keys whose first file (sorted path order) is an earlier one}; one Ray task per file.
    Marker keys (`{file}#corrupt`, ...) name their file, so they never repeat."""
    if len(files) < 2:
        return {}
    task = ray.remote(num_cpus=num_cpus, max_retries=3)(file_keys)
    return later_copies(files, ray.get([task.remote(fs, f, fmt) for f in files]))


def later_copies(files: list[str], per_file: list[list[bytes]]) -> dict[str, frozenset]:
    """{path: digests of its keys whose first file is an earlier one of `files`} from each file's key digests."""
    first: dict[bytes, int] = {}
    copies: dict[str, set] = {}
    for i, (path, digests) in enumerate(zip(files, per_file)):
        for d in digests:
            owner = first.setdefault(d, i)
            if owner != i:
                copies.setdefault(path, set()).add(d)
    return {p: frozenset(d) for p, d in copies.items()}


def _listed(path: str, cfg: DataConfig) -> tuple[object, list[str], str, str, list[dict]]:
    """(filesystem, readable shard files, format, display prefix, marker rows of files listed but gone)."""
    fs, files, fmt = list_shards(path, cfg.format, without_keys(cfg.s3))
    prefix = "s3://" if path.startswith("s3://") else ""
    gone = [f for f in files if not fs.exists(f)]       # listed, then gone, or a broken link: Ray's listing would raise
    markers = [{**unreadable_row(prefix + f, FileNotFoundError(f"{prefix + f} is listed but cannot be opened")),
                schema.ROW: 0} for f in gone]
    return fs, [f for f in files if f not in gone], fmt, prefix, markers


def shard_bytes(path: str, cfg: DataConfig) -> int:
    """The total size in bytes of the shard files of the set at `path` (one listing, nothing read)."""
    fs, files, _, _, _ = _listed(path, cfg)
    return sum(int(fs.size(f) or 0) for f in files)


def read_in_driver(path: str, cfg: DataConfig) -> bool:
    """Whether the set at `path` is small enough (`data.driver_read_mb`) to read and decode in this process."""
    return cfg.driver_read_mb > 0 and shard_bytes(path, cfg) <= cfg.driver_read_mb << 20


def decoded_batches(path: str, cfg: DataConfig, max_member_mb: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """The decoded batches of `load_samples(path)` (the same rows, reasons and duplicate rule), read and decoded in
    this process, one shard file after another: for small sets, whose Ray read would spend seconds starting tasks
    and worker processes to decode a few megabytes."""
    fs, files, fmt, prefix, markers = _listed(path, cfg)
    limits = DecodeLimits.from_config(cfg)
    copies = later_copies(files, [file_keys(fs, f, fmt) for f in files]) if len(files) > 1 else {}
    for f in files:
        with open_or_unreadable(fs, f) as stream:
            for table in read_file_rows(stream, prefix + f, fmt, max_member_mb << 20, f, copies.get(f, frozenset())):
                yield decode_batch(_numpy(table), limits)
    if markers:
        yield decode_batch(_numpy(_to_block(markers)), limits)


def _numpy(table: pa.Table) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def in_memory_dataset(batches: list[dict[str, np.ndarray]]) -> ray.data.Dataset:
    """A materialized Dataset of numpy batches (the blocks `map_batches` would have made of them)."""
    from ray.data.block import BlockAccessor

    return ray.data.from_blocks([BlockAccessor.batch_to_block(b) for b in batches if len(b[schema.KEY])])


def read_shards(path: str, cfg: DataConfig, max_member_mb: int = 64) -> ray.data.Dataset:
    """Reader rows of every shard under `path` (local or s3://); one read task per shard file, after the key pass
    (module docstring). The read tasks get an S3 filesystem without access keys (`credentials.without_keys`): they,
    and the driver's listing, take them from the environment (`credentials.move_secrets_to_env`) or the node's
    credential chain."""
    fs, files, fmt, prefix, markers = _listed(path, cfg)
    if not files:
        return ray.data.from_arrow(_to_block(markers))
    source = ShardDatasource(files, fmt, max_member_mb << 20, prefix, fs,
                             copies=find_copies(fs, files, fmt, cfg.read_num_cpus))
    ds = ray.data.read_datasource(source, override_num_blocks=len(files), num_cpus=cfg.read_num_cpus)
    return ds.union(ray.data.from_arrow(_to_block(markers))) if markers else ds


def decode(ds: ray.data.Dataset, cfg: DataConfig) -> ray.data.Dataset:
    """Decoded rows (same count): image (S,S,3) uint8, caption, label; bad rows carry their reason."""
    return ds.map_batches(decode_batch, fn_kwargs={"limits": DecodeLimits.from_config(cfg)},
                          batch_format="numpy", batch_size=ROWS_PER_BLOCK, num_cpus=cfg.read_num_cpus)


def load_samples(path: str, cfg: DataConfig) -> ray.data.Dataset:
    """`decode(read_shards(path))`: the decoded dataset of a shard set, good and bad rows."""
    return decode(read_shards(path, cfg), cfg)


def _outcome_counts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    counts = Counter(str(e) or "ok" for e in batch[schema.ERROR])
    return {"outcome": np.array(list(counts), dtype=object), "n": np.array(list(counts.values()), np.int64)}


def count_outcomes(ds: ray.data.Dataset) -> dict[str, int]:
    """{"ok": good rows, reason: rows skipped for it} over the whole dataset (one streaming pass)."""
    totals: Counter = Counter()
    partial = ds.select_columns([schema.ERROR]).map_batches(_outcome_counts, batch_format="numpy")
    for batch in partial.iter_batches(batch_format="numpy", batch_size=None):
        for outcome, n in zip(batch["outcome"], batch["n"]):
            totals[str(outcome)] += int(n)
    return dict(totals)
