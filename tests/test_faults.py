"""Faults with real components: a Train worker SIGKILLed mid-epoch, an S3 endpoint that goes away (for a while,
for good, or stops answering), and a corrupt shard in the training set."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from otc_ray.config import S3Config, load_config, replace
from otc_ray.data import schema
from otc_ray.data.make import make_shards
from otc_ray.data.ray_io import count_outcomes, load_samples
from otc_ray.data.shards import INFO_FILE, ShardWriter, encode_image, read_info
from otc_ray.data.storage import s3_filesystem
from otc_ray.data.tar_format import iter_tar_samples
from otc_ray.track.mlflow_logger import metric_history, run_metrics
from otc_ray.pipelines.train import run_training

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
FAST = ["train.defense=none", "poison.attack=none", "eval.num_eval=64", "eval.linear_probe_train=64",
        "ray.progress_bars=false"]


# ----------------------------------------------------------------------------------------- (a) SIGKILL
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])      # comm may hold spaces and ')'
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _train_workers() -> list[int]:
    """RayTrainWorker processes of *this* test session's Ray (descendants of this process) — never anyone else's."""
    tree, todo, found = _children(), [os.getpid()], []
    while todo:
        for pid in tree.get(todo.pop(), []):
            todo.append(pid)
            try:
                if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
    return found


class WorkerKiller(threading.Thread):
    """Once the first checkpoint is registered (Ray Train's checkpoint_manager_snapshot.json names it), SIGKILL
    the training worker, then wait for its replacement. Records what it saw so the test can assert on it."""

    def __init__(self, run_dir: Path, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.run_dir, self.deadline = run_dir, time.monotonic() + timeout_s
        self.stop = threading.Event()
        self.killed: int | None = None
        self.checkpoints_at_kill: int | None = None
        self.replacement: int | None = None

    def _registered(self) -> int:
        """Checkpoints the Train controller has registered (a worker that dies now restarts from the newest)."""
        try:
            snapshot = json.loads((self.run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):           # not written yet, or caught mid-write
            return 0
        return len(snapshot.get("checkpoint_results", []))

    def run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            if self.killed is None:
                workers = _train_workers()
                if workers and (count := self._registered()) >= 1:
                    self.checkpoints_at_kill = count
                    os.kill(workers[0], signal.SIGKILL)
                    self.killed = workers[0]
            else:
                fresh = [p for p in _train_workers() if p != self.killed]
                if fresh:
                    self.replacement = fresh[0]
                    return
            time.sleep(0.02)


def test_sigkilled_train_worker_resumes_from_its_checkpoint(ray_local, tmp_path):
    """SIGKILL the RayTrainWorker process during epoch 1 (after epoch 0's checkpoint is registered): Ray Train
    restarts the worker group (max_failures=1), it restores the checkpoint, trains epoch 1 only, and everything
    lands in the one MLflow run. 64 small steps per epoch keep the kill inside epoch 1: the controller registers
    a checkpoint (and writes its snapshot) up to one health-check interval (2 s) after the worker reported it."""
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "name=sigkill", "train.epochs=2", "train.batch_size=8",
                             "train.log_every=16", *FAST])
    killer = WorkerKiller(tmp_path / "ray_results" / "sigkill")
    killer.start()
    try:
        result = run_training(cfg, progress=False)
    finally:
        killer.stop.set()
        killer.join(timeout=10)

    assert killer.killed, "no RayTrainWorker was killed (no registered checkpoint seen while a worker lived)"
    assert killer.checkpoints_at_kill == 1, f"killed after {killer.checkpoints_at_kill} checkpoints, not mid-epoch 1"
    assert killer.replacement and killer.replacement != killer.killed, "the worker group was not restarted"
    epochs = metric_history(result.tracking_uri, result.run_id, "epoch")
    assert sorted(epochs) == [(0, 0.0), (1, 1.0)], f"epoch 0 retrained or epoch 1 missing: {epochs}"
    assert result.metrics["epoch"] == 1.0 and result.checkpoint
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id] and runs[0].info.status == "FINISHED"
    assert "final/zeroshot_top1" in run_metrics(result.tracking_uri, result.run_id)


# ----------------------------------------------------------------------------------------- (b) S3 outages
@pytest.fixture
def own_s3():
    """A moto server of this test's own (the session's stays untouched), restartable on the same port."""
    from moto.server import ThreadedMotoServer

    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)]
    servers[0].start()
    host, port = servers[0].get_host_and_port()

    class Endpoint:
        url = f"http://{host}:{port}"

        def stop(self):
            servers[-1].stop()

        def start(self):
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[-1].start()

    yield Endpoint()
    try:
        servers[-1].stop()
    except Exception:
        pass


def _s3(endpoint: str, **kw) -> S3Config:
    return S3Config(endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing", **kw)


def _samples(n: int, start: int = 0):
    import numpy as np

    image = encode_image(np.full((8, 8, 3), 90, np.uint8), "png")
    return [(f"{i:09d}", image, "png", f"a grey square {i}", {"label": 0}) for i in range(start, start + n)]


class Unavailable(threading.Thread):
    """While the moto server is down, its port answers every request with 503 Service Unavailable (a load
    balancer with no healthy backend) and counts them. After `answers` such answers (None: until `end()`), it closes
    and moto starts again on the port: the outage covers the first attempts of whatever reads, however late it
    starts and however slow the machine is (a count, not a duration)."""

    def __init__(self, own_s3, answers: int | None):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        super().__init__(daemon=True)
        self.own_s3, self.answers, self.requests, self.spent = own_s3, answers, 0, threading.Event()
        outage = self

        class Handler(BaseHTTPRequestHandler):
            def _unavailable(self):
                outage.requests += 1
                if outage.answers is not None and outage.requests >= outage.answers:
                    outage.spent.set()
                body = b"<Error><Code>ServiceUnavailable</Code><Message>no healthy backend</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _unavailable

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        own_s3.stop()
        port = int(own_s3.url.rsplit(":", 1)[1])
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.start()

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.05)

    def end(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            self.own_s3.start()

    def after_answers(self) -> None:
        """Wait for the `answers`-th request, then end the outage (the test's ender thread)."""
        if self.answers is not None and self.spent.wait(timeout=300):
            self.end()


def _read_through_outage(own_s3, path: str, cfg, answers: int | None):
    """Count the shard set at `path` through an outage (`Unavailable`) of the endpoint. The dataset (listing and file
    sizes, on the driver) is built before the outage, so only the Ray read tasks meet it.
    Returns (counts, or the exception raised, and the outage's request count)."""
    ds = load_samples(path, cfg)
    outage = Unavailable(own_s3, answers)
    ender = threading.Thread(target=outage.after_answers, daemon=True)
    ender.start()
    try:
        return count_outcomes(ds), outage.requests
    except Exception as e:                                   # noqa: BLE001 - the control expects the read to fail
        return e, outage.requests
    finally:
        outage.spent.set()
        ender.join(timeout=60)
        outage.end()


def test_s3_outage_for_a_while_is_retried(ray_local, own_s3):
    """The endpoint answers 503 to the Ray read tasks' first 3 requests: with
    `data.s3.retries=8` botocore's retries (standard mode, exponential backoff) inside the read tasks carry it over
    and every sample is read; with `data.s3.retries=1` (no retry) each file the outage hits is counted out as
    `unreadable_file` (named, never lost silently). So the setting reaches the read tasks, and it is what saves the
    read."""
    cfg = dataclasses.replace(load_config(TINY, ["data.samples_per_shard=32"]).data, s3=_s3(own_s3.url, retries=8))
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3_filesystem(cfg.s3).mkdir(bucket)
    path = f"s3://{bucket}/shapes"
    make_shards(cfg, "train", 96, path, "wds", progress=False)

    no_retry = dataclasses.replace(cfg, s3=_s3(own_s3.url, retries=1))
    counted, requests = _read_through_outage(own_s3, path, no_retry, answers=None)
    assert counted == {schema.UNREADABLE_FILE: 3}, f"without retries every shard is counted out: {counted}"
    assert requests >= 1

    counts, requests = _read_through_outage(own_s3, path, cfg, answers=3)
    assert counts == {"ok": 96}, counts
    assert requests >= 3, f"the read tasks did not retry ({requests} requests met the outage)"


@pytest.mark.slow
def test_s3_down_for_good_fails_clearly_and_leaves_no_complete_looking_output(own_s3):
    """Shard 0 is committed, then the endpoint dies: the next commit raises a connection error naming the endpoint
    within the retry budget, and what is left is shard 0 whole, no partial shard 1, and no `_info.json`.
    `make_shards` against the dead endpoint fails the same way, and its output has no `_info.json` either."""
    from botocore.exceptions import EndpointConnectionError

    s3 = _s3(own_s3.url, retries=2)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3_filesystem(s3).mkdir(bucket)
    out = f"s3://{bucket}/half"
    writer = ShardWriter(out, "wds", 4, s3)
    for sample in _samples(4):
        writer.add(*sample)                                  # the 4th add commits shard 00000.tar
    own_s3.stop()
    start = time.monotonic()
    with pytest.raises(EndpointConnectionError, match="127.0.0.1"):
        with writer:
            for sample in _samples(4, start=4):
                writer.add(*sample)
            writer.write_info({"num_samples": 8})
    assert time.monotonic() - start < 30

    cfg = dataclasses.replace(load_config(TINY, ["data.samples_per_shard=8"]).data, s3=s3)
    with pytest.raises(EndpointConnectionError):
        make_shards(cfg, "train", 16, f"s3://{bucket}/never", "wds", progress=False)

    own_s3.start()
    fs = s3_filesystem(s3)
    assert fs.find(f"{bucket}/half") == [f"{bucket}/half/00000.tar"]
    rows = list(iter_tar_samples(io.BytesIO(fs.cat_file(f"{bucket}/half/00000.tar")), "00000.tar"))
    assert [r[schema.ERROR] for r in rows] == [""] * 4
    assert read_info(out, s3) is None and read_info(f"s3://{bucket}/never", s3) is None
    assert not fs.exists(f"{bucket}/never/{INFO_FILE}")


@pytest.mark.slow
def test_s3_endpoint_that_never_answers_times_out():
    """A black hole (TCP accepted, no reply) fails after S3Config.read_timeout per attempt instead of botocore's
    60 s default x every retry layer: the read returns an error in seconds, not a hang."""
    from botocore.exceptions import ReadTimeoutError

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    s3 = _s3(f"http://127.0.0.1:{hole.getsockname()[1]}", retries=1, connect_timeout=1.0, read_timeout=0.25)
    outcome: list[BaseException | bytes] = []

    def read():
        try:
            outcome.append(s3_filesystem(s3).cat_file("bucket/shard.tar"))
        except BaseException as e:                           # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    start = time.monotonic()
    reader.start()
    reader.join(timeout=60)
    hole.close()
    assert not reader.is_alive(), "the read hung on an endpoint that never answers"
    assert isinstance(outcome[0], ReadTimeoutError) and "Read timeout" in str(outcome[0])
    assert time.monotonic() - start < 30


# ----------------------------------------------------------------------------------------- (c) corrupt shard
def test_truncated_training_shard_is_counted_skipped_and_training_completes(ray_local, tmp_path):
    """One of four training shards is cut to 60% of its bytes before the run: its tail samples and a marker row
    are counted as `truncated_shard`, the counts land in MLflow as data/* metrics, and the run finishes."""
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "name=corrupt", "train.epochs=1", *FAST])
    shards = tmp_path / "shards"
    make_shards(cfg.data, "train", cfg.data.num_train, str(shards), "wds", progress=False)
    victim = shards / "00002.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * 0.6)])
    cfg = replace(cfg, data__train=str(shards))

    counts = count_outcomes(load_samples(str(shards), cfg.data))
    assert counts.get(schema.TRUNCATED_SHARD, 0) >= 1 and set(counts) <= {"ok", schema.TRUNCATED_SHARD}
    assert 384 <= counts["ok"] < 512

    result = run_training(cfg, progress=False)
    metrics = run_metrics(result.tracking_uri, result.run_id)
    assert metrics["data/ok"] == counts["ok"]
    assert metrics[f"data/skipped_{schema.TRUNCATED_SHARD}"] == counts[schema.TRUNCATED_SHARD]
    assert "final/zeroshot_top1" in metrics
    from mlflow.tracking import MlflowClient

    assert MlflowClient(result.tracking_uri).get_run(result.run_id).info.status == "FINISHED"
