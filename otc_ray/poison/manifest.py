"""The ground-truth poison manifest: one parquet row per poisoned or inserted sample.

    write_manifest(fs, "out/_poison_manifest.parquet", rows)        # rows: list of dicts, COLUMNS below
    table = read_manifest("out/", s3_cfg)                           # folder or file, local or s3://
    manifest_summary(table)   # {"rows": n, "by_attack": {...}, "by_pair": {"backdoor: bag -> sneaker": 5, ...}}

Columns:
    key               str     key of the poisoned sample in the output shards
    attack            str     "backdoor" | "targeted"
    trigger           str     trigger spec as JSON (TriggerSpec.to_dict); "" for targeted
    original_caption  str     caption before poisoning (targeted: the test image's own caption)
    poisoned_caption  str     caption the sample carries in the output
    original_class    str     true class name ("" when unknown); original_label int64 (-1 unknown)
    target_class      str     backdoor target / targeted adversarial class; target_label int64
    source_key        str     key of the sample the image came from (targeted: a test-set key)
    source            str     shard the image came from
    shard             str     output shard holding the poisoned sample (file name in the poisoned set)
    image_format      str     how the image is stored ("png", "jpg"; targeted: the source's bytes as-is)
    lossy             bool    True when the poisoned image was re-encoded as JPEG (trigger pixels approximate)
    image_bytes       binary  targeted: the target image as stored in the test set; null for backdoor
"""
from __future__ import annotations

import io
import posixpath
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import S3Config
from ..data.shards import commit_file
from ..data.storage import resolve

MANIFEST_FILE = "_poison_manifest.parquet"

SCHEMA = pa.schema([
    ("key", pa.string()), ("attack", pa.string()), ("trigger", pa.string()),
    ("original_caption", pa.string()), ("poisoned_caption", pa.string()),
    ("original_class", pa.string()), ("original_label", pa.int64()),
    ("target_class", pa.string()), ("target_label", pa.int64()),
    ("source_key", pa.string()), ("source", pa.string()), ("shard", pa.string()),
    ("image_format", pa.string()), ("lossy", pa.bool_()), ("image_bytes", pa.binary()),
])
COLUMNS = tuple(SCHEMA.names)


def manifest_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with every column of SCHEMA) -> a table sorted by key (deterministic bytes)."""
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"manifest rows lack columns {missing}")
    ordered = sorted(rows, key=lambda r: r["key"])
    return pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in ordered], schema=SCHEMA)


def write_manifest(fs, path: str, rows: list[dict]) -> None:
    """Write the manifest parquet to `path` on `fs` atomically (one file, zstd)."""
    buf = io.BytesIO()
    pq.write_table(manifest_table(rows), buf, compression="zstd")
    commit_file(fs, path, buf.getvalue())


def manifest_path(path: str) -> str:
    """The manifest file for a shard folder, or `path` itself when it names a .parquet file."""
    return path if path.endswith(".parquet") else posixpath.join(path.rstrip("/"), MANIFEST_FILE)


def read_manifest(path: str, s3: S3Config) -> pa.Table:
    """The manifest of a poisoned shard set (folder or manifest file; local or s3://)."""
    fs, file = resolve(manifest_path(path), s3)
    if not fs.isfile(file):
        raise ValueError(f"no poison manifest at {manifest_path(path)}")
    with fs.open(file, "rb") as f:
        table = pq.read_table(pa.BufferReader(f.read()))
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{manifest_path(path)} is not a poison manifest: it lacks columns {missing}")
    return table


def manifest_summary(table: pa.Table) -> dict:
    """Counts of a manifest: rows, by attack, by (attack, original -> target class), by lossy re-encoding,
    and the number of distinct source images (targeted: the T target images)."""
    cols = table.select(["attack", "original_class", "target_class", "source_key", "lossy"]).to_pydict()
    pairs = Counter(f"{a}: {o or '?'} -> {t}" for a, o, t in zip(cols["attack"], cols["original_class"],
                                                                  cols["target_class"]))
    return {"rows": table.num_rows, "by_attack": dict(Counter(cols["attack"])), "by_pair": dict(sorted(pairs.items())),
            "distinct_sources": len(set(cols["source_key"])), "lossy": int(sum(bool(x) for x in cols["lossy"]))}
