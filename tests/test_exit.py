"""Clean exits: CLI commands run as a user runs them (a fresh process each, two at a time so that each runs under
the other's load) exit 0 after success, print no native abort, and leave no process of theirs behind (a local
Ray instance included). `exit_process` itself runs the atexit hooks and keeps the status it is given."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
