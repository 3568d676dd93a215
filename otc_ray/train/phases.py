"""Per-phase time of a training run: wall seconds and this process's CPU seconds, summed by phase name.

    timer = PhaseTimer()
    with timer("forward_backward"):
        ...
    timer.metrics("time/worker")     # {"time/worker/forward_backward_wall_s": ..., ".._cpu_s": ...}

CPU is `time.process_time` by default (every thread of the process: torch's intra-op threads and Ray Data's
iterator threads included), so a phase's CPU can exceed its wall time; `PhaseTimer(cpu_clock=time.thread_time)`
counts the calling thread's alone, for phases that run side by side on threads. Two clock reads per phase: cheap enough to stay on
in every run (a training step is milliseconds).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class PhaseTimer:
    """Accumulates wall and process-CPU seconds per named phase (one instance per process, passed explicitly)."""

    def __init__(self, cpu_clock: Callable[[], float] = time.process_time) -> None:
        self.cpu_clock = cpu_clock
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.marks: dict[str, float] = {}       # named moments (unix seconds), e.g. the first step's end

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), self.cpu_clock()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - wall, self.cpu_clock() - cpu)

    def add(self, name: str, wall_s: float, cpu_s: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall_s
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu_s

    def metrics(self, prefix: str) -> dict[str, float]:
        """{f"{prefix}/{phase}_wall_s": seconds, f"{prefix}/{phase}_cpu_s": seconds} of every phase so far."""
        out = {f"{prefix}/{k}_wall_s": v for k, v in self.wall.items()}
        return out | {f"{prefix}/{k}_cpu_s": v for k, v in self.cpu.items()}
