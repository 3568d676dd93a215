"""Shared fixtures: one local Ray instance and one loopback S3 server (moto) per test session."""
from __future__ import annotations

import os
import uuid

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest  # noqa: E402

from otc_ray.config import RayConfig, S3Config  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Every test that uses the `ray_local` fixture is a `ray` test (`make test-fast` runs `-m "not ray"`), marked
    or not; tests that start Ray some other way (a subprocess, a training run) carry `@pytest.mark.ray`."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (4 logical CPUs on 2 cores: room for read tasks, actors and workers)."""
    import ray

    from otc_ray.pipelines.runtime import init_ray

    init_ray(RayConfig(num_cpus=4, object_store_mb=1024, progress_bars=False))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto's threaded server on a free port)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """(S3Config, bucket name): a fresh bucket on the loopback server for each test."""
    from otc_ray.data.storage import s3_filesystem

    cfg = S3Config(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing", retries=2)
    bucket = f"otc-{uuid.uuid4().hex[:12]}"
    s3_filesystem(cfg).mkdir(bucket)
    return cfg, bucket


class MlflowServer:
    """A real `mlflow server` process on loopback (sqlite store, served artifacts) that a test can stop and start
    again on the same port."""

    def __init__(self, folder, port: int):
        self.folder, self.port = folder, port
        self.url = f"http://127.0.0.1:{port}"
        self.process = None

    def start(self, timeout_s: float = 240) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts")]
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.process.returncode}: see {self.folder / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not up within {timeout_s} s")

    def stop(self) -> None:
        """Stop the server and the uvicorn workers it started (its own process group only)."""
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except Exception:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port for the session's tests (`MlflowServer`: stop / start; a
    test that stops it starts it again)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), port)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fashion_train(tmp_path_factory):
    """300 fashion training samples in 3 tar shards (read-only for the tests that share them)."""
    from otc_ray.config import DataConfig
    from otc_ray.data.make import make_shards

    out = tmp_path_factory.mktemp("fashion") / "train"
    make_shards(DataConfig(dataset="fashion", samples_per_shard=100), "train", 300, str(out), "wds", progress=False)
    return out


@pytest.fixture(scope="session")
def fashion_test(tmp_path_factory):
    """100 fashion test samples in one tar shard (read-only)."""
    from otc_ray.config import DataConfig
    from otc_ray.data.make import make_shards

    out = tmp_path_factory.mktemp("fashion") / "test"
    make_shards(DataConfig(dataset="fashion", samples_per_shard=100), "test", 100, str(out), "wds", progress=False)
    return out
