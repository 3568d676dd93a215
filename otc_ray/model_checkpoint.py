"""Loading a saved open_clip state dict (`model.pt`, local or s3://) into a `ClipBundle` (otc_ray.model).

    bundle = load_checkpoint_model("runs/x/model.pt", cfg.model)       # torch.save(model.state_dict())

Used by evaluation (`otc-ray eval`, the trainer's final report), the cleaning job and the benchmarks.
Loaded with `weights_only=True`: tensors and plain containers only, never pickled code.
"""
from __future__ import annotations

import io

import torch

from .config import ModelConfig, S3Config
from .data.storage import resolve
from .model import ClipBundle, build_model


def load_checkpoint_model(path: str, model_cfg: ModelConfig, s3: S3Config | None = None) -> ClipBundle:
    """A `build_model(model_cfg)` bundle with the weights of `path` (local or s3://), a state dict saved by
    `torch.save(model.state_dict())` (a DDP `module.` prefix is stripped). Loaded with `weights_only=True`.

    Raises ValueError when the file is missing or is not a state dict of this architecture.
    """
    fs, file = resolve(path, s3 or S3Config())
    if not fs.isfile(file):
        raise ValueError(f"no checkpoint file at {path}")
    with fs.open(file, "rb") as f:
        data = f.read()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:   # pickle.UnpicklingError for anything but tensors and plain containers
        raise ValueError(f"{path} is not a weights-only torch state dict ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    bundle = build_model(model_cfg)
    try:
        bundle.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(f"{path} does not fit model arch {model_cfg.arch!r}: "
                         f"{detail[:200]}{'...' if len(detail) > 200 else ''}") from None
    bundle.model.eval()
    return bundle
