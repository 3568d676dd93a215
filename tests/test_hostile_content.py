"""Issue 34, items 2 and 5: well-formed but hostile content never stops a read, and every image a user has decodes.

Built by hand (tarfile, pyarrow, PIL), not with the project's writer: valid parquet files whose columns have the
wrong types, valid JSON nested 100,000 deep or with a label of 10**23, images of every mode Pillow opens in PNG,
GIF, TIFF, WebP, JPEG and BMP, 16-bit grey (scaled, not clipped), compressed tar shards, a file that cannot be
opened. Each bad row is a counted skip that names its reason, key and file; nothing raises.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otc_ray.config import DataConfig
from otc_ray.data import schema
from otc_ray.data.decode import DecodeLimits, decode_batch, decode_image
from otc_ray.data.parquet_format import iter_parquet_samples
from otc_ray.data.ray_io import _to_block, read_file_rows
from otc_ray.data.shards import list_shards
from otc_ray.data.tar_format import iter_tar_samples

LIMITS = DecodeLimits(image_size=32, max_pixels=1 << 22, max_caption_chars=1000, truncate_captions=False)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(value: int = 90) -> bytes:
    return _encode(Image.fromarray(np.full((32, 32, 3), value, np.uint8)), "PNG")


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sample(key: str, image: bytes, caption: bytes = b"a photo", meta: bytes = b"{}", ext: str = "png"):
    return [(f"{key}.{ext}", image), (f"{key}.txt", caption), (f"{key}.json", meta)]


def _decoded(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows through the Arrow block a Ray read task builds, then the decoder (what a job does with them)."""
    table = _to_block([{**r, schema.ROW: i} for i, r in enumerate(rows)])
    batch = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    return decode_batch(batch, LIMITS)


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


PNG = _png()
WRONG_TYPES = {
    "caption_int64": pa.table({"key": ["a", "b"], "png": [PNG, PNG], "caption": pa.array([1, 2], pa.int64())}),
    "image_list": pa.table({"key": ["a", "b"], "png": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
                            "caption": ["x", "y"]}),
    "image_string": pa.table({"key": ["a", "b"], "image": ["/tmp/a.png", "/tmp/b.png"], "caption": ["x", "y"]}),
    "key_list": pa.table({"key": pa.array([["a"], ["b"]]), "png": [PNG, PNG], "caption": ["x", "y"]}),
    "json_int": pa.table({"key": ["a", "b"], "png": [PNG, PNG], "caption": ["x", "y"], "json": [1, 2]}),
    "caption_struct": pa.table({"key": ["a", "b"], "png": [PNG, PNG],
                                "caption": pa.array([{"t": "x"}, {"t": "y"}])}),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_parquet_with_wrong_column_types_is_counted_per_row(case):
    rows = list(iter_parquet_samples(io.BytesIO(_parquet(WRONG_TYPES[case])), f"in/{case}.parquet"))
    decoded = _decoded(rows)
    assert list(decoded[schema.ERROR]) == [schema.WRONG_TYPE, schema.WRONG_TYPE]
    assert all(k and s == f"in/{case}.parquet" for k, s in zip(decoded[schema.KEY], decoded[schema.SOURCE]))


def test_deep_and_huge_json_and_huge_labels_are_counted_not_raised():
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    members = (_sample("deep", PNG, meta=deep) + _sample("deepobj", PNG, meta=deep_object)
               + _sample("biglabel", PNG, meta=json.dumps({"label": 10 ** 23}).encode())
               + _sample("neglabel", PNG, meta=json.dumps({"label": -10 ** 30}).encode())
               + _sample("hugemeta", PNG, meta=json.dumps({"note": "x" * (4 << 20), "label": 3}).encode())
               + _sample("hugecaption", PNG, caption=b"word " * 400_000)
               + _sample("ok", PNG, meta=b'{"label": 2}'))
    rows = list(iter_tar_samples(io.BytesIO(_tar_bytes(members)), "in/00000.tar"))
    decoded = _decoded(rows)
    got = dict(zip(decoded[schema.KEY], decoded[schema.ERROR]))
    assert got == {"deep": schema.BAD_META, "deepobj": schema.BAD_META, "biglabel": schema.BAD_META, "neglabel": schema.BAD_META,
                   "hugemeta": "", "hugecaption": schema.CAPTION_TOO_LONG, "ok": ""}
    labels = dict(zip(decoded[schema.KEY], decoded[schema.LABEL]))
    assert labels["hugemeta"] == 3 and labels["ok"] == 2


def _every_mode() -> list[tuple[str, str, bytes]]:
    """(name, format, bytes) for each image mode Pillow writes in each container that holds it."""
    rgb = Image.fromarray((np.indices((32, 32)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB")
    out = []
    modes = {"1": rgb.convert("1"), "L": rgb.convert("L"), "P": rgb.convert("P"), "RGB": rgb,
             "RGBA": rgb.convert("RGBA"), "LA": rgb.convert("LA"), "CMYK": rgb.convert("CMYK"),
             "YCbCr": rgb.convert("YCbCr"), "I": rgb.convert("I"), "F": rgb.convert("F"),
             "I;16": Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)),
             "PA": rgb.convert("PA"), "LAB": rgb.convert("LAB"), "HSV": rgb.convert("HSV")}
    for fmt in ("PNG", "GIF", "TIFF", "WEBP", "JPEG", "BMP"):
        for name, img in modes.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = _encode(img, fmt)
            except (OSError, ValueError, KeyError):
                continue                                            # the container cannot hold that mode
            out.append((name, fmt, data))
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    out.append(("P+transparency", "PNG", _encode(pal, "PNG", transparency=0)))
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    out.append(("animated", "GIF", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])))
    return out


MODES = _every_mode()


@pytest.mark.parametrize("name, fmt, data", MODES, ids=[f"{f}-{n}" for n, f, _ in MODES])
def test_every_image_mode_decodes_to_rgb_or_is_a_counted_skip(name, fmt, data):
    image, err = decode_image(data, LIMITS)
    assert err in ("", schema.CORRUPT_IMAGE)
    if not err:
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert err == "", f"{fmt} {name} did not decode"


def test_sixteen_bit_grey_is_scaled_not_clipped():
    """A 16-bit ramp 0..65535 reads back as the 8-bit ramp 0..255 (before: 99.7% of it at 255)."""
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    for fmt in ("PNG", "TIFF"):
        image, err = decode_image(_encode(Image.fromarray(ramp), fmt), LIMITS)
        assert err == ""
        expected = np.rint(ramp / 257.0)
        assert np.abs(image[..., 0].astype(int) - expected).max() <= 1, fmt
        assert (image == 255).mean() < 0.1


def test_gif_tiff_webp_members_of_a_tar_are_images():
    rgb = Image.fromarray(np.full((32, 32, 3), 120, np.uint8))
    members = []
    for ext, fmt in (("gif", "GIF"), ("tif", "TIFF"), ("tiff", "TIFF"), ("webp", "WEBP"), ("bmp", "BMP")):
        members += _sample(f"s{ext}", _encode(rgb, fmt), ext=ext)
    decoded = _decoded(list(iter_tar_samples(io.BytesIO(_tar_bytes(members)), "in/00000.tar")))
    assert list(decoded[schema.ERROR]) == [""] * 5


def test_compressed_tar_shards_are_read_and_other_compressed_files_named(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(_tar_bytes(_sample("a", PNG)))
    (folder / "00001.tar.gz").write_bytes(gzip.compress(_tar_bytes(_sample("b", PNG))))
    (folder / "00002.tar.zst").write_bytes(b"(\xb5/\xfd not really")
    with pytest.warns(UserWarning, match=r"00002\.tar\.zst"):
        fs, files, fmt = list_shards(str(folder), "auto", DataConfig().s3)
    assert [Path(f).name for f in files] == ["00000.tar", "00001.tar.gz"]
    rows = [r for f in files for b in read_file_rows(fs.open(f, "rb"), f, fmt, 1 << 20, f) for r in b.to_pylist()]
    assert [(r[schema.KEY], r[schema.ERROR]) for r in rows] == [("a", ""), ("b", "")]


def test_a_file_that_cannot_be_opened_or_read_is_one_counted_row(tmp_path):
    from fsspec.implementations.local import LocalFileSystem

    from otc_ray.data.ray_io import open_or_unreadable

    fs = LocalFileSystem()
    (tmp_path / "00000.tar").symlink_to(tmp_path / "gone.tar")            # listed, cannot be opened
    gz = tmp_path / "00001.tar.gz"
    whole = gzip.compress(_tar_bytes(_sample("a", PNG) + _sample("b", PNG)))
    gz.write_bytes(whole[:len(whole) // 2])                                                  # cut gzip stream
    bad_gz = tmp_path / "00002.tar.gz"
    bad_gz.write_bytes(b"\x1f\x8b" + b"\xff" * 64)                                          # not deflate
    rows = {}
    for path in (tmp_path / "00000.tar", gz, bad_gz):
        rows[path.name] = [r for b in read_file_rows(open_or_unreadable(fs, str(path)), str(path), "wds", 1 << 20,
                                                     str(path)) for r in b.to_pylist()]
    [marker] = rows["00000.tar"]
    assert marker[schema.ERROR] == schema.UNREADABLE_FILE and marker[schema.KEY] == f"{tmp_path / '00000.tar'}#unreadable"
    assert "00000.tar" in json.loads(marker[schema.META])["detail"]
    assert rows["00001.tar.gz"][-1][schema.ERROR] in (schema.UNREADABLE_FILE, schema.TRUNCATED_SHARD)
    assert all(r[schema.ERROR] for r in rows["00001.tar.gz"]) or rows["00001.tar.gz"][0][schema.KEY] == "a"
    assert [r[schema.ERROR] for r in rows["00002.tar.gz"]] == [schema.UNREADABLE_FILE]


def test_a_broken_link_in_a_shard_set_is_counted_through_ray(ray_local, tmp_path):
    from otc_ray.data.ray_io import count_outcomes, read_shards

    (tmp_path / "00000.tar").write_bytes(_tar_bytes(_sample("a", PNG)))
    (tmp_path / "00001.tar").symlink_to(tmp_path / "gone.tar")
    assert count_outcomes(read_shards(str(tmp_path), DataConfig())) == {"ok": 1, schema.UNREADABLE_FILE: 1}


def test_hostile_content_through_ray_read_and_decode(ray_local, tmp_path):
    """The Ray read tasks (where an ArrowTypeError ended the job before) count every row of every hostile file."""
    from otc_ray.data.ray_io import count_outcomes, load_samples

    folder = tmp_path / "pq"
    folder.mkdir()
    for i, case in enumerate(sorted(WRONG_TYPES)):
        (folder / f"{i:05d}.parquet").write_bytes(_parquet(WRONG_TYPES[case]))
    good = pa.table({"key": ["g1", "g2"], "png": [PNG, PNG], "caption": ["x", "y"],
                     "json": ['{"label": 1}', '{"label": 100000000000000000000000}']})
    (folder / "00099.parquet").write_bytes(_parquet(good))
    counts = count_outcomes(load_samples(str(folder), DataConfig(image_size=32)))
    assert counts == {schema.WRONG_TYPE: 2 * len(WRONG_TYPES), "ok": 1, schema.BAD_META: 1}
