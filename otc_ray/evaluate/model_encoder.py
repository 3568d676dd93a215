"""An `Encoder` over an open_clip model (via otc_ray.model), and loading a saved state dict into one.

    bundle = load_checkpoint_model("runs/x/model.pt", cfg.model)       # torch.save(model.state_dict())
    encoder = ModelEncoder(bundle, device="cpu", batch_size=256)
    encoder.encode_images(uint8 (B, H, W, 3)) -> float32 (B, d);  encoder.encode_texts([...]) -> (B, d)
"""
from __future__ import annotations

import io

import numpy as np
import torch

from ..config import ModelConfig, S3Config
from ..data.storage import resolve
from ..model import ClipBundle, build_model, encode_image, encode_text, images_to_tensor


class ModelEncoder:
    """The `Encoder` protocol over `bundle.model` in eval mode, without gradients, in chunks of `batch_size`.

    Images of any size are resized to `bundle.image_size` by `images_to_tensor`; outputs are float32 on the
    CPU with unit rows (the model's normalized global embeddings).
    """

    def __init__(self, bundle: ClipBundle, device: str | torch.device = "cpu", batch_size: int = 256):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle, self.device, self.batch_size = bundle, torch.device(device), batch_size
        self.model = bundle.model.to(self.device).eval()

    def _autocast(self):
        dtype = self.bundle.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float32 CPU (B, d), unit rows."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(images), self.batch_size):
                pixels = images_to_tensor(images[i:i + self.batch_size], self.bundle.image_size, self.device)
                out.append(encode_image(self.model, pixels).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.bundle.embed_dim)

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        """B captions -> float32 CPU (B, d), unit rows (tokenized by the bundle's tokenizer, truncated to L)."""
        captions = list(captions)
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(captions), self.batch_size):
                ids = self.bundle.tokenizer(captions[i:i + self.batch_size]).to(self.device)
                out.append(encode_text(self.model, ids).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.bundle.embed_dim)


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
