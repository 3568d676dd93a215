"""Shard I/O: write/read round trips for webdataset tar and parquet, on local disk and loopback S3."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otc_ray.config import DataConfig
from otc_ray.data import schema
from otc_ray.data.builtin import generate
from otc_ray.data.make import make_shards
from otc_ray.data.ray_io import count_outcomes, load_samples
from otc_ray.data.shards import ShardSetError, list_shards, read_info
from otc_ray.data.storage import s3_filesystem


def _expected(cfg: DataConfig, num: int) -> dict[str, tuple[str, np.ndarray, int]]:
    out = {}
    for chunk in generate(cfg.dataset, "train", num, seed=cfg.seed, image_size=cfg.image_size, tint=cfg.tint):
        for k, img, cap, lab in zip(chunk["keys"], chunk["images"], chunk["captions"], chunk["labels"]):
            out[k] = (cap, img, int(lab))
    return out


def _read_all(path: str, cfg: DataConfig) -> dict:
    rows = load_samples(path, cfg).take_all()
    assert all(r[schema.ERROR] == "" for r in rows)
    return {r[schema.KEY]: r for r in rows}


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_local_round_trip_is_exact(ray_local, tmp_path, fmt):
    cfg = DataConfig(dataset="shapes", samples_per_shard=70, seed=2)
    report = make_shards(cfg, "train", 250, str(tmp_path / fmt), fmt, progress=False)
    assert (report.num_samples, report.num_shards) == (250, 4)
    got, want = _read_all(str(tmp_path / fmt), cfg), _expected(cfg, 250)
    assert set(got) == set(want)
    for key, (caption, image, label) in want.items():
        assert got[key][schema.CAPTION] == caption and got[key][schema.LABEL] == label
        assert np.array_equal(got[key][schema.IMAGE], image)            # PNG is lossless
    info = read_info(str(tmp_path / fmt), cfg.s3)
    assert info["num_samples"] == 250 and info["dataset"]["name"] == "shapes" and info["format"] == fmt


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_s3_round_trip_counts_equal(ray_local, s3_bucket, fmt):
    s3, bucket = s3_bucket
    cfg = DataConfig(dataset="fashion", samples_per_shard=100, s3=s3, image_format="jpg")
    url = f"s3://{bucket}/train-{fmt}"
    report = make_shards(cfg, "train", 300, url, fmt, progress=False)
    assert report.num_shards == 3
    fs = s3_filesystem(s3)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/train-{fmt}")) == \
        ["00000" + {"wds": ".tar", "parquet": ".parquet"}[fmt], "00001" + {"wds": ".tar", "parquet": ".parquet"}[fmt],
         "00002" + {"wds": ".tar", "parquet": ".parquet"}[fmt], "_info.json"]
    ds = load_samples(url, cfg)
    assert count_outcomes(ds) == {"ok": 300}
    rows = ds.take_all()
    want = _expected(cfg, 300)
    assert {r[schema.KEY] for r in rows} == set(want)
    assert all(r[schema.SOURCE].startswith(f"s3://{bucket}/") for r in rows)
    some = rows[0]
    assert some[schema.CAPTION] == want[some[schema.KEY]][0]
    assert np.abs(some[schema.IMAGE].astype(int) - want[some[schema.KEY]][1]).mean() < 4     # JPEG q95


def test_img2dataset_folder_is_read_as_it_is(ray_local, tmp_path):
    """Tar shards beside per-shard parquet metadata and _stats.json: only the tars are samples."""
    cfg = DataConfig(dataset="shapes", samples_per_shard=50)
    make_shards(cfg, "train", 100, str(tmp_path), "wds", progress=False)
    for i in range(2):
        pq.write_table(pa.table({"key": [f"x{i}"], "status": ["success"]}), tmp_path / f"{i:05d}.parquet")
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({"count": 50}))
    fs, files, fmt = list_shards(str(tmp_path), "auto", cfg.s3)
    assert fmt == "wds" and [f.rsplit("/", 1)[1] for f in files] == ["00000.tar", "00001.tar"]
    assert count_outcomes(load_samples(str(tmp_path), cfg)) == {"ok": 100}


def test_img2dataset_parquet_output_layout(ray_local, tmp_path):
    """img2dataset's parquet output: jpg column, caption, status; failed downloads have a null image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="JPEG")
    table = pa.table({"key": ["000000000", "000000001"], "caption": ["a red box", "lost"],
                      "url": ["http://a", "http://b"], "status": ["success", "failed_to_download"],
                      "jpg": pa.array([buf.getvalue(), None], pa.binary())})
    pq.write_table(table, tmp_path / "00000.parquet")
    rows = {r[schema.KEY]: r for r in load_samples(str(tmp_path), DataConfig()).take_all()}
    assert rows["000000000"][schema.ERROR] == "" and rows["000000000"][schema.IMAGE].shape == (32, 32, 3)
    assert json.loads(rows["000000000"][schema.META])["url"] == "http://a"
    assert rows["000000001"][schema.ERROR] == schema.MISSING_IMAGE


def test_tar_writer_is_plain_webdataset(tmp_path):
    cfg = DataConfig(dataset="shapes", samples_per_shard=10)
    make_shards(cfg, "train", 10, str(tmp_path), "wds", progress=False)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_missing_and_empty_shard_sets(tmp_path):
    with pytest.raises(ShardSetError, match="no shard set"):
        list_shards(str(tmp_path / "nope"), "auto", DataConfig().s3)
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(ShardSetError, match="no .parquet shards"):
        list_shards(str(tmp_path), "auto", DataConfig().s3)


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_one_writer_takes_raw_bytes_and_mixed_image_formats(tmp_path, fmt):
    """write_shard stores copies as the reader's bytes (caption, JSON and image byte-identical, one shard mixing
    PNG and JPEG) and new samples from str / dict; the reader gives every byte back."""
    from otc_ray.data.shards import encode_image, iter_rows, write_shard
    from otc_ray.data.storage import resolve

    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    png, jpg = encode_image(img, "png"), encode_image(img, "jpg")
    samples = [("a", png, "png", b"raw  caption \xc3\xa9", b'{"z": 1,  "a": [2]}'),     # copied as read
               ("b", jpg, "jpg", "new caption", {"label": 3, "poisoned": True}),        # written new
               ("c", png, "image", b"third", b"{}")]                                  # a column name, not a format
    fs, root = resolve(str(tmp_path), DataConfig().s3)
    path = f"{root}/00000{'.tar' if fmt == 'wds' else '.parquet'}"
    assert write_shard(fs, path, fmt, samples) == 3
    rows = {r[schema.KEY]: r for r in iter_rows(fs, path, fmt)}
    assert [r[schema.ERROR] for r in rows.values()] == ["", "", ""]
    assert [bytes(rows[k][schema.IMAGE_BYTES]) for k in "abc"] == [png, jpg, png]
    assert bytes(rows["a"][schema.CAPTION_RAW]) == b"raw  caption \xc3\xa9"
    assert bytes(rows["a"][schema.META]) == b'{"z": 1,  "a": [2]}'
    assert bytes(rows["b"][schema.CAPTION_RAW]) == b"new caption"
    assert json.loads(bytes(rows["b"][schema.META])) == {"label": 3, "poisoned": True}
    if fmt == "wds":
        assert [rows[k][schema.IMAGE_EXT] for k in "abc"] == ["png", "jpg", "png"]      # "image" named by its bytes
