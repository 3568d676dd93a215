"""Bad input: every defective sample is counted under its reason and skipped; nothing crashes or vanishes."""
import io
import json
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otc_ray.config import DataConfig
from otc_ray.data import schema
from otc_ray.data.decode import DecodeLimits, decode_caption
from otc_ray.data.ray_io import count_outcomes, decoded_batches, load_samples, read_in_driver, shard_bytes
from otc_ray.data.tar_format import iter_tar_samples, is_unsafe_name


def _png(w=16, h=16, colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """members: (name, payload or None, tar type)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            info.size = len(payload or b"")
            tar.addfile(info, io.BytesIO(payload) if payload else None)
    return buf.getvalue()


def _sample(key, image=None, caption=b"a green square", meta=b'{"label": 1}'):
    out = []
    if image is not None:
        out.append((f"{key}.png", image, tarfile.REGTYPE))
    if caption is not None:
        out.append((f"{key}.txt", caption, tarfile.REGTYPE))
    if meta is not None:
        out.append((f"{key}.json", meta, tarfile.REGTYPE))
    return out


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")     # 144 Mpx, a few KB on disk
    return buf.getvalue()


GOOD = _png()
CASES = {                     # key -> (members, expected reason)
    "000000001": (_sample("000000001", GOOD), ""),
    "000000002": (_sample("000000002", b"\x89PNG\r\n\x1a\n garbage"), schema.CORRUPT_IMAGE),
    "000000003": (_sample("000000003", GOOD[: len(GOOD) // 2]), schema.CORRUPT_IMAGE),
    "000000004": (_sample("000000004", _bomb()), schema.IMAGE_TOO_LARGE),
    "000000005": (_sample("000000005", GOOD, caption=None), schema.MISSING_CAPTION),
    "000000006": (_sample("000000006", GOOD, caption=b"   \n"), schema.EMPTY_CAPTION),
    "000000007": (_sample("000000007", GOOD, caption=b"caf\xe9 \xff\xfe"), schema.BAD_UTF8),
    "000000008": (_sample("000000008", GOOD, caption=b"long " * 300), schema.CAPTION_TOO_LONG),
    "000000009": (_sample("000000009", None), schema.MISSING_IMAGE),
    "000000010": (_sample("000000010", GOOD, meta=b"{not json"), schema.BAD_META),
    "../000000011": (_sample("../000000011", GOOD), schema.UNSAFE_PATH),
    "/abs/000000012": (_sample("/abs/000000012", GOOD), schema.UNSAFE_PATH),
    "000000013": ([("000000013.png", None, tarfile.SYMTYPE)] + _sample("000000013", None), schema.UNSAFE_PATH),
    "000000014": (_sample("000000014", GOOD, caption="une photo d'un carré vert".encode()), ""),
}


def _hostile_tar() -> bytes:
    members = [m for members, _ in CASES.values() for m in members]
    members += _sample("000000001", GOOD)                      # the key again, later in the shard
    return _tar(members)


def test_each_defect_has_its_reason():
    rows = list(iter_tar_samples(io.BytesIO(_hostile_tar()), "mem.tar"))
    by_key = Counter(r[schema.KEY] for r in rows)
    assert by_key["000000001"] == 2 and len(rows) == len(CASES) + 1
    reader_reasons = [r[schema.ERROR] for r in rows if r[schema.KEY] == "000000001"]
    assert reader_reasons == ["", schema.DUPLICATE_KEY]
    for key in ("../000000011", "/abs/000000012", "000000013"):
        assert next(r for r in rows if r[schema.KEY] == key)[schema.ERROR] == schema.UNSAFE_PATH


def test_hostile_shard_through_ray_counts_every_sample(ray_local, tmp_path):
    (tmp_path / "00000.tar").write_bytes(_hostile_tar())
    ds = load_samples(str(tmp_path), DataConfig(max_caption_chars=200))
    rows = ds.take_all()
    got = {(r[schema.KEY], r[schema.ERROR]) for r in rows}
    for key, (_, reason) in CASES.items():
        assert (key, reason) in got, key
    counts = count_outcomes(ds)
    assert sum(counts.values()) == len(CASES) + 1
    assert counts["ok"] == 2 and counts[schema.DUPLICATE_KEY] == 1 and counts[schema.UNSAFE_PATH] == 3
    assert counts[schema.CORRUPT_IMAGE] == 2


def test_truncated_and_corrupt_shards(ray_local, tmp_path):
    data = _tar([m for k in ("000000001", "000000014") for m in CASES[k][0]])
    cut = data.index(b"000000014.txt") + 512 + 5                 # inside the second sample's caption
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    bad_header = bytearray(data)
    bad_header[data.index(b"000000014.png") + 148] ^= 0xFF       # break a header checksum
    (tmp_path / "00001.tar").write_bytes(bytes(bad_header))
    (tmp_path / "00002.tar").write_bytes(data[:-1024 * 9])         # no end-of-archive blocks
    rows = load_samples(str(tmp_path), DataConfig()).take_all()
    got = Counter((r[schema.SOURCE].rsplit("/", 1)[1], r[schema.ERROR]) for r in rows)
    assert got[("00000.tar", "")] == 1 and got[("00000.tar", schema.TRUNCATED_SHARD)] == 2   # the sample + marker
    # the sample before the bad header is complete and read (a copy of 00000.tar's key: the first file wins), the
    # bad header ends the shard with its marker
    assert got[("00001.tar", schema.DUPLICATE_KEY)] == 1 and got[("00001.tar", schema.CORRUPT_SHARD)] == 1
    assert got[("00001.tar", "")] == 0
    assert got[("00002.tar", schema.TRUNCATED_SHARD)] >= 1
    assert any(r[schema.KEY].endswith("00000.tar#truncated") for r in rows)


def test_corrupt_parquet_is_one_counted_row(ray_local, tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a"], "png": [GOOD], "caption": ["x"]}), buf)
    (tmp_path / "00000.parquet").write_bytes(buf.getvalue()[:-20])
    (tmp_path / "00001.parquet").write_bytes(buf.getvalue())
    counts = count_outcomes(load_samples(str(tmp_path), DataConfig()))
    assert counts == {"ok": 1, schema.CORRUPT_SHARD: 1}


def test_caption_truncation_mode():
    limits = DecodeLimits(32, 10_000, 10, truncate_captions=True)
    assert decode_caption(b"one two three four", limits) == ("one two th", "")
    assert decode_caption(b"one two three four", DecodeLimits(32, 10_000, 10, False))[1] == schema.CAPTION_TOO_LONG


@pytest.mark.parametrize("name, unsafe", [("../x.png", True), ("/etc/x.png", True), ("a/../../x", True),
                                          ("a\\..\\x", True), ("a\nb.png", True), ("a\x1b[2J.png", True),
                                          ("dir/000.png", False), ("000.png", False)])
def test_unsafe_names(name, unsafe):
    assert is_unsafe_name(name) is unsafe


def test_member_size_limit_skips_without_reading():
    data = _tar(_sample("000000001", GOOD) + _sample("000000002", b"x" * 5000))
    rows = list(iter_tar_samples(io.BytesIO(data), "m.tar", max_member_bytes=4096))
    assert [r[schema.ERROR] for r in rows] == ["", schema.IMAGE_TOO_LARGE]
    assert json.loads(rows[0][schema.META]) == {"label": 1}


def test_header_screen_counts_every_sample_and_defers_only_corrupt_image_bodies(tmp_path):
    """The run's start-up count (`data.count.screen_outcomes`, no pixel decode) gives every sample of the hostile
    shard its reason, as the decode does, except a truncated PNG body, whose header is sound: the stream finds it."""
    from otc_ray.data.count import screen_outcomes

    (tmp_path / "00000.tar").write_bytes(_hostile_tar())
    counts = screen_outcomes(str(tmp_path), DataConfig(max_caption_chars=200))
    expected = Counter(reason or "ok" for _, reason in CASES.values()) + Counter({schema.DUPLICATE_KEY: 1})
    expected[schema.CORRUPT_IMAGE] -= 1          # 000000003: half a PNG, header intact
    expected["ok"] += 1
    assert counts == dict(expected)
    assert sum(counts.values()) == len(CASES) + 1


def _rows_of(batches) -> list[tuple]:
    """(source, row, key, error, caption, label, image bytes) of decoded rows, in a stable order."""
    out = [(str(b[schema.SOURCE][i]), int(b[schema.ROW][i]), str(b[schema.KEY][i]), str(b[schema.ERROR][i]),
            str(b[schema.CAPTION][i]), int(b[schema.LABEL][i]), bytes(b[schema.IMAGE][i].tobytes()))
           for b in batches for i in range(len(b[schema.KEY]))]
    return sorted(out)


def test_driver_read_gives_the_ray_reads_rows_and_reasons(ray_local, tmp_path):
    """`decoded_batches` (a small set read in the driver) against `load_samples` (Ray's read) on hostile shards: a
    shard of every defect, a truncated one, a broken header after a copy of an earlier file's key, a listed file
    that is gone; and a parquet set with a corrupt file. Same rows, same reasons, same duplicate winner."""
    wds = tmp_path / "wds"
    wds.mkdir()
    (wds / "00000.tar").write_bytes(_hostile_tar())
    data = _tar([m for k in ("000000001", "000000014") for m in CASES[k][0]])
    (wds / "00001.tar").write_bytes(data[:data.index(b"000000014.txt") + 512 + 5])
    bad_header = bytearray(data)
    bad_header[data.index(b"000000014.png") + 148] ^= 0xFF
    (wds / "00002.tar").write_bytes(bytes(bad_header))
    (wds / "00003.tar").symlink_to(tmp_path / "nowhere.tar")
    pqs = tmp_path / "pq"
    pqs.mkdir()
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a", "b"], "png": [GOOD, b"junk"], "caption": ["x", "y"]}), buf)
    (pqs / "00000.parquet").write_bytes(buf.getvalue()[:-20])
    (pqs / "00001.parquet").write_bytes(buf.getvalue())
    cfg = DataConfig(max_caption_chars=200)
    for folder in (wds, pqs):
        in_driver = _rows_of(decoded_batches(str(folder), cfg))
        by_ray = _rows_of(load_samples(str(folder), cfg).iter_batches(batch_format="numpy", batch_size=None))
        assert in_driver == by_ray and len(in_driver) >= 3
    reasons = Counter(r[3] for r in _rows_of(decoded_batches(str(wds), cfg)))
    assert reasons[schema.DUPLICATE_KEY] == 3 and reasons[schema.UNREADABLE_FILE] == 1   # 00000 own, 00001+00002 copies
    assert reasons[schema.TRUNCATED_SHARD] >= 1 and reasons[schema.CORRUPT_SHARD] == 1


def test_only_sets_within_driver_read_mb_are_read_in_the_driver(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    (small / "00000.tar").write_bytes(_hostile_tar())
    padding = [("000000001.bin", b"x" * (3 << 19), tarfile.REGTYPE)]       # 1.5 MB
    (large / "00000.tar").write_bytes(_tar(_sample("000000001", GOOD) + padding))
    assert shard_bytes(str(small), DataConfig()) == len(_hostile_tar())
    assert read_in_driver(str(small), DataConfig(driver_read_mb=1))
    assert not read_in_driver(str(large), DataConfig(driver_read_mb=1))       # 1.5 MB of shards
    assert read_in_driver(str(large), DataConfig(driver_read_mb=2))
    assert not read_in_driver(str(small), DataConfig(driver_read_mb=0))      # 0: always Ray Data
