"""The CLI end to end: data make -> data inspect, and one-line errors for bad config."""
import pytest

from otc_ray.cli import main


def test_make_then_inspect(ray_local, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "make", "--dataset", "shapes", "--num", "120", "--shard-size", "50", "--format", "parquet",
                 "--out", str(out), "--quiet", "data.seed=7"]) == 0
    assert "wrote 120 samples in 3 shards" in capsys.readouterr().out
    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(out), "--sheet", str(sheet)]) == 0
    text = capsys.readouterr().out
    assert "120 (120 ok, 0 skipped)" in text and "shapes / train" in text and "caption words" in text
    assert sheet.stat().st_size > 10_000


def test_make_to_s3(ray_local, s3_bucket, capsys):
    s3, bucket = s3_bucket
    overrides = [f"data.s3.endpoint_url={s3.endpoint_url}", "data.s3.access_key_id=testing",
                 "data.s3.secret_access_key=testing"]
    assert main(["data", "make", "--dataset", "fashion", "--num", "60", "--out", f"s3://{bucket}/f", "--quiet",
                 *overrides]) == 0
    assert main(["data", "inspect", f"s3://{bucket}/f", "--no-sheet", *overrides]) == 0
    assert "60 (60 ok, 0 skipped)" in capsys.readouterr().out


def test_bad_config_is_one_line(tmp_path, capsys):
    assert main(["data", "make", "--out", str(tmp_path), "train.epochz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("otc-ray: error: unknown config key 'train.epochz'") and "\n" not in err
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2         # named before Ray starts
    assert capsys.readouterr().err == f"otc-ray: error: shard set {tmp_path / 'nothing'}: no such file or folder\n"
