"""Loading open_clip weights (local or s3://) into a model: the trainer's `model.pt`, or a pretrained start.

    bundle = load_checkpoint_model("runs/x/model.pt", cfg.model)       # torch.save(model.state_dict())
    bundle = pretrained_model(cfg.model, cfg.data.s3)                  # model.pretrained, or random when ""
    load_weights(bundle.model, "s3://bkt/ViT-B-32.safetensors", s3)     # in place

Used by training (`model.pretrained`: fine-tuning), evaluation (`otc-ray eval`, the trainer's final report), the
cleaning job and the benchmarks. A file is a state dict (`.pt` / `.pth` / `.bin`, optionally inside
`{"state_dict": ...}` as open_clip's trainer saves it, a DDP `module.` prefix stripped) or `.safetensors`, read
with `torch.load(..., weights_only=True)` / safetensors: tensors and plain containers only, never pickled code.
Nothing is downloaded from a model hub.

Top level, beside model.py: training, evaluation, the re-match stage and the cleaning job all load weights with
it, and read the checkpoint folder's file name (MODEL_FILE) from it.
"""
from __future__ import annotations

import io

import torch
from torch import nn

from .config import ModelConfig, S3Config
from .data.storage import resolve
from .model import ClipBundle, build_model

MODEL_FILE = "model.pt"         # the model's weights inside a training checkpoint folder (`otc_ray.train.checkpoint`)


MODEL_FILE = "model.pt"          # the bare open_clip state dict in each checkpoint folder the trainer writes


def shorten(text: str, width: int = 200) -> str:
    """`text` on one line, cut at a word boundary to at most `width` characters (marked "...")."""
    import textwrap

    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" ...")


def _model_file(fs, root: str, path: str) -> str:
    """The state dict file that `path` names: the file itself; in a checkpoint folder (what `otc-ray train` prints),
    its MODEL_FILE; in a Ray Train run folder, the newest `checkpoint_*` folder's. ValueError when none."""
    if fs.isfile(root):
        return root
    if not fs.isdir(root):
        raise ValueError(f"no checkpoint file or folder at {path}")
    inside = f"{root.rstrip('/')}/{MODEL_FILE}"
    if fs.isfile(inside):
        return inside
    newest = sorted(p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_"))
    if newest and fs.isfile(f"{newest[-1].rstrip('/')}/{MODEL_FILE}"):
        return f"{newest[-1].rstrip('/')}/{MODEL_FILE}"
    raise ValueError(f"{path} is a folder without {MODEL_FILE} (give a checkpoint folder that `otc-ray train` "
                     "printed, a run folder holding checkpoint_* folders, or a state dict file)")


def read_state_dict(path: str, s3: S3Config | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of the checkpoint at `path` (a state dict file, a checkpoint folder or a Ray Train
    run folder: `_model_file`); ValueError when missing or not weights."""
    fs, root = resolve(path, s3 or S3Config())
    file = _model_file(fs, root, path)
    with fs.open(file, "rb") as f:
        data = f.read()
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:   # pickle.UnpicklingError for anything but tensors and plain containers
        detail = f"{type(e).__name__}: {shorten(e, 120)}"
        raise ValueError(f"{path} is not a weights-only torch state dict ({detail})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]              # open_clip's training checkpoint: epoch, name, state_dict, optimizer
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str, arch: str, s3: S3Config | None = None) -> None:
    """Load the checkpoint at `path` into `model` (strict); ValueError naming `arch` when it does not fit."""
    state = read_state_dict(path, s3)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit model arch {arch!r}: {shorten(e, 200)}") from None


def load_checkpoint_model(path: str, model_cfg: ModelConfig, s3: S3Config | None = None) -> ClipBundle:
    """A `build_model(model_cfg)` bundle with the weights of `path` (local or s3://), in eval mode.

    Raises ValueError when the file is missing or is not a state dict of this architecture.
    """
    bundle = build_model(model_cfg)
    load_weights(bundle.model, path, model_cfg.arch, s3)
    bundle.model.eval()
    return bundle


def pretrained_model(model_cfg: ModelConfig, s3: S3Config | None = None) -> ClipBundle:
    """The model a run starts from: `model.pretrained`'s weights, or the random init when it is "" (train mode)."""
    bundle = build_model(model_cfg)
    if model_cfg.pretrained:
        load_weights(bundle.model, model_cfg.pretrained, model_cfg.arch, s3)
    return bundle
