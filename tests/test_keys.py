"""Sample keys: an unsafe key (`..`, a leading `/`, a dot, a control character) is a counted `unsafe_path` skip on
read (tar and parquet) and a ValueError on write (tar and parquet, nothing committed); GNU long-name and pax
headers have a size cap, checked before their bytes are read."""
from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from otc_ray.data import schema
from otc_ray.data.decode import DecodeLimits, decode_batch
from otc_ray.data.keys import key_problem
from otc_ray.data.parquet_format import iter_parquet_samples, write_parquet_shard
from otc_ray.data.ray_io import _to_block
from otc_ray.data.shards import encode_image, write_shard
from otc_ray.data.tar_format import MAX_LONG_NAME_BYTES, MAX_PAX_BYTES, iter_tar_samples, write_tar_shard

PNG = encode_image(np.full((8, 8, 3), 77, np.uint8), "png")
LIMITS = DecodeLimits(image_size=8, max_pixels=10_000, max_caption_chars=100, truncate_captions=False)

UNSAFE_KEYS = ["../escape", "a/../../b", "/etc/cron", ".hidden", "dir/.git/x", "./x", "a//b", "with.dot",
               "dir/x.y", "bell\x07", "new\nline", "esc\x1b[2J", "nul\x00", "c1\x85", "back\\slash", "",
               "bad\udce9", "k" * 4001]
SAFE_KEYS = ["000000001", "shard-3/000000002", "a_b-C", "deep/er/key", "caf\u00e9", "k" * 4000]


def _sample(key: str) -> tuple:
    return (key, PNG, "png", f"a grey square {len(key)}", {"label": 0})


@pytest.mark.parametrize("key", UNSAFE_KEYS, ids=repr)
def test_unsafe_key_has_a_problem(key):
    assert key_problem(key)


@pytest.mark.parametrize("key", SAFE_KEYS, ids=lambda k: repr(k[:20]))
def test_safe_key_round_trips_through_both_writers(key):
    """A safe key (a long one included: pax header) is written and read back unchanged, as a good sample."""
    assert key_problem(key) == ""
    for write, read in ((write_tar_shard, iter_tar_samples), (write_parquet_shard, iter_parquet_samples)):
        buf = io.BytesIO()
        assert write(buf, [_sample("000000000"), _sample(key)]) == 2
        rows = list(read(io.BytesIO(buf.getvalue()), "x"))
        assert [(r[schema.KEY], r[schema.ERROR]) for r in rows] == [("000000000", ""), (key, "")]


@pytest.mark.parametrize("key", UNSAFE_KEYS, ids=repr)
def test_writers_refuse_an_unsafe_key_and_commit_nothing(key, tmp_path):
    fs = LocalFileSystem()
    for fmt, suffix in (("wds", "tar"), ("parquet", "parquet")):
        with pytest.raises(ValueError, match="unsafe sample key"):
            write_shard(fs, str(tmp_path / f"00000.{suffix}"), fmt, [_sample("000000000"), _sample(key)])
    assert list(tmp_path.iterdir()) == [], "a shard (or a temp file) was written for a refused key"


def test_parquet_reader_counts_unsafe_keys_as_skips():
    """Parquet keys are strings: nothing but the rule stops `../x` from becoming a member name when the set is
    copied to tar. Each bad key is one `unsafe_path` row, the good rows beside them are untouched, and every row
    survives the Arrow block schema and the decoder."""
    bad = [k for k in UNSAFE_KEYS if k and "\udce9" not in k and "\x00" not in k]
    keys = ["000000000", *bad, "000000001"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "png": [PNG] * len(keys), "caption": ["a grey square"] * len(keys)}), buf)
    rows = list(iter_parquet_samples(io.BytesIO(buf.getvalue()), "p.parquet"))
    assert [r[schema.ERROR] for r in rows] == [""] + [schema.UNSAFE_PATH] * len(bad) + [""]
    table = _to_block(rows)
    batch = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    assert Counter(str(e) or "ok" for e in decode_batch(batch, LIMITS)[schema.ERROR]) == {"ok": 2, schema.UNSAFE_PATH: len(bad)}


def test_parquet_without_key_column_gets_safe_keys():
    buf = io.BytesIO()
    pq.write_table(pa.table({"png": [PNG, PNG], "caption": ["a", "b"]}), buf)
    rows = list(iter_parquet_samples(io.BytesIO(buf.getvalue()), "/data/set/00007.parquet"))
    assert [(r[schema.KEY], r[schema.ERROR]) for r in rows] == [("00007-000000000", ""), ("00007-000000001", "")]


def _tar(names: list[str], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name in names:
            for ext, payload in (("png", PNG), ("txt", b"a caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("key", ["dir/.git/x", "bell\x07", "new\nline", "esc\x1b[2J", "c1\x85"], ids=repr)
def test_tar_reader_counts_unsafe_member_keys(key):
    rows = list(iter_tar_samples(io.BytesIO(_tar(["000000000", key, "000000001"])), "t.tar"))
    assert [r[schema.ERROR] for r in rows] == ["", schema.UNSAFE_PATH, ""]
    assert rows[1][schema.IMAGE_BYTES] == b""


class _Recording(io.BytesIO):
    """A stream that remembers the largest read asked of it (a reader that trusts a header's size asks for it)."""

    largest = 0

    def read(self, n=-1):
        self.largest = max(self.largest, n)
        return super().read(n)


def _extended_header(kind: bytes, claimed: int) -> bytes:
    info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "./PaxHeaders/x")
    info.type, info.size = kind, claimed
    return info.tobuf(tarfile.GNU_FORMAT)


@pytest.mark.parametrize("kind, cap", [(tarfile.GNUTYPE_LONGNAME, MAX_LONG_NAME_BYTES),
                                       (tarfile.XHDTYPE, MAX_PAX_BYTES), (tarfile.XGLTYPE, MAX_PAX_BYTES)])
def test_long_name_and_pax_headers_have_a_size_cap(kind, cap):
    """A header claiming 8 GiB of long name / pax records is a corrupt shard, refused before its bytes are read;
    the sample before is kept (the one in progress when the header comes is counted with the shard). Just under the cap, a GNU long name is read (and is a key)."""
    good = _tar(["000000000", "000000001"])
    with tarfile.open(fileobj=io.BytesIO(good)) as t:
        last = t.getmembers()[-1]
        good = good[:last.offset_data + -(-last.size // 512) * 512]     # cut before the end-of-archive blocks
    stream = _Recording(good + _extended_header(kind, 8 << 30) + b"\0" * 4096)
    rows = list(iter_tar_samples(stream, "big.tar"))
    assert [(r[schema.KEY], r[schema.ERROR]) for r in rows] == [("000000000", ""), ("000000001", ""),
                                                      ("big.tar#corrupt", schema.CORRUPT_SHARD)]
    assert stream.largest <= 1 << 20, f"the reader asked for {stream.largest} bytes of a header"

    if kind == tarfile.GNUTYPE_LONGNAME:
        name = ("d" * 99 + "/") * ((cap - 200) // 100) + "000000001"
        assert len(name) < cap
        rows = list(iter_tar_samples(io.BytesIO(_tar([name], tarfile.GNU_FORMAT)), "long.tar"))
        assert [(r[schema.KEY], r[schema.ERROR]) for r in rows] == [(name, "")]
