"""Issue 34, items 7 and 8: a real Ctrl-C (SIGINT) and a real SIGKILL of a running `otc-ray clean` process, then a
resume whose output is compared byte for byte with an uninterrupted run; Ctrl-C exits 130 with one line and no
traceback, the lock is released and the job's MLflow run is KILLED. Subprocesses, not threads: the signals are
real."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otc_ray.pipelines.clean import PART_PREFIX, SUMMARY_FILE
from otc_ray.pipelines.output_lock import LOCK_FILE

from test_clean_determinism import REMATCH, _files, _sample, _write_tar

ROOT = Path(__file__).resolve().parents[1]


def _input(root: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(7)
    folder = root / "in"
    folder.mkdir()
    for s in range(8):
        members = []
        for i in range(24):
            members += _sample(rng, f"s{s}-{i:03d}", f"a {['red', 'blue', 'green'][i % 3]} thing {i % 5}")
        _write_tar(folder / f"{s:05d}.tar", members)
    return folder


def _clean(in_path: Path, out: Path, runs: Path) -> subprocess.Popen:
    overrides = [f"rematch.{k}={v}" for k, v in REMATCH.items()]
    overrides += ["data.samples_per_shard=12", "data.image_size=32", "ot.iters=20", f"output_dir={runs}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "otc_ray", "clean", "--in", str(in_path), "--out", str(out),
                             *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _stop_after_first_part(proc: subprocess.Popen, out: Path, sig: int) -> tuple[int, str]:
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not list(out.glob(f"{PART_PREFIX}*.parquet")):
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be stopped: {proc.communicate()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.ray
@pytest.mark.slow
def test_sigint_and_sigkill_then_resume_give_the_uninterrupted_bytes(tmp_path):
    in_path = _input(tmp_path)
    whole = _clean(in_path, tmp_path / "whole", tmp_path / "runs-whole")
    assert whole.wait(timeout=600) == 0, whole.communicate()

    # Ctrl-C: 130, one line, no traceback, lock released, the MLflow run KILLED; the rerun resumes
    proc = _clean(in_path, tmp_path / "int", tmp_path / "runs-int")
    rc, err = _stop_after_first_part(proc, tmp_path / "int", signal.SIGINT)
    assert rc == 130, err
    assert "Traceback" not in err and "stopped by a signal" in err
    assert not (tmp_path / "int" / LOCK_FILE).exists() and not (tmp_path / "int" / SUMMARY_FILE).exists()
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'runs-int' / 'mlflow.db'}"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("otc-ray").experiment_id])
    assert run.info.status == "KILLED"

    # SIGKILL: nothing runs, the lock stays behind (a dead pid of this host: taken over on the rerun)
    proc = _clean(in_path, tmp_path / "kill", tmp_path / "runs-kill")
    rc, _ = _stop_after_first_part(proc, tmp_path / "kill", signal.SIGKILL)
    assert rc == -signal.SIGKILL and (tmp_path / "kill" / LOCK_FILE).exists()

    for name in ("int", "kill"):
        again = _clean(in_path, tmp_path / name, tmp_path / f"runs-{name}")
        out, err = again.communicate(timeout=600)
        assert again.returncode == 0, err
        assert "resumed" in out
        assert _files(tmp_path / name) == _files(tmp_path / "whole"), f"the {name} run resumed to other bytes"


@pytest.mark.ray
@pytest.mark.slow
def test_two_racing_clean_processes_one_loses_with_exit_2_and_a_message(tmp_path):
    """Processes, not threads: the second starts while the first holds the output's lock; it exits 2 naming the
    holder, writes nothing, and the first finishes with every row accounted for."""
    in_path, out = _input(tmp_path), tmp_path / "out"
    first = _clean(in_path, out, tmp_path / "runs")
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (out / LOCK_FILE).exists():
        time.sleep(0.02)
    before = sorted(p.name for p in out.iterdir())
    second = _clean(in_path, out, tmp_path / "runs2")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2, err
    assert "is being written by job" in err and "Traceback" not in err
    assert first.wait(timeout=600) == 0, first.communicate()
    assert (out / SUMMARY_FILE).exists() and not (out / LOCK_FILE).exists()
    assert set(before) <= {p.name for p in out.iterdir()} | {LOCK_FILE}
