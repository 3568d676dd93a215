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
import threading
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


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float, float]]:
    """{pid: (parent pid, start time in ticks, user + system CPU seconds)} of every process (/proc/<pid>/stat)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): ppid = field 4, utime 14, stime 15, starttime 22
        out[int(name)] = (int(fields[1]), float(fields[19]), (int(fields[11]) + int(fields[12])) / _TICK)
    return out


class _Sampler:
    """Polls every descendant of this process (/proc) and keeps each one's newest user + system CPU seconds."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.seen, self.stop = interval_s, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            table = _proc_table()
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo = list(children.get(me, []))
            while todo:
                pid = todo.pop()
                todo += children.get(pid, [])
                _, started, cpu = table[pid]
                self.seen[(pid, started)] = cpu
            self.stop.wait(self.interval_s)

    def total(self) -> float:
        return sum(self.seen.values())


def run_tree(cmd: list[str], timeout_s: float, env: dict | None = None, cwd: str | None = None) -> TreeRun:
    """Run `cmd` to completion and return its wall time and the CPU of its whole process tree: the larger of
    what the kernel accounted to us on reaping (exact for every process reaped by its parent up the tree) and
    the sum of each descendant's CPU as last polled every 0.2 s (counts processes killed without being reaped
    by a parent, such as Ray's daemons at shutdown; misses at most 0.2 s of a process that dies between polls)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    _reap_all(time.monotonic() + 1)
    before = _children_cpu()
    sampler = _Sampler()
    start_unix, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler.thread.start()
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    wall = time.perf_counter() - start
    _reap_all(time.monotonic() + 60)          # Ray's daemons exit shortly after the driver
    sampler.stop.set()
    sampler.thread.join()
    return TreeRun(proc.returncode, wall, max(_children_cpu() - before, sampler.total()), start_unix, out)
