"""Secrets never reach Ray or MLflow: a training run whose config carries canary S3 keys and a tracking URI with a
canary password (a real `mlflow server`, shards on a loopback S3) leaves no canary in what the trainer hands Ray
(the train function's config, the datasets with their read tasks' filesystem), in Ray's session folder (every
log of every worker, the driver's, the GCS's), in Ray's job table, in the Train run state, in the MLflow store or
on the console. The scan is checked to find a canary that a Ray task does print."""
from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import pytest

from otc_ray.config import flatten, load_config
from otc_ray.credentials import move_secrets_to_env, redact_uri, split_uri_credentials

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
KEY_ID = "AKIACANARY" + uuid.uuid4().hex[:10].upper()
SECRET = "canary-secret-" + uuid.uuid4().hex
PASSWORD = "canary-pw-" + uuid.uuid4().hex[:12]
CANARIES = (KEY_ID, SECRET, PASSWORD)


def test_uri_credentials_are_split_and_redacted():
    assert split_uri_credentials("https://bob:p%40ss@mlflow.x:5000/a") == ("https://mlflow.x:5000/a", "bob", "p@ss")
    assert split_uri_credentials("sqlite:////abs/mlflow.db") == ("sqlite:////abs/mlflow.db", "", "")
    assert redact_uri("https://bob:hunter2@mlflow.x/") == "https://bob:***@mlflow.x/"
    assert redact_uri("http://tok3n@h:1") == "http://***@h:1" and redact_uri("http://h:1/x") == "http://h:1/x"


def test_config_secrets_move_to_the_environment(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")                        # restored (or removed) after the test
    cfg = load_config(TINY, [f"data.s3.access_key_id={KEY_ID}", f"data.s3.secret_access_key={SECRET}",
                             f"tracking.uri=https://alice:{PASSWORD}@mlflow.internal"])
    assert flatten(cfg)["tracking.uri"] == "https://alice:***@mlflow.internal"       # MLflow params, if ever
    public = move_secrets_to_env(cfg)
    assert (public.data.s3.access_key_id, public.data.s3.secret_access_key) == ("", "")
    assert public.tracking.uri == "https://mlflow.internal"
    assert not any(c in repr(public) + str(flatten(public, redact=False)) for c in CANARIES)
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == (KEY_ID, SECRET)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", PASSWORD)
    assert move_secrets_to_env(public) == public

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{PASSWORD}x@mlflow.env")  # from the environment too
    move_secrets_to_env(load_config(TINY))
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.env"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD + "x"


def _found(canaries, blob: bytes) -> list[str]:
    return [c for c in canaries if c.encode() in blob]


def _session_files() -> bytes:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return b"".join(p.read_bytes() for p in session.rglob("*") if p.is_file() and not p.is_symlink()
                    and p.stat().st_size < (256 << 20))


@pytest.mark.slow
def test_no_secret_reaches_ray_mlflow_or_the_console(ray_local, mlflow_server, s3_endpoint, tmp_path, monkeypatch,
                                                      capfd):
    import ray
    from mlflow.tracking import MlflowClient

    from otc_ray.config import S3Config
    from otc_ray.data.make import make_shards
    from otc_ray.data.storage import s3_filesystem
    from otc_ray.pipelines.train import run_training

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, os.environ.get(name, ""))   # the run moves canaries here; restored afterwards
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the Train run state the dashboard shows (driver side)
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    s3 = S3Config(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    s3_filesystem(s3).mkdir(bucket)
    data_cfg = load_config(TINY).data
    for split, n in (("train", 256), ("test", 128)):
        make_shards(dataclasses.replace(data_cfg, s3=s3), split, n, f"s3://{bucket}/{split}", "wds", progress=False)

    host = mlflow_server.url.split("://")[1]
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "name=canary", "train.epochs=1", "train.defense=none",
                             "poison.attack=none", "eval.num_eval=64", "eval.linear_probe_train=64",
                             "ray.progress_bars=false", f"data.train=s3://{bucket}/train",
                             f"data.test=s3://{bucket}/test", f"data.s3.endpoint_url={s3_endpoint}",
                             f"data.s3.access_key_id={KEY_ID}", f"data.s3.secret_access_key={SECRET}",
                             f"tracking.uri=http://canary-user:{PASSWORD}@{host}", "tracking.experiment=canary"])
    import otc_ray.pipelines.train as train_pipeline

    shipped: list[bytes] = []                               # what the trainer hands Ray: the streams and the loop
    build_trainer = train_pipeline.build_trainer

    def tap(datasets, loop):
        shipped.append(ray.cloudpickle.dumps((datasets, loop)))
        return build_trainer(datasets, loop)

    monkeypatch.setattr(train_pipeline, "build_trainer", tap)
    assert _found(CANARIES[:2], ray.cloudpickle.dumps(cfg)) == list(CANARIES[:2])   # the scan sees pickled keys
    result = run_training(cfg, progress=False)
    assert len(shipped) == 1 and not _found(CANARIES, shipped[0]), "a secret is in the train function's arguments"
    assert result.checkpoint and result.tracking_uri == mlflow_server.url
    # the moto server accepts any key: the run used the moved keys from this process's environment
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET

    control = "canary-control-" + uuid.uuid4().hex
    ray.get(ray.remote(lambda: print(control, flush=True)).options(num_cpus=0).remote())

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["tracking.uri"] == mlflow_server.url
    stored = b"".join(p.read_bytes() for p in mlflow_server.folder.rglob("*") if p.is_file() and p.name != "server.log")
    assert not _found(CANARIES, stored), "a secret is stored by the MLflow server"

    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    runs = ray.get(actor.get_train_runs.remote())
    attempts = ray.get(actor.get_train_run_attempts.remote())
    assert any(r.name == "canary" for r in runs.values()), "no Train run state to look into"
    state = (repr(runs) + repr(attempts) + "".join(r.model_dump_json() for r in runs.values())).encode()
    assert not _found(CANARIES, state), "a secret is in the Train run state"
    storage = b"".join(p.read_bytes() for p in (tmp_path / "ray_results").rglob("*") if p.is_file())
    assert storage and not _found(CANARIES, storage), "a secret is in the run's storage (checkpoints, snapshots)"

    jobs = repr(ray._private.state.jobs()).encode()
    assert jobs and not _found(CANARIES, jobs), "a secret is in Ray's job table"

    import time

    deadline = time.monotonic() + 30
    while not _found([control], logs := _session_files()) and time.monotonic() < deadline:
        time.sleep(0.5)                                    # worker logs are flushed to the session folder
    assert _found([control], logs), "the scan of Ray's session folder does not see what a task prints"
    assert not _found(CANARIES, logs), "a secret is in Ray's session folder (logs of the driver, workers, GCS)"

    out = capfd.readouterr()
    assert not _found(CANARIES, (out.out + out.err).encode()), "a secret was printed"


@pytest.mark.slow
def test_clean_write_tasks_and_actors_get_no_secret(ray_local, s3_endpoint, tmp_path, monkeypatch):
    """A cleaning job whose config carries canary S3 keys (input and output on a loopback S3): every function and
    argument the job hands Ray Data for its tasks and actors (read, decode, re-matching actors, write tasks), and
    what Ray keeps of them (its actor and job tables, its session folder's logs) hold no canary; the shards are still
    written, with the keys the job moved to this process's environment."""
    import numpy as np
    import ray

    from otc_ray.config import S3Config
    from otc_ray.data.storage import s3_filesystem
    from otc_ray.pipelines.clean import clean_shards

    from test_clean_determinism import _cfg, _sample, _write_tar

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, os.environ.get(name, ""))   # the job moves the canaries here; restored afterwards
    s3 = S3Config(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    bucket = f"clean-secrets-{uuid.uuid4().hex[:8]}"
    fs = s3_filesystem(s3)
    fs.mkdir(bucket)
    rng = np.random.default_rng(5)
    for s in range(2):
        local = tmp_path / f"{s:05d}.tar"
        _write_tar(local, [m for i in range(12) for m in _sample(rng, f"s{s}-{i:02d}", f"a red thing {i % 4}")])
        fs.put(str(local), f"{bucket}/in/{local.name}")
    cfg = dataclasses.replace(_cfg(), data=dataclasses.replace(
        _cfg().data, s3=dataclasses.replace(s3, access_key_id=KEY_ID, secret_access_key=SECRET)))

    shipped: list[bytes] = []                               # what the job hands Ray Data for its tasks and actors
    for method in ("map_batches", "map", "flat_map", "filter"):
        original = getattr(ray.data.Dataset, method)

        def tap(self, *args, _original=original, **kwargs):
            shipped.append(ray.cloudpickle.dumps((args, kwargs)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ray.data.Dataset, method, tap)
    assert _found(CANARIES[:2], ray.cloudpickle.dumps(cfg.data.s3)) == list(CANARIES[:2])  # the scan sees keys

    summary = clean_shards(f"s3://{bucket}/in", f"s3://{bucket}/out", cfg)
    written = [p for p in fs.ls(f"{bucket}/out") if p.rsplit("/", 1)[-1].startswith("clean-")]
    assert summary.kept + summary.recaptioned == 24 and written, fs.ls(f"{bucket}/out")
    assert shipped, "the tap saw nothing handed to Ray Data"
    assert not any(_found(CANARIES, blob) for blob in shipped), "a secret is in a task's or actor's arguments"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET     # the keys went to the environment instead
    actors = ray._private.state.actors()                     # the GCS actor table: the job's actors, their specs
    assert actors and not _found(CANARIES, repr(actors).encode()), "a secret is in Ray's actor table"
    jobs = repr(ray._private.state.jobs()).encode()
    assert jobs and not _found(CANARIES, jobs), "a secret is in Ray's job table (its runtime env)"
    assert not _found(CANARIES, _session_files()), "a secret is in Ray's session folder (logs, worker output)"
