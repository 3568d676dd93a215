"""Connecting to Ray: a cluster address (`ray job submit`, RAY_ADDRESS) or a local in-process instance."""
from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from typing import Any, Callable

import ray

from ..config import RayConfig
from ..process_exit import SETUP_THREAD_PREFIX


# A local instance's workers share a few cores: the Train worker's intra-op threads, the re-match actors and Ray
# Data's decode tasks. OpenMP's default spin-wait between parallel regions then burns the cores the others need
# (a training step measured 3x the CPU at the same wall time on a loaded 2-core machine); passive waiting sleeps
# instead. Ray Train's preemption watcher (an actor polling for node drains) and its state actor's reconciliation
# loop (polling controllers of runs that died) have nothing to watch on one private node: off, which saves an actor
# start per training run. An exported value wins.
LOCAL_WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0"}


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process; quiet Ray Data's per-operator logging unless progress bars are on.

    A local instance gets `cfg.num_cpus` logical CPUs (default 4, more than a 2-core laptop has): Ray Data's
    file listing always holds one CPU, so actor pools and train workers need logical room to avoid a deadlock.
    """
    # Ray's own deprecation notices about arguments its libraries pass internally (Train's exclude_resources): the
    # user can do nothing about them
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    if not ray.is_initialized():
        on_sigterm = signal.getsignal(signal.SIGTERM)    # ray.init replaces it in the driver (sys.exit(15))
        try:
            _start_ray(cfg)
        except SystemExit as e:
            # SIGTERM while ray.init held the handler: Ray's own made it SystemExit(15); the process's handler (the
            # CLI's: status 143 and its message) gets it instead
            if e.code == signal.SIGTERM and callable(on_sigterm):
                on_sigterm(signal.SIGTERM, None)
            raise
        finally:
            if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_sigterm)   # the process's own (the CLI's: process_exit)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, set ..." is Ray Data's answer to the setting just made: not news
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _start_ray(cfg: RayConfig) -> None:
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=cfg.worker_logs)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # no token file in ~/.ray for a private instance
    for name, value in LOCAL_WORKER_ENV.items():         # inherited by the raylet and every worker
        os.environ.setdefault(name, value)
    # worker_logs=False keeps the console to the driver's own lines (the demo): worker output is Ray's and
    # open_clip's INFO chatter plus, without a dashboard, the Train placement-group cleaner's State API warnings;
    # errors still surface as exceptions of fit(), and the logs stay in the session folder. address="local": a new
    # instance even when another one runs on this machine (`ray start`, a test's two-node cluster), which Ray would
    # otherwise join silently
    ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_mb << 20,
             include_dashboard=False, log_to_driver=cfg.worker_logs, configure_logging=True,
             logging_level=logging.WARNING)


def side_by_side(*tasks: Callable[[], Any]) -> list[Any]:
    """The results of `tasks` (callables without arguments), run at once on daemon threads: for set-up steps that
    mostly wait (on Ray tasks, a tracking store). The first task's error, in order, is raised once all have ended;
    Ctrl-C interrupts the wait at once (a daemon thread does not hold the process open)."""
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException | None] = [None] * len(tasks)

    def run(i: int, task: Callable[[], Any]) -> None:
        try:
            results[i] = task()
        except BaseException as e:          # handed to the caller's thread below
            errors[i] = e

    # named so that the process's exit lets them end before Ray shuts down (process_exit, step 0)
    threads = [threading.Thread(target=run, args=(i, task), daemon=True, name=f"{SETUP_THREAD_PREFIX}-{i}")
               for i, task in enumerate(tasks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        if error is not None:
            raise error
    return results
