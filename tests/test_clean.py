"""The cleaning job: round trips on local disk (CLI, tar, with a poison manifest) and loopback S3 (parquet, action
drop), exact key accounting (input keys = output keys + dropped keys, no duplicates), also when a re-matching actor
dies mid-run, and a clear refusal of a finished output."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from otc_ray.cli import main
from otc_ray.config import Config, DataConfig, ModelConfig, PoisonConfig, config_from_dict
from otc_ray.data import schema as S
from otc_ray.data.make import make_shards
from otc_ray.data.ray_io import read_shards
from otc_ray.data.shards import encode_image
from otc_ray.data.storage import s3_filesystem
from otc_ray.data.tar_format import write_tar_shard
from otc_ray.pipelines.clean import REPORT_FILE, SUMMARY_FILE, clean_shards
from otc_ray.rematch.stage import FAULT_BATCH_ENV, FAULT_MARKER_ENV

N = 160
# an untrained checkpoint: a loose gate threshold so that the round trip has re-captioned samples to account for
REMATCH = {"block_size": 40, "k": 4, "neighbours": 8, "pool": "bank", "bank_size": 80, "min_actors": 1,
           "max_actors": 2, "actor_num_cpus": 0.5, "gate_threshold": -1.0, "gate_reference": 16}


def _cfg(**sections) -> Config:
    tree = {"data": {"dataset": "shapes", "samples_per_shard": 50}, "rematch": dict(REMATCH), "ot": {"iters": 30}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)


def _bad_samples() -> list[tuple]:
    good_png = encode_image(np.zeros((32, 32, 3), np.uint8), "png")
    return [("bad-corrupt", b"not a png", "png", "a red circle", {}), ("bad-empty", good_png, "png", "   ", {})]


def _keys(path: str, cfg) -> list[str]:
    return [str(k) for k in read_shards(path, cfg.data).select_columns([S.KEY]).to_pandas()[S.KEY]]


def _check_accounting(in_path: str, out_path: str, cfg, report) -> dict[str, list[str]]:
    """Input keys == output keys + dropped keys, with no duplicates anywhere; returns the three key lists."""
    inputs, outputs = _keys(in_path, cfg), _keys(out_path, cfg)
    dropped = [k for k, o in zip(report["key"], report["outcome"]) if o == "dropped"]
    assert len(inputs) == len(set(inputs))
    assert len(outputs) == len(set(outputs)), "an output key occurs twice"
    assert not set(outputs) & set(dropped)
    assert sorted(outputs + dropped) == sorted(inputs)
    assert sorted(report["key"]) == sorted(inputs)
    return {"inputs": inputs, "outputs": outputs, "dropped": dropped}


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """N shapes samples in tar shards, backdoored (8 samples -> 'circle'), plus a shard with two bad samples."""
    from otc_ray.poison.transform import poison_shards

    root = tmp_path_factory.mktemp("clean")
    data = DataConfig(dataset="shapes", samples_per_shard=50)
    make_shards(data, "train", N, str(root / "src"), "wds", progress=False)
    poison_shards(str(root / "src"), str(root / "train"), PoisonConfig(attack="backdoor", target="circle", count=8),
                  data, progress=False)
    stream = io.BytesIO()
    write_tar_shard(stream, _bad_samples())
    (root / "train" / "00099.tar").write_bytes(stream.getvalue())
    return root


def test_cli_clean_local_round_trip_with_checkpoint_and_manifest(ray_local, poisoned, capsys):
    from otc_ray.model import build_model

    torch.manual_seed(5)
    ckpt = poisoned / "model.pt"
    torch.save(build_model(ModelConfig()).model.state_dict(), ckpt)
    in_path, out_path = str(poisoned / "train"), str(poisoned / "out")
    overrides = [f"data.{k}={v}" for k, v in _cfg().data.__dict__.items() if k in ("dataset", "samples_per_shard")]
    overrides += [f"rematch.{k}={v}" for k, v in REMATCH.items()] + ["ot.iters=30"]
    rc = main(["clean", "--in", in_path, "--out", out_path, "--checkpoint", str(ckpt), "--manifest", in_path,
               *overrides])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "recaptioned" in printed and "detection" in printed
    report = pq.read_table(Path(out_path) / REPORT_FILE).to_pydict()
    keys = _check_accounting(in_path, out_path, _cfg(), report)
    summary = json.loads((Path(out_path) / SUMMARY_FILE).read_text())
    assert summary["total"] == N + 2 == len(keys["inputs"])
    assert summary["kept"] + summary["recaptioned"] + summary["dropped"] == summary["total"]
    assert summary["dropped_by_reason"] == {S.CORRUPT_IMAGE: 1, S.EMPTY_CAPTION: 1}
    assert summary["recaptioned"] == sum(o == "recaptioned" for o in report["outcome"]) > 0
    det = summary["detection"]
    assert det["detect_tp"] + det["detect_fn"] == 8 and det["detect_tp"] + det["detect_fp"] == summary["flagged"]
    # the written shards carry the caption used and say where it came from
    out = read_shards(out_path, _cfg().data).to_pandas()
    by_key = dict(zip(report["key"], zip(report["outcome"], report["caption_used"], report["caption"])))
    for key, raw, meta in zip(out[S.KEY], out[S.CAPTION_RAW], out[S.META]):
        outcome, used, original = by_key[key]
        assert raw.decode() == used
        assert (json.loads(meta).get("clean", {}).get("original_caption") == original) == (outcome == "recaptioned")
    # a second run into the finished folder is refused with one line, before any work
    assert main(["clean", "--in", in_path, "--out", out_path, *overrides]) == 2
    assert "already holds a finished cleaning" in capsys.readouterr().err


def test_s3_round_trip_parquet_with_drop_survives_an_actor_death(ray_local, s3_bucket, tmp_path):
    """Loopback S3, parquet, action drop; a re-matching actor exits on its 2nd batch (once, marked by a file):
    Ray restarts it and retries the batch, and the accounting is still exact."""
    s3, bucket = s3_bucket
    cfg = _cfg(data={"s3": {"endpoint_url": s3.endpoint_url, "access_key_id": "testing",
                            "secret_access_key": "testing", "retries": 2}},
               rematch={"gate": "margin", "margin": 0.0, "action": "drop", "method": "roclip", "block_size": 20})
    in_path, out_path = f"s3://{bucket}/train", f"s3://{bucket}/clean"
    make_shards(cfg.data, "train", N, in_path, "parquet", progress=False)
    fs = s3_filesystem(s3)
    fs.pipe_file(f"{bucket}/clean/clean-0123456789abcdef.parquet", b"left by a crashed run")   # an orphan
    marker = tmp_path / "actor-died"
    env = {"runtime_env": {"env_vars": {FAULT_BATCH_ENV: "2", FAULT_MARKER_ENV: str(marker)}}}
    summary = clean_shards(in_path, out_path, cfg, ray_remote_args=env)
    assert marker.exists(), "the fault hook must have killed an actor during the run"
    assert summary.orphans_removed == 1 and not fs.exists(f"{bucket}/clean/clean-0123456789abcdef.parquet")
    with fs.open(f"{bucket}/clean/{REPORT_FILE}", "rb") as f:
        report = pq.read_table(f).to_pydict()
    keys = _check_accounting(in_path, out_path, cfg, report)
    assert summary.total == N
    assert summary.dropped == summary.dropped_by_reason["flagged"] == summary.flagged > 0
    assert summary.recaptioned == 0 and len(keys["outputs"]) == summary.kept > 0
    assert all(f.endswith(".parquet") for f in fs.ls(f"{bucket}/clean") if "/clean-" in f)
    assert fs.exists(f"{bucket}/clean/{SUMMARY_FILE}")


def test_a_retried_write_overwrites_its_shard_whatever_it_keeps(tmp_path):
    """write_batch names a shard by its batch's keys: a retry that keeps other rows replaces the file."""
    from otc_ray.config import S3Config
    from otc_ray.pipelines.clean import write_batch

    png = encode_image(np.zeros((32, 32, 3), np.uint8), "png")
    n = 4
    batch = {S.KEY: np.asarray([f"k{i}" for i in range(n)], dtype=object),
             S.IMAGE_BYTES: np.asarray([png] * n, dtype=object), S.IMAGE_EXT: np.asarray(["png"] * n, dtype=object),
             S.CAPTION: np.asarray([f"caption {i}" for i in range(n)], dtype=object),
             S.META: np.asarray([b"{}"] * n, dtype=object), S.ERROR: np.asarray([""] * n, dtype=object),
             S.CAPTION_USED: np.asarray([f"caption {i}" for i in range(n)], dtype=object),
             S.SOURCE_KEY: np.asarray([f"k{i}" for i in range(n)], dtype=object),
             S.RECAPTIONED: np.zeros(n, bool), S.FLAGGED: np.zeros(n, bool), S.WEIGHT: np.ones(n, np.float32),
             **{c: np.zeros(n, np.float32) for c in (S.OWN_SCORE, S.BEST_SCORE, S.SUSPICION, S.GATE_Z)}}
    first = write_batch(batch, str(tmp_path), "wds", S3Config())
    batch[S.WEIGHT] = np.asarray([1, 0, 1, 0], np.float32)                # the retry drops two rows
    second = write_batch(batch, str(tmp_path), "wds", S3Config())
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert len(shards) == 1 and set(first["shard"]) == {shards[0]}
    assert second["outcome"].tolist() == ["kept", "dropped", "kept", "dropped"]
    from otc_ray.data.tar_format import iter_tar_samples

    with open(tmp_path / shards[0], "rb") as f:
        assert [row[S.KEY] for row in iter_tar_samples(f, shards[0])] == ["k0", "k2"]


def test_job_entry_point_refuses_bad_requests_with_exit_code_2(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("clean_job", Path(__file__).parent.parent / "jobs" / "clean.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--in", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "rematch.k=0"]) == 2
    assert "rematch.k" in capsys.readouterr().err
