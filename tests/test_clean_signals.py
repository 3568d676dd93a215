"""Issue 34, items 7 and 8: a real Ctrl-C (SIGINT) and a real SIGKILL of a running `otc-ray clean` process, then a
resume whose output is compared byte for byte with an uninterrupted run; Ctrl-C exits 130 with one line and no
traceback, the lock is released and the job's MLflow run is KILLED; a second job started on an output whose lock
is held exits 2. Subprocesses, not threads: the signals are real.

The jobs of one phase run side by side (each process starts its own Ray; on 2 cores a job is mostly start-up, so
four at once take little longer than one): the uninterrupted job with its rival, and the two jobs to stop; then
the two resumes."""
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
pytestmark = [pytest.mark.ray, pytest.mark.slow]


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
    """`otc-ray clean` as a process of its own; its stdout and stderr go to files beside `runs` (pipes that
    nobody reads while several jobs run could fill up and stall a job)."""
    overrides = [f"rematch.{k}={v}" for k, v in REMATCH.items()]
    overrides += ["data.samples_per_shard=12", "data.image_size=32", "ot.iters=20", f"output_dir={runs}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    runs.mkdir(parents=True, exist_ok=True)
    stem = runs / f"console-{len(list(runs.glob('console-*.out')))}"
    with stem.with_suffix(".out").open("w") as stdout, stem.with_suffix(".err").open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "otc_ray", "clean", "--in", str(in_path), "--out", str(out),
                                 *overrides], cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    proc.console = stem                 # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    """Wait for the job: (exit code, stdout, stderr)."""
    rc = proc.wait(timeout=timeout)
    return rc, proc.console.with_suffix(".out").read_text(), proc.console.with_suffix(".err").read_text()


def _stop_after_first_part(jobs: list[tuple[subprocess.Popen, Path, int]]) -> None:
    """Send each (job, its --out, signal) its signal as soon as its first report part is committed (every job
    watched at once, so a job never finishes while another is being waited for)."""
    waiting, deadline = list(jobs), time.monotonic() + 600
    while waiting and time.monotonic() < deadline:
        for job in list(waiting):
            proc, out, sig = job
            if proc.poll() is not None:
                pytest.fail(f"the job ended before it could be stopped: {_finish(proc)}")
            if list(out.glob(f"{PART_PREFIX}*.parquet")):
                proc.send_signal(sig)
                waiting.remove(job)
        time.sleep(0.02)
    assert not waiting, "no report part within 600 s"


@pytest.fixture(scope="module")
def first_phase(tmp_path_factory) -> dict:
    """The uninterrupted job (`whole`), a rival started on its output once it holds the lock, and the jobs stopped
    by Ctrl-C (`int`) and SIGKILL (`kill`) after their first part; all at once. Returns what each left."""
    root = tmp_path_factory.mktemp("signals")
    in_path = _input(root)
    whole = _clean(in_path, root / "whole", root / "runs-whole")
    stopped = {name: _clean(in_path, root / name, root / f"runs-{name}") for name in ("int", "kill")}
    started = [whole, *stopped.values()]
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and whole.poll() is None and not (root / "whole" / LOCK_FILE).exists():
            time.sleep(0.02)
        before = sorted(p.name for p in (root / "whole").iterdir())
        started.append(rival := _clean(in_path, root / "whole", root / "runs-rival"))
        _stop_after_first_part([(stopped["int"], root / "int", signal.SIGINT),
                                (stopped["kill"], root / "kill", signal.SIGKILL)])
        done = {"root": root, "in": in_path, "before": before, "rival": _finish(rival, 300), "whole": _finish(whole)}
        for name, proc in stopped.items():
            done[name] = _finish(proc, 300)
    finally:
        for proc in started:                    # only after a failure: no job of this test outlives it
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    return done


def test_two_racing_clean_processes_one_loses_with_exit_2_and_a_message(first_phase):
    """Processes, not threads: the second starts while the first holds the output's lock; it exits 2 naming the
    holder, writes nothing, and the first finishes with every row accounted for."""
    out = first_phase["root"] / "whole"
    rc, _, err = first_phase["rival"]
    assert rc == 2, err
    assert "is being written by job" in err and "Traceback" not in err
    assert first_phase["whole"][0] == 0, first_phase["whole"]
    assert (out / SUMMARY_FILE).exists() and not (out / LOCK_FILE).exists()
    assert set(first_phase["before"]) <= {p.name for p in out.iterdir()} | {LOCK_FILE}


def test_sigint_and_sigkill_then_resume_give_the_uninterrupted_bytes(first_phase):
    root, in_path = first_phase["root"], first_phase["in"]
    assert first_phase["whole"][0] == 0, first_phase["whole"]

    # Ctrl-C: 130, one line, no traceback, lock released, the MLflow run KILLED; the rerun resumes
    rc, _, err = first_phase["int"]
    assert rc == 130, err
    assert "Traceback" not in err and "stopped by a signal" in err
    assert not (root / "int" / LOCK_FILE).exists() and not (root / "int" / SUMMARY_FILE).exists()
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'runs-int' / 'mlflow.db'}"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("otc-ray").experiment_id])
    assert run.info.status == "KILLED"

    # SIGKILL: nothing runs, the lock stays behind (a dead pid of this host: taken over on the rerun)
    rc, _, _ = first_phase["kill"]
    assert rc == -signal.SIGKILL and (root / "kill" / LOCK_FILE).exists()

    again = {name: _clean(in_path, root / name, root / f"runs-{name}") for name in ("int", "kill")}
    for name, proc in again.items():
        rc, out, err = _finish(proc)
        assert rc == 0, err
        assert "resumed" in out
        assert _files(root / name) == _files(root / "whole"), f"the {name} run resumed to other bytes"
