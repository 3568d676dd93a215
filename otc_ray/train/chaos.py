"""Fault injection for fault-tolerance tests: kill this worker once, at a chosen epoch and step.

Set OTC_RAY_CHAOS="<marker file>:<epoch>:<step>" in the driver's environment; the driver passes it to
the workers in the loop config. The first rank-0 worker to reach that point creates the marker file
and exits at once (os._exit), so Ray Train sees a dead worker; the restarted run finds the marker and
carries on. Unset, this costs one comparison per step.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "OTC_RAY_CHAOS"


def chaos_spec() -> str:
    """The driver-side setting, shipped to workers in the loop config ("" = off)."""
    return os.environ.get(ENV, "")


def maybe_die(spec: str, rank: int, epoch: int, step_in_epoch: int) -> None:
    if not spec or rank != 0:
        return
    marker, at_epoch, at_step = spec.rsplit(":", 2)
    if epoch == int(at_epoch) and step_in_epoch == int(at_step) and not Path(marker).exists():
        Path(marker).write_text(f"killed at epoch {epoch} step {step_in_epoch}\n")
        os._exit(137)
