"""Clean exits: CLI commands run as a user runs them (a fresh process each, two at a time so that each runs under
the other's load) exit 0 after success, print no native abort or traceback, and leave no process of theirs behind
(a local Ray instance, an MLflow or moto server included): data make / inspect, poison, train, eval, compare, clean
and a seconds-long demo. A real Ctrl-C (SIGINT to the command's process) mid-work exits 130 with one line and no
traceback, nothing of it left running; SIGTERM likewise with 143. A command that fails after its local Ray started
exits 2 with one line and leaves no Ray process behind. `exit_process` itself runs the atexit hooks and keeps the
status it is given."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from otc_ray.pipelines.clean import SUMMARY_FILE

from test_clean_determinism import REMATCH

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _survivors(session: int) -> list[str]:
    """Command lines of live processes in the session a command ran in (its children, Ray's daemons, ...)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session and fields[0] != "Z":
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120])
        except (OSError, IndexError, ValueError):
            continue
    return out


def _lasting_survivors(session: int, grace_s: float = 10.0) -> list[str]:
    """`_survivors` still alive `grace_s` after the command ended (a Ray worker may take a moment to notice its
    raylet is gone on a loaded machine; one left behind is alive for good)."""
    deadline = time.monotonic() + grace_s
    while (left := _survivors(session)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _run_together(commands: list[list[str]], cwd: Path, timeout_s: float = 600,
                  env: dict | None = None) -> list[tuple[int, str, list[str]]]:
    """Start every command at once (each in its own session, `env` added to its environment); (status, stderr,
    survivors) per command."""
    procs = [subprocess.Popen([sys.executable, "-m", "otc_ray", *cmd], cwd=cwd, env=_env() | (env or {}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for cmd in commands]
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout_s)
        results.append((proc.returncode, err.decode(errors="replace"), _lasting_survivors(proc.pid)))
    return results


def _check(results, commands) -> None:
    for (status, err, survivors), cmd in zip(results, commands):
        assert status == 0, f"{cmd[0]} exited {status}: {err[-3000:]}"
        assert "terminate called" not in err and "Aborted" not in err, err[-3000:]
        assert "Traceback" not in err, f"{cmd[0]} printed a traceback: {err[-3000:]}"
        assert not survivors, f"{cmd[0]} left processes behind: {survivors}"


@pytest.mark.slow
def test_data_make_and_poison_exit_0_side_by_side(tmp_path):
    data = tmp_path / "clean"
    first = [["data", "make", "--dataset", "shapes", "--num", "300", "--shard-size", "100", "--out", str(data),
              "--quiet"],
             ["data", "make", "--dataset", "shapes", "--num", "300", "--split", "test", "--out", str(tmp_path / "test"),
              "--quiet"]]
    _check(_run_together(first, tmp_path), first)
    second = [["poison", "--in", str(data), "--out", str(tmp_path / f"poisoned-{i}"), "--attack", "backdoor",
               "--target", "circle", "--count", "10", "--seed", str(i), "--quiet"] for i in range(2)]
    _check(_run_together(second, tmp_path), second)
    assert all((tmp_path / f"poisoned-{i}" / "_poison_manifest.parquet").is_file() for i in range(2))


@pytest.mark.slow
@pytest.mark.ray
def test_ray_commands_exit_0_and_leave_no_ray_behind(tmp_path):
    """`data inspect` starts a local Ray instance in its process: after it exits 0, no raylet, GCS or worker of it
    is left; a `poison` runs beside it. A usage error still exits 2."""
    from otc_ray.config import DataConfig
    from otc_ray.data.make import make_shards

    data = tmp_path / "clean"           # made in this process: `data make`'s own exit is the test above
    make_shards(DataConfig(dataset="shapes"), "train", 200, str(data), "wds", progress=False)
    both = [["data", "inspect", str(data), "--no-sheet", "ray.num_cpus=2", "ray.progress_bars=false"],
            ["poison", "--in", str(data), "--out", str(tmp_path / "poisoned"), "--attack", "backdoor", "--target",
             "circle", "--count", "5", "--quiet"]]
    _check(_run_together(both, tmp_path), both)
    [(status, err, survivors)] = _run_together([["poison", "--in", str(data)]], tmp_path)
    assert status == 2 and "--out" in err and not survivors


def test_exit_process_runs_atexit_hooks_and_keeps_the_status(tmp_path):
    marker = tmp_path / "atexit-ran"
    code = (f"import atexit, pathlib; atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes')); "
            "print('done', flush=False); from otc_ray.process_exit import exit_process; exit_process(3)")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == b"done\n" and marker.read_text() == "yes"


TINY = ["--config", "tiny", "data.num_train=128", "data.num_test=64", "data.samples_per_shard=64", "train.epochs=1",
        "poison.attack=none", "eval.num_eval=64", "eval.linear_probe_train=64", "ray.num_cpus=2",
        "ray.progress_bars=false"]


def test_the_exit_waits_for_set_up_threads_before_ray_shuts_down():
    """`side_by_side` names its threads so that `exit_process` can let them end first (a signal leaves them inside
    Ray calls, and Ray's core ends the process with status 1 when one touches it after `ray.shutdown()`)."""
    import threading

    from otc_ray.pipelines.runtime import side_by_side
    from otc_ray.process_exit import SETUP_THREAD_PREFIX, setup_threads_ended

    release, names = threading.Event(), []

    def task():
        names.append(threading.current_thread().name)
        release.wait(10)
        return 1

    caller = threading.Thread(target=lambda: side_by_side(task, task))
    caller.start()
    deadline = time.monotonic() + 10
    while len(names) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(names) == [f"{SETUP_THREAD_PREFIX}-0", f"{SETUP_THREAD_PREFIX}-1"]
    assert not setup_threads_ended(0.2)                  # still running: the exit would skip ray.shutdown()
    release.set()
    assert setup_threads_ended(10)
    caller.join(10)


def _tiny_shards(folder: Path) -> tuple[Path, Path]:
    """Shapes train (96) and test (64) shards, made in this process (`data make`'s own exit is tested above)."""
    from otc_ray.config import DataConfig
    from otc_ray.data.make import make_shards

    make_shards(DataConfig(dataset="shapes", samples_per_shard=48), "train", 96, str(folder / "train"), "wds",
                progress=False)
    make_shards(DataConfig(dataset="shapes", samples_per_shard=64), "test", 64, str(folder / "test"), "wds",
                progress=False)
    return folder / "train", folder / "test"


@pytest.mark.slow
@pytest.mark.ray
def test_train_eval_compare_clean_and_demo_exit_0_and_leave_nothing_behind(tmp_path):
    """The commands that start Ray, train or track, on a tiny setting, in two rounds of processes side by side
    (train beside the demo, which needs nothing of it; then eval, compare and clean, which read train's checkpoint
    and store): each exits 0 with no traceback and nothing of it left running (its Ray instance, its MLflow store's
    helpers)."""
    train, test = _tiny_shards(tmp_path)
    runs = tmp_path / "runs"
    data = [f"data.train={train}", f"data.test={test}", f"output_dir={runs}"]
    steps = [[["train", *TINY, *data, "name=exit", "train.defense=none", "--quiet"],
              ["demo", "--defenses", "none", *TINY, f"output_dir={tmp_path / 'demo'}", "poison.attack=backdoor",
               "poison.count=8"]],
             [["eval", "--checkpoint", str(runs / "latest-checkpoint"), "--data", str(test), "--num-eval", "64",
               *TINY, f"output_dir={runs}"],
              ["compare", "--config", "tiny", f"output_dir={runs}", "--no-plots"],
              ["clean", "--in", str(train), "--out", str(tmp_path / "cleaned"), "--checkpoint",
               str(runs / "latest-checkpoint"), *TINY, f"output_dir={runs}", "data.samples_per_shard=48",
               *[f"rematch.{k}={v}" for k, v in REMATCH.items()]]]]
    for commands in steps:
        _check(_run_together(commands, tmp_path), commands)
    assert (tmp_path / "cleaned" / SUMMARY_FILE).is_file() and list((tmp_path / "cleaned").glob("clean-*.tar"))


@pytest.mark.slow
@pytest.mark.ray
def test_train_and_clean_failing_after_ray_started_leave_no_ray_behind(tmp_path):
    """`train` on a shard set without one usable sample and `clean` with a checkpoint that is not a state dict fail
    after their local Ray instance started (its session folder exists under RAY_TMPDIR): one line, exit 2, no
    traceback, no raylet, GCS or worker of it left."""
    import shutil
    import tarfile
    import tempfile

    train, test = _tiny_shards(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "shard-00000.tar", "w") as tar:
        for name, data in (("k0.png", b"not an image"), ("k0.txt", b"a circle")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    (tmp_path / "broken.pt").write_bytes(b"not a state dict")
    commands = [["train", *TINY, f"data.train={bad}", f"data.test={test}", f"output_dir={tmp_path / 'runs'}",
                 "train.defense=none", "--quiet"],
                ["clean", "--in", str(train), "--out", str(tmp_path / "cleaned"), "--checkpoint",
                 str(tmp_path / "broken.pt"), *TINY, f"output_dir={tmp_path / 'runs'}"]]
    ray_tmp = tempfile.mkdtemp(prefix="otc-ray-", dir="/tmp")       # short: Ray's socket paths live under it
    try:
        results = _run_together(commands, tmp_path, env={"RAY_TMPDIR": ray_tmp})
        sessions = list(Path(ray_tmp).glob("ray/session_2*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert len(sessions) == 2, f"both commands should have started Ray: {sessions}"
    for (status, err, survivors), expected in zip(results, ("no usable samples in", "is not a weights-only")):
        lines = err.strip().splitlines()
        assert status == 2 and lines[-1].startswith("otc-ray: error: ") and expected in lines[-1], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert not survivors, f"left behind after a failure: {survivors}"


def _started(marker) -> bool:
    try:
        return bool(marker())
    except OSError:
        return False


def _interrupt_when(jobs: list[tuple[list[str], Callable[[], bool], int]], cwd: Path,
                    timeout_s: float = 600) -> list[tuple[int, str, list[str]]]:
    """Start every job (`otc-ray CMD`, marker, signal) at once, each in its own session; send a job its one signal
    (SIGINT: what Ctrl-C sends) as soon as its `marker()` is true (every job watched at once); (status, stderr,
    survivors) per job. stderr goes to a file: a pipe nobody reads while the others are watched could fill up."""
    procs, first = [], len(list(cwd.glob("interrupted-*.err")))
    try:
        for i, (cmd, _, _) in enumerate(jobs, first):
            with open(cwd / f"interrupted-{i}.err", "wb") as err:
                procs.append(subprocess.Popen([sys.executable, "-m", "otc_ray", *cmd], cwd=cwd, env=_env(),
                                              stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
        waiting, deadline = list(range(len(jobs))), time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            for i in list(waiting):
                cmd, marker, signum = jobs[i]
                if procs[i].poll() is not None:
                    err = (cwd / f"interrupted-{first + i}.err").read_text(errors="replace")
                    pytest.fail(f"{cmd[0]} ended before it could be interrupted: {err[-3000:]}")
                if _started(marker):
                    procs[i].send_signal(signum)
                    waiting.remove(i)
            time.sleep(0.2)
        assert not waiting, f"never ready to be interrupted within {timeout_s} s: {[jobs[i][0][0] for i in waiting]}"
        results = []
        for i, proc in enumerate(procs):
            proc.wait(timeout=300)
            results.append((proc.returncode, (cwd / f"interrupted-{first + i}.err").read_text(errors="replace"),
                            _lasting_survivors(proc.pid)))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _check_interrupted(result, name: str, expected: int = 130) -> None:
    status, err, survivors = result
    assert status == expected, f"{name} exited {status} after a signal: {err[-3000:]}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, f"{name}: {err[-3000:]}"
    assert err.count("otc-ray: stopped by a signal") == 1, f"{name}: {err[-3000:]}"
    assert not survivors, f"{name} left processes behind after a signal: {survivors}"


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_exits_130_with_one_line_in_data_make_train_and_demo(tmp_path):
    """A real SIGINT to `data make` while it writes, to `train` and to `demo` once a training step is logged: 130,
    the one line, no traceback, nothing left running, the training's MLflow run KILLED, the demo's parent run and
    child run too; SIGTERM to `demo` as soon as its first child run exists: 143, the parent run and that child run
    KILLED (the child was left RUNNING when the signal came during set-up, before training started) (clean's
    Ctrl-C is tested with its resume). The SIGTERM reaches the demo while its set-up threads (`side_by_side`) are
    inside Ray calls: the exit lets them end before Ray shuts down (it exited 1 before: a Ray call after shutdown).
    One command at a time: three Ray instances starting at once can pass Ray's 30 s node start limit when loaded."""
    from test_tracking_outage import _first_step_logged

    big = tmp_path / "big"
    train, test = _tiny_shards(tmp_path)
    runs = tmp_path / "runs"
    demo_cmd = ["demo", "--defenses", "none", *TINY, "train.epochs=50", "train.log_every=1", "poison.attack=backdoor",
                "poison.count=8"]
    demo, stopped = tmp_path / "demo", tmp_path / "demo-sigterm"
    jobs = [(["data", "make", "--dataset", "shapes", "--num", "200000", "--shard-size", "100", "--out", str(big),
              "--quiet"], lambda: any(big.iterdir()), signal.SIGINT),
            (["train", *TINY, f"data.train={train}", f"data.test={test}", f"output_dir={runs}", "train.defense=none",
              "train.epochs=50", "train.log_every=1", "--quiet"],
             lambda: _first_step_logged(runs / "mlflow.db"), signal.SIGINT),
            ([*demo_cmd, f"output_dir={demo}"], lambda: _first_step_logged(demo / "mlflow.db"), signal.SIGINT),
            ([*demo_cmd, f"output_dir={stopped}"], lambda: _run_count(stopped / "mlflow.db") >= 2, signal.SIGTERM)]
    made, trained, demoed, terminated = (_interrupt_when([job], tmp_path)[0] for job in jobs)
    _check_interrupted(made, "data make")
    _check_interrupted(trained, "train")
    _check_interrupted(demoed, "demo")
    _check_interrupted(terminated, "demo", expected=143)
    from mlflow.tracking import MlflowClient

    run_id = _first_step_logged(runs / "mlflow.db")
    assert MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
    assert _demo_runs(demo / "mlflow.db") == ("KILLED", ["KILLED"])
    assert _demo_runs(stopped / "mlflow.db") == ("KILLED", ["KILLED"])


def _seen_for(path: Path, text: str, seconds: float) -> Callable[[], bool]:
    """A marker that turns true `seconds` after `text` first appears in the file at `path`."""
    first: list[float] = []

    def marker() -> bool:
        if not first and path.exists() and text in path.read_text(errors="replace"):
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] >= seconds
    return marker


@pytest.mark.ray
def test_sigterm_while_ray_starts_exits_143(tmp_path):
    """SIGTERM a second after `starting Ray ...`, while `ray.init` holds the signal (Ray's handler makes it
    SystemExit(15)): the process's own handler still gets it, so 143, the one line, nothing left running."""
    train, test = _tiny_shards(tmp_path)
    cmd = ["train", *TINY, f"data.train={train}", f"data.test={test}", f"output_dir={tmp_path / 'runs'}",
           "train.defense=none"]
    [result] = _interrupt_when([(cmd, _seen_for(tmp_path / "interrupted-0.err", "starting Ray", 1.0),
                                 signal.SIGTERM)], tmp_path)
    _check_interrupted(result, "train", expected=143)


def _run_count(db: Path) -> int:
    """How many runs the sqlite store holds (read-only: the command creates the store); 0 before it exists."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.Error:
        return 0


def _demo_runs(db: Path) -> tuple[str, list[str]]:
    """(status of the demo's parent run, statuses of its child runs), read once the demo has ended."""
    from mlflow.tracking import MlflowClient

    from otc_ray.track.run_context import GROUP_TAG, PARENT_RUN_TAG

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    [parent] = [r for r in runs if r.data.tags.get(GROUP_TAG) == "demo"]
    return parent.info.status, [r.info.status for r in runs if r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id]
