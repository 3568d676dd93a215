"""Shard sets as Ray Datasets: a file-based datasource for tar and parquet shards, then decoding.

    ds = read_shards("s3://bkt/train", data_cfg)            # reader rows, bad ones marked in `error`
    ds = decode(ds, data_cfg)                               # + image (S,S,3) uint8, caption, label
    good = ds.map_batches(good_rows)                        # what training consumes
    counts = count_outcomes(ds)                             # {"ok": n, "corrupt_image": m, ...}

Every sample of every shard is a row, so counts of good and bad rows add up to the input. Reads run
as Ray tasks with `data.read_num_cpus` logical CPUs each, which leaves room for actor pools and
train workers on small machines (see README: Ray on 2 cores).
"""
from __future__ import annotations

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
from .parquet_format import iter_parquet_samples
from .shards import list_shards
from .tar_format import iter_tar_samples

ROWS_PER_BLOCK = 256
_READER_SCHEMA = pa.schema([(schema.KEY, pa.string()), (schema.IMAGE_BYTES, pa.binary()), (schema.IMAGE_EXT, pa.string()),
                            (schema.CAPTION_RAW, pa.binary()), (schema.META, pa.binary()), (schema.SOURCE, pa.string()),
                            (schema.ERROR, pa.string())])


def _to_block(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=_READER_SCHEMA)


class ShardDatasource(FileBasedDatasource):
    """Reads webdataset tar or parquet shards into reader rows (see otc_ray.data.schema).

    Files are opened with the fsspec filesystem itself (its retry settings, `data.s3.retries`, apply in the read
    task), not through pyarrow's wrapper, which checks `isfile` first and turns any error of that check (an
    unreachable endpoint, a 503) into a misleading FileNotFoundError."""

    def __init__(self, paths: list[str], fmt: str, max_member_bytes: int, display_prefix: str, fs, **kwargs):
        super().__init__(paths, filesystem=PyFileSystem(FSSpecHandler(fs)), **kwargs)
        self.fmt, self.max_member_bytes, self.display_prefix, self.fs = fmt, max_member_bytes, display_prefix, fs

    def _open_input_source(self, filesystem, path: str, **open_args):
        return self.fs.open(path, "rb")

    def _read_stream(self, stream, path: str) -> Iterator[pa.Table]:
        source = self.display_prefix + path
        rows = (iter_tar_samples(stream, source, self.max_member_bytes) if self.fmt == "wds"
                else iter_parquet_samples(stream, source))
        block: list[dict] = []
        for row in rows:
            block.append(row)
            if len(block) >= ROWS_PER_BLOCK:
                yield _to_block(block)
                block = []
        if block:
            yield _to_block(block)


def read_shards(path: str, cfg: DataConfig, max_member_mb: int = 64) -> ray.data.Dataset:
    """Reader rows of every shard under `path` (local or s3://); one read task per shard file. The read tasks get
    an S3 filesystem without access keys (`credentials.without_keys`): they, and the driver's listing, take them
    from the environment (`credentials.move_secrets_to_env`) or the node's credential chain."""
    fs, files, fmt = list_shards(path, cfg.format, without_keys(cfg.s3))
    prefix = "s3://" if path.startswith("s3://") else ""
    source = ShardDatasource(files, fmt, max_member_mb << 20, prefix, fs)
    return ray.data.read_datasource(source, override_num_blocks=len(files), num_cpus=cfg.read_num_cpus)


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
