"""MLflow outages and interruptions with the real thing: a `mlflow server` process on loopback that is stopped during
a tiny training run and started again later (the run trains on, its metrics are buffered and delivered, and it ends
FINISHED) or not started again (the logger names what it did not deliver; `otc-ray train` ends with one line and exit
3), and `otc-ray train` sent SIGTERM mid-run (the run ends KILLED, not RUNNING, and the process exits 143)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from otc_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
FAST = ["train.defense=none", "poison.attack=none", "data.num_train=256", "eval.num_eval=64",
        "eval.linear_probe_train=64", "ray.progress_bars=false", "train.log_every=1"]      # 4 steps an epoch


def _run_of(client, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
    return runs[0] if runs else None


def _newest_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]) if exp else []
    return runs[0] if runs else None


class Outage(threading.Thread):
    """Stops the server as soon as the run has logged its first training step, and starts it again `down_s` later."""

    def __init__(self, server, experiment: str, name: str, down_s: float):
        super().__init__(daemon=True)
        self.server, self.experiment, self.name, self.down_s = server, experiment, name, down_s
        self.stopped_at_step: int | None = None
        self.restarted = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(self.server.url)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                run = _run_of(client, self.experiment, self.name)
                steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] if run else []
                if steps:
                    self.stopped_at_step = max(steps)
                    self.server.stop()
                    time.sleep(self.down_s)
                    self.server.start()
                    return
                time.sleep(0.2)
        except BaseException as e:                          # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.restarted.set()


@pytest.mark.slow
def test_mlflow_server_outage_mid_run_buffers_and_finishes(ray_local, mlflow_server, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from otc_ray.pipelines.train import run_training

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "name=outage", "train.epochs=2", *FAST,
                             f"tracking.uri={mlflow_server.url}", "tracking.experiment=outage"])
    outage = Outage(mlflow_server, "outage", "outage", down_s=10.0)
    outage.start()
    result = run_training(cfg, progress=False)
    outage.join(timeout=600)
    assert outage.error is None and outage.stopped_at_step is not None, outage.error
    assert outage.restarted.is_set() and mlflow_server.process is not None

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    steps_per_epoch = cfg.data.num_train // cfg.train.batch_size
    logged = sorted(m.step for m in client.get_metric_history(result.run_id, "train/lr"))
    assert logged == list(range(1, 2 * steps_per_epoch + 1)), f"steps lost in the outage: {logged}"
    assert outage.stopped_at_step < 2 * steps_per_epoch, "the server went away only after training"
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "epoch")) == [0, 1]
    assert "final/zeroshot_top1" in run.data.metrics
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err or "tracking" not in printed.err.split("Traceback")[-1][:2000]


def _first_step_logged(db: Path) -> str | None:
    """The id of the run that has logged a training step, read from the sqlite store without writing to it (an
    MLflow client here would race the command's own creation of the store's tables)."""
    import sqlite3

    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT run_uuid FROM metrics WHERE key = 'train/lr' LIMIT 1").fetchone()
        return row[0] if row else None
    except sqlite3.Error:
        return None


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_marks_the_run_killed(tmp_path):
    """`otc-ray train` in its own process, SIGTERM once it has logged a training step: the run ends KILLED and the
    command exits 143 with nothing of it left running."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "otc_ray", "train", "--config", str(TINY), "--quiet", f"output_dir={tmp_path}",
           "name=sigterm", "train.epochs=20", *FAST, f"tracking.uri={uri}", "ray.num_cpus=2"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline, run_id = time.monotonic() + 600, None
        while time.monotonic() < deadline and proc.poll() is None and run_id is None:
            run_id = _first_step_logged(db)                  # read-only: the command creates the store
            time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        assert run_id is not None, "the run never logged a training step"
        assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=300)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out[-3000:]                 # 128 + SIGTERM
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


@pytest.mark.slow
def test_server_stopped_for_good_ends_with_an_error_naming_the_undelivered_after_flush_timeout(mlflow_server):
    """The run's logger (what training and clean end their runs with) against a real server that is stopped and not
    started again: `finish` gives up after about `tracking.flush_timeout_s`, raising TrackingUnavailable that names
    the calls not delivered (the metrics logged in the outage and the run's final status)."""
    from mlflow.tracking import MlflowClient

    from otc_ray.track.mlflow_logger import RunLogger, TrackingUnavailable

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("outage-for-good") or client.get_experiment(
        client.create_experiment("outage-for-good"))
    run_id = client.create_run(exp.experiment_id, run_name="gone").info.run_id
    flush_timeout_s = 6.0
    logger = RunLogger(mlflow_server.url, run_id, flush_timeout_s=flush_timeout_s)
    logger.metrics({"train/loss": 1.0}, step=1)
    assert logger.flush(60), "the server was up: step 1 should have been delivered"
    mlflow_server.stop()
    try:
        logger.metrics({"train/loss": 0.5}, step=2)
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable) as raised:
            logger.finish()
        waited = time.monotonic() - started
    finally:
        mlflow_server.start()                               # the session's server, for the tests after this one
    message = str(raised.value)
    assert run_id in message and f"{flush_timeout_s:.0f} s" in message, message
    assert "metrics at step 2" in message and "status FINISHED" in message, message
    assert flush_timeout_s - 0.5 <= waited <= flush_timeout_s + 30, f"gave up after {waited:.1f} s"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]
    assert client.get_run(run_id).info.status == "RUNNING"   # nothing claimed that was not delivered


@pytest.mark.slow
@pytest.mark.ray
def test_train_cli_with_server_gone_for_good_exits_3_with_one_line(mlflow_server, tmp_path):
    """`otc-ray train` whose tracking server is stopped after the first training step and not started again: the
    run trains to its end, then, after about `tracking.flush_timeout_s`, the command ends with one line naming the
    server, how many calls were not delivered and what to do, exit 3, no traceback, its Ray instance shut down."""
    from mlflow.tracking import MlflowClient

    from test_exit import _lasting_survivors

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "otc_ray", "train", "--config", str(TINY), "--quiet", f"output_dir={tmp_path}",
           "name=gone", "train.epochs=1", *FAST, f"tracking.uri={mlflow_server.url}", "tracking.experiment=gone",
           "tracking.flush_timeout_s=3", "ray.num_cpus=2"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    client, run = MlflowClient(mlflow_server.url), None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            run = run or _newest_run(client, "gone")            # named gone-<start time> by `train`
            if run and client.get_metric_history(run.info.run_id, "train/lr"):
                mlflow_server.stop()
                break
            time.sleep(0.2)
        assert mlflow_server.process is None, "the run logged no training step while the server was up"
        err = proc.communicate(timeout=600)[1].decode(errors="replace")
        survivors = _lasting_survivors(proc.pid)       # a Ray agent may take a moment to notice on a loaded machine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if mlflow_server.process is None:
            mlflow_server.start()                           # the session's server, for the tests after this one
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 3, err[-3000:]
    assert last.startswith(f"otc-ray: error: the MLflow tracking server at {mlflow_server.url} did not come back "
                           f"within 3 s: "), err[-3000:]
    assert run.info.run_id in last and "calls to run" in last and "status FINISHED" in last, last
    assert "Start the server again" in last, last
    assert "Traceback" not in err, err[-3000:]
    assert not survivors, f"left behind: {survivors}"
    assert client.get_run(run.info.run_id).info.status == "RUNNING"   # nothing claimed that was not delivered
