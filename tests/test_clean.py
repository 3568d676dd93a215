"""The cleaning job: round trips on local disk (CLI, tar, with a poison manifest) and loopback S3 (parquet, action
drop), exact key accounting (input keys = output keys + dropped keys, no duplicates), also when a re-matching actor
dies mid-run, and a clear refusal of a finished output; two jobs racing on one output (one wins the lock, local and
S3), an interrupted job that resumes from its committed shards, the job's own MLflow run, jobs/clean.py = the CLI."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from otc_ray.cli import main
from otc_ray.config import Config, DataConfig, ModelConfig, PoisonConfig, config_from_dict
from otc_ray.data import schema
from otc_ray.data.make import make_shards
from otc_ray.data.ray_io import read_shards
from otc_ray.data.shards import encode_image
from otc_ray.data.storage import s3_filesystem
from otc_ray.data.tar_format import write_tar_shard
from otc_ray.pipelines.clean import REPORT_FILE, SUMMARY_FILE, clean_shards
from otc_ray.rematch.stage import FAULT_BATCH_ENV, FAULT_MARKER_ENV

ROOT = Path(__file__).resolve().parents[1]

N = 160
# an untrained checkpoint: a loose gate threshold so that the round trip has re-captioned samples to account for
REMATCH = {"block_size": 40, "k": 4, "neighbours": 8, "bank_size": 80, "min_actors": 1,
           "max_actors": 1, "actor_num_cpus": 0.5, "gate_threshold": -1.0, "gate_reference": 16}


def _cfg(**sections) -> Config:
    tree = {"data": {"dataset": "shapes", "samples_per_shard": 50}, "rematch": dict(REMATCH), "ot": {"iters": 30}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)


def _bad_samples() -> list[tuple]:
    good_png = encode_image(np.zeros((32, 32, 3), np.uint8), "png")
    return [("bad-corrupt", b"not a png", "png", "a red circle", {}), ("bad-empty", good_png, "png", "   ", {})]


def _keys(path: str, cfg) -> list[str]:
    return [str(k) for k in read_shards(path, cfg.data).select_columns([schema.KEY]).to_pandas()[schema.KEY]]


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
    overrides += [f"rematch.{k}={v}" for k, v in REMATCH.items()] + ["ot.iters=30", f"output_dir={poisoned / 'runs'}"]
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
    assert summary["dropped_by_reason"] == {schema.CORRUPT_IMAGE: 1, schema.EMPTY_CAPTION: 1}
    assert summary["recaptioned"] == sum(o == "recaptioned" for o in report["outcome"]) > 0
    det = summary["detection"]
    assert det["detect_tp"] + det["detect_fn"] == 8 and det["detect_tp"] + det["detect_fp"] == summary["flagged"]
    # the written shards carry the caption used and say where it came from
    out = read_shards(out_path, _cfg().data).to_pandas()
    by_key = dict(zip(report["key"], zip(report["outcome"], report["caption_used"], report["caption"])))
    for key, raw, meta in zip(out[schema.KEY], out[schema.CAPTION_RAW], out[schema.META]):
        outcome, used, original = by_key[key]
        assert raw.decode() == used
        assert (json.loads(meta).get("clean", {}).get("original_caption") == original) == (outcome == "recaptioned")
    # the job is an MLflow run of its own: counts and detection as metrics, the report as an artifact
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{poisoned / 'runs' / 'mlflow.db'}"
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("otc-ray").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "clean" and run.info.run_id in printed
    assert run.data.metrics["clean_total"] == N + 2 and run.data.metrics["clean_detect_tp"] == det["detect_tp"]
    assert {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "clean")} == {
        f"clean/{REPORT_FILE}", f"clean/{SUMMARY_FILE}"}
    # a second run into the finished folder is refused with one line, before any work
    assert main(["clean", "--in", in_path, "--out", out_path, *overrides]) == 2
    assert "already holds a finished cleaning" in capsys.readouterr().err


def test_s3_round_trip_parquet_with_drop_survives_an_actor_death(ray_local, s3_bucket, tmp_path):
    """Loopback S3, parquet, action drop; a re-matching actor exits on its 2nd batch (once, marked by a file):
    Ray restarts it and retries the batch, and the accounting is still exact."""
    s3, bucket = s3_bucket
    cfg = _cfg(data={"s3": {"endpoint_url": s3.endpoint_url, "access_key_id": "testing",
                            "secret_access_key": "testing", "retries": 2}},
               rematch={"gate": "none", "alpha": 1.0, "action": "drop", "block_size": 20})
    in_path, out_path = f"s3://{bucket}/train", f"s3://{bucket}/clean"
    make_shards(cfg.data, "train", N, in_path, "parquet", progress=False)
    fs = s3_filesystem(s3)
    fs.pipe_file(f"{bucket}/clean/clean-0123456789abcdef.parquet", b"not this job's")   # no _clean_job.json beside it
    with pytest.raises(ValueError, match="not this job's"):
        clean_shards(in_path, out_path, cfg)
    fs.rm(f"{bucket}/clean/clean-0123456789abcdef.parquet")
    marker = tmp_path / "actor-died"
    env = {"runtime_env": {"env_vars": {FAULT_BATCH_ENV: "2", FAULT_MARKER_ENV: str(marker)}}}
    summary = clean_shards(in_path, out_path, cfg, ray_remote_args=env)
    assert marker.exists(), "the fault hook must have killed an actor during the run"
    assert summary.orphans_removed == 0
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
    batch = {schema.KEY: np.asarray([f"k{i}" for i in range(n)], dtype=object),
             schema.IMAGE_BYTES: np.asarray([png] * n, dtype=object), schema.IMAGE_EXT: np.asarray(["png"] * n, dtype=object),
             schema.CAPTION: np.asarray([f"caption {i}" for i in range(n)], dtype=object),
             schema.META: np.asarray([b"{}"] * n, dtype=object), schema.ERROR: np.asarray([""] * n, dtype=object),
             schema.SOURCE: np.asarray(["in/00000.tar"] * n, dtype=object), schema.ROW: np.arange(n),
             schema.CAPTION_USED: np.asarray([f"caption {i}" for i in range(n)], dtype=object),
             schema.SOURCE_KEY: np.asarray([f"k{i}" for i in range(n)], dtype=object),
             schema.RECAPTIONED: np.zeros(n, bool), schema.FLAGGED: np.zeros(n, bool), schema.WEIGHT: np.ones(n, np.float32),
             **{c: np.zeros(n, np.float32) for c in (schema.OWN_SCORE, schema.BEST_SCORE, schema.SUSPICION, schema.GATE_Z)}}
    first = write_batch(batch, str(tmp_path), "wds", S3Config())
    batch[schema.WEIGHT] = np.asarray([1, 0, 1, 0], np.float32)                # the retry drops two rows
    second = write_batch(batch, str(tmp_path), "wds", S3Config())
    shards = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("_"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("_part-")) == [
        "_part-" + shards[0].replace(".tar", ".parquet")]                  # its report rows, committed after it
    assert len(shards) == 1 and set(first["shard"]) == {shards[0]}
    assert second["outcome"].tolist() == ["kept", "dropped", "kept", "dropped"]
    from otc_ray.data.tar_format import iter_tar_samples

    with open(tmp_path / shards[0], "rb") as f:
        assert [row[schema.KEY] for row in iter_tar_samples(f, shards[0])] == ["k0", "k2"]


def test_job_entry_point_is_otc_ray_clean(tmp_path):
    """jobs/clean.py has no parser of its own: its help is `otc-ray clean`'s, and a bad request exits 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = [sys.executable, str(ROOT / "jobs" / "clean.py")]
    helps = [subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, timeout=120)
             for cmd in (job, [sys.executable, "-m", "otc_ray", "clean"])]
    assert helps[0].returncode == helps[1].returncode == 0 and helps[0].stdout == helps[1].stdout
    assert "--manifest" in helps[0].stdout and "--action" in helps[0].stdout
    bad = subprocess.run(job + ["--in", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "rematch.k=0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "rematch.k" in bad.stderr


# ----------------------------------------------------------------------------------------- concurrent / resumed jobs
def _fresh_copy(src: Path, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


@pytest.fixture(scope="module")
def raced(ray_local, poisoned, tmp_path_factory) -> dict:
    """Two jobs (the second with action drop) started together on one --out: {"in", "out", "outcomes" (job name ->
    CleanSummary or the exception it raised), "cfgs" (job name -> its Config)}. The winner's finished output is
    also the interrupted test's starting point (one clean job fewer)."""
    import threading

    root = tmp_path_factory.mktemp("raced")
    in_path, out_path = _fresh_copy(poisoned / "train", root / "in"), str(root / "out")
    cfgs = {"a": _cfg(), "b": _cfg(rematch={"action": "drop"})}
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def job(name: str) -> None:
        barrier.wait()
        try:
            outcomes[name] = clean_shards(in_path, out_path, cfgs[name])
        except Exception as e:                               # noqa: BLE001 - the loser's error is the result
            outcomes[name] = e

    threads = [threading.Thread(target=job, args=(name,)) for name in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return {"in": in_path, "out": out_path, "outcomes": outcomes, "cfgs": cfgs}


def test_two_clean_jobs_racing_on_one_out_cannot_both_write(raced):
    """Two jobs start together on one --out: exactly one takes the output's lock and finishes with exact
    accounting; the other is refused before it reads or deletes anything, naming the job that holds the folder."""
    from otc_ray.pipelines.output_lock import LOCK_FILE, OutputLocked

    in_path, out_path, outcomes = raced["in"], raced["out"], raced["outcomes"]
    errors = [v for v in outcomes.values() if isinstance(v, Exception)]
    done = [v for v in outcomes.values() if not isinstance(v, Exception)]
    assert len(errors) == 1 and len(done) == 1, outcomes
    assert isinstance(errors[0], OutputLocked) and "is being written by job" in str(errors[0])
    report = pq.read_table(Path(out_path) / REPORT_FILE).to_pydict()
    _check_accounting(in_path, out_path, _cfg(), report)
    assert done[0].total == N + 2 and not (Path(out_path) / LOCK_FILE).exists()


def _race(locks, display: str):
    """Every lock of `locks` acquires at once (a barrier, one thread each): exactly one wins and every loser's
    OutputLocked names the winner's job. Returns the winning lock."""
    import threading

    from otc_ray.pipelines.output_lock import OutputLocked

    results: list[object] = [None] * len(locks)
    barrier = threading.Barrier(len(locks))

    def take(i: int) -> None:
        barrier.wait()
        try:
            locks[i].acquire(display)
            results[i] = "held"
        except OutputLocked as e:
            results[i] = e

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(locks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results.count("held") == 1, results
    winner = locks[results.index("held")]
    assert all(f"job {winner.job_id}" in str(r) for r in results if r != "held"), results
    return winner


def test_a_live_job_s_lock_refuses_a_second_job_on_s3(s3_bucket):
    """On S3 the lock is a conditional PUT: of eight racing acquirers exactly one wins; the rest name it."""
    from otc_ray.pipelines.output_lock import LOCK_FILE, OutputLock

    s3, bucket = s3_bucket
    fs = s3_filesystem(s3)
    locks = [OutputLock(s3_filesystem(s3), f"{bucket}/out", "clean") for _ in range(8)]
    winner = _race(locks, f"s3://{bucket}/out")
    winner.release()
    assert not fs.exists(f"{bucket}/out/{LOCK_FILE}")


def test_racing_acquirers_on_local_disk_always_name_the_winner(tmp_path):
    """Locally the lock is a hard link of a fully written file: in every one of 25 rounds of eight racing acquirers
    exactly one wins and every loser reads the winner's whole record (never an empty, half-created lock)."""
    from fsspec.implementations.local import LocalFileSystem

    from otc_ray.pipelines.output_lock import LOCK_FILE, OutputLock

    root = str(tmp_path / "out")
    for _ in range(25):
        winner = _race([OutputLock(LocalFileSystem(), root, "clean") for _ in range(8)], root)
        winner.release()
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [], "the lock and staged files are gone"
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_interrupted_clean_resumes_from_its_committed_shards(raced, tmp_path):
    """A job killed after committing some shards and their report parts (its lock left behind by a dead process of
    this host): readers refuse the folder; a rerun with other settings is refused; a rerun with the same settings
    takes over the lock, keeps the committed shards untouched, cleans only the rest, and accounts for every row."""
    import socket

    import pyarrow.compute as pc
    from fsspec.implementations.local import LocalFileSystem

    from otc_ray.data.shards import ShardSetError, list_shards
    from otc_ray.pipelines.clean import PART_PREFIX, _commit_part
    from otc_ray.pipelines.output_lock import LOCK_FILE

    # the race's finished output (a copy: the race's own test reads it too) is the first, complete run
    [(winner, first)] = [(k, v) for k, v in raced["outcomes"].items() if not isinstance(v, Exception)]
    cfg = raced["cfgs"][winner]
    in_path, out_path = raced["in"], _fresh_copy(Path(raced["out"]), tmp_path / "out")
    out = Path(out_path)
    report = pq.read_table(out / REPORT_FILE)
    # the state a kill leaves: marker, report and info not yet written; parts for the first two shards only
    for name in (SUMMARY_FILE, REPORT_FILE, "_info.json"):
        (out / name).unlink()
    shards = sorted({s for s in report.column("shard").to_pylist() if s})
    kept = shards[:2]
    for shard in kept:                                      # what write_batch committed after each shard
        part = report.filter(pc.equal(report.column("shard"), shard))
        _commit_part(LocalFileSystem(), out_path, shard,
                     {name: np.asarray(part.column(name).to_pylist()) for name in part.column_names})
    resumed_rows = sum(s in kept for s in report.column("shard").to_pylist())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(json.dumps({"job": "clean", "job_id": "deadbeef0000", "pid": int(dead.stdout),
                                             "host": socket.gethostname(), "started": "earlier"}))
    stamps = {s: (out / s).stat().st_mtime_ns for s in kept}

    with pytest.raises(ShardSetError, match="unfinished cleaning output"):
        list_shards(out_path, "auto", _cfg().data.s3)
    with pytest.raises(ValueError, match="interrupted cleaning with other settings.*rematch"):
        clean_shards(in_path, out_path, _cfg(rematch={"k": 3}))

    second = clean_shards(in_path, out_path, cfg)
    assert second.resumed == resumed_rows > 0 and second.total == first.total == N + 2
    assert {s: (out / s).stat().st_mtime_ns for s in kept} == stamps, "a committed shard was written again"
    final = pq.read_table(out / REPORT_FILE).to_pydict()
    _check_accounting(in_path, out_path, _cfg(), final)
    assert not list(out.glob(f"{PART_PREFIX}*")) and not (out / LOCK_FILE).exists()
