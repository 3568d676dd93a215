"""CPU seconds of a whole process tree: run a command as a child of a subreaper, reap everything it leaves.

    r = run_tree(["python", "-m", "otc_ray", "train", ...], timeout_s=600)
    r.cpu_s, r.wall_s, r.returncode, r.start_unix

This process becomes a child subreaper (Linux prctl PR_SET_CHILD_SUBREAPER), so every descendant of the command
(Ray's raylet, GCS, log monitor, idle and short-lived workers, Train and Data actors) is reaped here, by the
command's own process or by us, and its user + system CPU lands in this process's RUSAGE_CHILDREN. The figure is
exact and independent of other load on the machine (unlike wall time), except that a busy machine makes spinning
thread pools spin longer.
"""
from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import time
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36


@dataclass
class TreeRun:
    returncode: int
    wall_s: float
    cpu_s: float           # user + system of the command and every descendant
    start_unix: float      # time.time() when the command was started
    stdout: str


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _reap_all(deadline: float) -> None:
    """Wait for every remaining descendant (orphans reparented to us) until none is left or the deadline."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.1)


def run_tree(cmd: list[str], timeout_s: float, env: dict | None = None, cwd: str | None = None) -> TreeRun:
    """Run `cmd` to completion and return its wall time and the CPU of its whole process tree."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    _reap_all(time.monotonic() + 1)
    before = _children_cpu()
    start_unix, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    wall = time.perf_counter() - start
    _reap_all(time.monotonic() + 60)          # Ray's daemons exit shortly after the driver
    return TreeRun(proc.returncode, wall, _children_cpu() - before, start_unix, out)
