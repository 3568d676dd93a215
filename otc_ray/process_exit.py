"""The end of a command-line process: stop, in order, what a command started, then exit with its status.

A command that has done its work can still abort at interpreter teardown (`terminate called without an active
exception`, status 134): native thread pools (Arrow's CPU and I/O pools, the AWS SDK inside pyarrow, jemalloc's
background thread) are destroyed by C++ static destructors while their threads may still be joinable, and Python
threads (tqdm's monitor, fsspec's event loop, Ray's driver threads) may still run when that happens. A pipeline
reads such an exit as a failed step. So `exit_process` ends the process in this order:

  0. set-up threads (`pipelines.runtime.side_by_side`, named SETUP_THREAD_PREFIX...) that a signal left inside Ray
     calls get up to SETUP_WAIT_S to end: Ray's core ends the process with status 1 when a thread touches it after
     `ray.shutdown()`. One still running then: only the flush of step 5 and step 6 (no `ray.shutdown()`, no atexit
     hook: Ray's own would shut it down; a local Ray instance shares the process's fate and stops with it);
  1. tqdm's monitor thread (progress bars) is stopped and joined;
  2. Ray: `ray.shutdown()` (a local instance's raylet, GCS and workers stop; a cluster is only disconnected);
  3. fsspec's I/O event loop (s3fs) is stopped and its thread joined;
  4. pyarrow's S3 subsystem is finalised (its own atexit hook, called while the pools are still whole);
  5. every Python atexit hook and finaliser runs (temporary folders, logging), and stdout / stderr are flushed;
  6. `os._exit(status)`: the C++ teardown of the native pools, the step that aborts, is skipped.

SIGTERM becomes SystemExit(143) and Ctrl-C (SIGINT) KeyboardInterrupt in the main thread (`raise_on_sigterm`), so
a stopped command runs its handlers (an MLflow run marked KILLED, an output lock released) and then ends the same
way, with status 143 or 130 and a one-line message, never a traceback (`stopped_by_signal`), whatever the exception
became on its way up.

Used by the console entry point (`otc_ray.cli.entry`, `python -m otc_ray`) and the `ray job submit` entry points;
never by library code or in-process tests (it ends the process).

Top level: the CLI and the pipelines' Ray start-up end a process with it; no stage does.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from typing import NoReturn


def _stop_tqdm_monitor() -> None:
    tqdm_module = sys.modules.get("tqdm")
    monitor = getattr(getattr(tqdm_module, "tqdm", None), "monitor", None)
    if monitor is not None:
        monitor.exit()
        if monitor.is_alive():
            monitor.join(timeout=5)


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _stop_fsspec_loop() -> None:
    asyn = sys.modules.get("fsspec.asyn")
    if asyn is None or asyn.loop[0] is None:
        return
    loop, thread = asyn.loop[0], asyn.iothread[0]
    if loop.is_running():
        loop.call_soon_threadsafe(loop.stop)
    if thread is not None and thread.is_alive():
        thread.join(timeout=5)


def _finalize_arrow_s3() -> None:
    fs = sys.modules.get("pyarrow.fs")
    finalize = getattr(fs, "ensure_s3_finalized", None) if fs is not None else None
    if finalize is not None:
        finalize()


def shutdown_runtime() -> None:
    """Steps 1-4 of the module docstring; each step that fails is reported on stderr and the next still runs."""
    for step in (_stop_tqdm_monitor, _stop_ray, _stop_fsspec_loop, _finalize_arrow_s3):
        try:
            step()
        except Exception as e:                      # noqa: BLE001 - the exit goes on; the failure is shown
            print(f"otc-ray: warning: at exit, {step.__name__[1:]} failed: {e}", file=sys.stderr)


SIGTERM_STATUS = 128 + 15
# set once SIGTERM arrived: the status is then 143 whatever the exception became on its way up (Ray's `get` turns
# an exception raised by a signal handler during its wait into SystemExit(1))
terminated = threading.Event()


def _terminated(signum, frame) -> None:
    terminated.set()
    raise SystemExit(SIGTERM_STATUS)


SIGINT_STATUS = 128 + 2
interrupted = threading.Event()             # set once Ctrl-C arrived: the status is then 130


def _interrupted(signum, frame) -> None:
    interrupted.set()
    raise KeyboardInterrupt


def stopped_by_signal() -> bool:
    """Whether SIGTERM or Ctrl-C stopped this process (its exit is then 143 / 130 with a message, no traceback)."""
    return terminated.is_set() or interrupted.is_set()


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) and SIGINT into KeyboardInterrupt (status 130) in the main thread, so that
    `finally` blocks and handlers run (an MLflow run is marked KILLED, an output lock released) before the ordered
    exit."""
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, _interrupted)


SETUP_THREAD_PREFIX = "otc-ray-setup"
SETUP_WAIT_S = 30.0


def setup_threads_ended(timeout_s: float) -> bool:
    """Join the live set-up threads (named SETUP_THREAD_PREFIX...) for up to `timeout_s` in all; whether all ended."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name.startswith(SETUP_THREAD_PREFIX) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.name.startswith(SETUP_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())


def exit_process(status: int) -> NoReturn:
    """End the process with `status` (143 after SIGTERM, 130 after Ctrl-C) after `shutdown_runtime`, the atexit hooks and a flush
    (steps 0-6; see step 0 for a set-up thread still running)."""
    if terminated.is_set():
        status = SIGTERM_STATUS
    elif interrupted.is_set():
        status = SIGINT_STATUS
    if setup_threads_ended(SETUP_WAIT_S):
        shutdown_runtime()
        atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):               # a closed pipe: nothing more can be said
            pass
    os._exit(status)
