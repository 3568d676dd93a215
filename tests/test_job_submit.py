"""`ray job submit` end to end: a real head (`ray start --head`) on loopback, the repo uploaded with
`--working-dir . --runtime-env infra/runtime_env.yaml`, `jobs/train.py` on the tiny config, then the MLflow
run in the output folder's sqlite store.

The head is private to this test: its own --temp-dir (so `ray.init()` elsewhere in the session never finds it
through /tmp/ray/ray_current_cluster), its own free ports for every listener, random worker ports, and
RAY_AUTH_MODE=disabled for both server and client. It is stopped by killing its process group (`ray stop`
would stop every Ray on the machine, the session's in-process `ray_local` included), then any process left
that belongs to its temp dir, even when the test fails.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray        # starts Ray (make test-fast skips it)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 600
CANARY_TOKEN = "tok-CANARY-7f3a9c1e5b"            # a "secret" in the job's environment: must never be logged
CANARY_AWS_SECRET = "awsS3cretCANARY0d8e2b4a6c"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "OTC_RAY_", "PYTEST_", "MLFLOW_TRACKING"))}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")        # the job's `python` is this venv's
    return env


def _proc_info(pid: int) -> tuple[str, str]:
    """(cmdline, cwd) of a live process, or ("", "") when it is gone or not ours to read."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return cmdline, os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return "", ""


def _processes_of(temp: str) -> list[int]:
    """Processes that belong to the head started with --temp-dir=temp (its cmdline or cwd names the dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            cmdline, cwd = _proc_info(int(entry.name))
            if temp in cmdline or cwd.startswith(temp):
                pids.append(int(entry.name))
    return pids


def _stop_head(proc: subprocess.Popen, temp: str) -> list[int]:
    """SIGTERM the head's process group (raylet, GCS, dashboard stop within a second or two), then SIGKILL the
    group (`ray start --block` itself and the autoscaler monitor ignore SIGTERM), then whatever else names the
    temp dir (workers and the job driver run in sessions of their own)."""
    for sig, wait_s in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 10
    while (left := _processes_of(temp)) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture
def ray_head(tmp_path):
    """(dashboard address, env) of a private head; torn down even when the test fails."""
    temp = tempfile.mkdtemp(prefix="otcrh-", dir="/tmp")        # short: Ray's unix socket paths must fit
    gcs, dash, nm, om, agent, agent_grpc, rt_env, metrics, client = _free_ports(9)
    env = _env()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--object-store-memory=1000000000",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--port={gcs}", f"--dashboard-port={dash}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", "--min-worker-port=0", "--max-worker-port=0",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(tmp_path / "ray_start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{_tail(tmp_path / 'ray_start.log')}"
            try:
                with urllib.request.urlopen(f"{address}/api/jobs/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"head not up after {START_TIMEOUT_S}s:\n" \
                                                f"{_tail(tmp_path / 'ray_start.log')}"
            time.sleep(1)
        yield address, env
    finally:
        left = _stop_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert not _processes_of(temp), f"processes of the test head survived: {left}"


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _ray(env: dict, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_ray_job_submit_trains_and_tracks(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    runtime_env = yaml.safe_load((ROOT / "infra" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(MLFLOW_TRACKING_URI=f"sqlite:///{out}/mlflow.db",   # the job's tracking store
                                   MLFLOW_TRACKING_TOKEN=CANARY_TOKEN, AWS_SECRET_ACCESS_KEY=CANARY_AWS_SECRET)
    runtime_env["env_vars"].pop("AWS_ENDPOINT_URL_S3")
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    submission = f"otc-tiny-{os.getpid()}"

    start = time.monotonic()
    while True:
        submitted = _ray(env, "job", "submit", "--address", address, "--submission-id", submission,
                         "--working-dir", ".", "--runtime-env", str(env_file), "--",
                         "python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml", "--quiet",
                         "train.defense=none", "train.epochs=1", "poison.attack=none", "data.num_train=256",
                         f"output_dir={out}", "eval.num_eval=64", "eval.linear_probe_train=64",
                         "ray.progress_bars=false", timeout=JOB_TIMEOUT_S)
        logs = submitted.stdout + submitted.stderr
        # the head's job API answers before its node's job agent has registered; Ray gives up on the agent after
        # 10 s ("please try again later"), which a loaded machine exceeds: the job was not created, submit again
        if "No available agent to submit job" not in logs or time.monotonic() - start > START_TIMEOUT_S:
            break
        time.sleep(2)
    seconds = time.monotonic() - start
    assert submitted.returncode == 0, f"job failed after {seconds:.0f}s:\n{logs[-6000:]}"
    status = _ray(env, "job", "status", "--address", address, submission, timeout=60)
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    print(f"\nray job submit: tiny job SUCCEEDED in {seconds:.0f}s")

    # The job ran from the uploaded copy, yet wrote where it was told (absolute output_dir, tracking URI env).
    assert "mlflow run" in logs and str(out) in logs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "otc-ray"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("eval/zeroshot_top1", "eval/backdoor_asr", "final/zeroshot_top1", "final/linear_probe_split_acc",
                "train/epoch_clip_loss", "run/seconds"):
        assert key in metrics, key
    assert 0.0 <= metrics["eval/zeroshot_top1"] <= 1.0 and metrics["final/eval_count"] == 64
    assert run.data.params["train.defense"] == "none"

    # Secrets from the job's environment appear in no log line and no file the run wrote.
    for canary in (CANARY_TOKEN, CANARY_AWS_SECRET):
        assert canary not in logs
        hits = [p for p in out.rglob("*") if p.is_file() and canary.encode() in p.read_bytes()]
        assert not hits, f"{canary} written to {hits}"
