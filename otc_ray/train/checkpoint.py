"""Training checkpoints: model, optimizer, scheduler, epoch, step and RNG state in one `state.pt`.

Loaded with `torch.load(..., weights_only=True)`: only tensors and plain containers, never pickled code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model import unwrap
from ..model_checkpoint import MODEL_FILE

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    """Where training stands; `epoch` is the number of epochs completed."""

    epoch: int
    step: int


def save_checkpoint(folder: str | Path, model: nn.Module, optimizer, scheduler, state: TrainState,
                    rng: np.random.Generator) -> Path:
    """Write `state.pt` (resumable) and `model.pt` (the bare open_clip state dict, for eval/clean) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bg = rng.bit_generator.state
    torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": state.epoch, "step": state.step,
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": {"state": str(bg["state"]["state"]), "inc": str(bg["state"]["inc"]),
                              "has_uint32": int(bg["has_uint32"]), "uinteger": int(bg["uinteger"])}},
               folder / STATE_FILE)
    torch.save(unwrap(model).state_dict(), folder / MODEL_FILE)
    return folder


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer, scheduler, rng: np.random.Generator) -> TrainState:
    """Restore everything `save_checkpoint` wrote; returns the epoch/step to continue from."""
    blob = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    r = blob["numpy_rng"]
    rng.bit_generator.state = {"bit_generator": rng.bit_generator.state["bit_generator"],
                               "state": {"state": int(r["state"]), "inc": int(r["inc"])},
                               "has_uint32": r["has_uint32"], "uinteger": r["uinteger"]}
    return TrainState(epoch=int(blob["epoch"]), step=int(blob["step"]))
