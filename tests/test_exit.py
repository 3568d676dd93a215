"""Clean exits: CLI commands run as a user runs them (a fresh process each, two at a time so that each runs under
the other's load) exit 0 after success, print no native abort or traceback, and leave no process of theirs behind
(a local Ray instance, an MLflow or moto server included): data make / inspect, poison, train, eval, compare, clean
and a seconds-long demo. A real Ctrl-C (SIGINT to the command's process) mid-work exits 130 with one line and no
traceback, nothing of it left running. `exit_process` itself runs the atexit hooks and keeps the status it is
given."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _run_together(commands: list[list[str]], cwd: Path, timeout_s: float = 600) -> list[tuple[int, str, list[str]]]:
    """Start every command at once (each in its own session); (status, stderr, survivors) per command."""
    procs = [subprocess.Popen([sys.executable, "-m", "otc_ray", *cmd], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) for cmd in commands]
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout_s)
        time.sleep(1.0)                                       # what outlives it would still be alive now
        results.append((proc.returncode, err.decode(errors="replace"), _survivors(proc.pid)))
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
    """The commands that start Ray, train or track, one after the other on a tiny setting: each exits 0 with no
    traceback and nothing of it left running (its Ray instance, its MLflow store's helpers)."""
    train, test = _tiny_shards(tmp_path)
    runs = tmp_path / "runs"
    data = [f"data.train={train}", f"data.test={test}", f"output_dir={runs}"]
    steps = [[["train", *TINY, *data, "name=exit", "train.defense=none", "--quiet"]],
             [["eval", "--checkpoint", str(runs / "latest-checkpoint"), "--data", str(test), "--num-eval", "64",
               *TINY, f"output_dir={runs}"],
              ["compare", "--config", "tiny", f"output_dir={runs}", "--no-plots"]],
             [["clean", "--in", str(train), "--out", str(tmp_path / "cleaned"), "--checkpoint",
               str(runs / "latest-checkpoint"), *TINY, f"output_dir={runs}", "data.samples_per_shard=48",
               *[f"rematch.{k}={v}" for k, v in REMATCH.items()]]],
             [["demo", "--defenses", "none", *TINY, f"output_dir={tmp_path / 'demo'}", "poison.attack=backdoor",
               "poison.count=8"]]]
    for commands in steps:
        _check(_run_together(commands, tmp_path), commands)
    assert (tmp_path / "cleaned" / SUMMARY_FILE).is_file() and list((tmp_path / "cleaned").glob("clean-*.tar"))


def _started(marker) -> bool:
    try:
        return bool(marker())
    except OSError:
        return False


def _interrupt_when(cmd: list[str], cwd: Path, marker, timeout_s: float = 600) -> tuple[int, str, list[str]]:
    """Run `otc-ray CMD`, send it one SIGINT (what Ctrl-C sends) once `marker()` is true; (status, stderr,
    survivors)."""
    proc = subprocess.Popen([sys.executable, "-m", "otc_ray", *cmd], cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not _started(marker):
            time.sleep(0.2)
        assert proc.poll() is None, f"{cmd[0]} ended before it could be interrupted: {proc.communicate()[1][-3000:]}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        time.sleep(1.0)
        return proc.returncode, err.decode(errors="replace"), _survivors(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _check_interrupted(result, name: str) -> None:
    status, err, survivors = result
    assert status == 130, f"{name} exited {status} after Ctrl-C: {err[-3000:]}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, f"{name}: {err[-3000:]}"
    assert err.count("otc-ray: stopped by a signal") == 1, f"{name}: {err[-3000:]}"
    assert not survivors, f"{name} left processes behind after Ctrl-C: {survivors}"


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_exits_130_with_one_line_in_data_make_train_and_demo(tmp_path):
    """A real SIGINT to `data make` while it writes, to `train` and to `demo` once a training step is logged: 130,
    the one line, no traceback, nothing left running, the training's MLflow run KILLED (clean's Ctrl-C is tested
    with its resume)."""
    from test_tracking_outage import _first_step_logged

    big = tmp_path / "big"
    _check_interrupted(_interrupt_when(["data", "make", "--dataset", "shapes", "--num", "200000", "--shard-size",
                                        "100", "--out", str(big), "--quiet"], tmp_path,
                                       lambda: any(big.iterdir())), "data make")
    train, test = _tiny_shards(tmp_path)
    runs = tmp_path / "runs"
    _check_interrupted(_interrupt_when(["train", *TINY, f"data.train={train}", f"data.test={test}",
                                        f"output_dir={runs}", "train.defense=none", "train.epochs=50",
                                        "train.log_every=1", "--quiet"], tmp_path,
                                       lambda: _first_step_logged(runs / "mlflow.db")), "train")
    from mlflow.tracking import MlflowClient

    run_id = _first_step_logged(runs / "mlflow.db")
    assert MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
    demo = tmp_path / "demo"
    _check_interrupted(_interrupt_when(["demo", "--defenses", "none", *TINY, f"output_dir={demo}", "train.epochs=50",
                                        "train.log_every=1", "poison.attack=backdoor", "poison.count=8"], tmp_path,
                                       lambda: _first_step_logged(demo / "mlflow.db")), "demo")
