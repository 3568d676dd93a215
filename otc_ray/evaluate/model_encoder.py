"""An `Encoder` over an open_clip model (via otc_ray.model).

    bundle = load_checkpoint_model("runs/x/model.pt", cfg.model)       # otc_ray.model_checkpoint
    encoder = ModelEncoder(bundle, device="cpu", batch_size=256)
    encoder.encode_images(uint8 (B, H, W, 3)) -> float32 (B, d);  encoder.encode_texts([...]) -> (B, d)
"""
from __future__ import annotations

import numpy as np
import torch

from ..model import ClipBundle, encode_image, encode_text, images_to_tensor


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

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float32 CPU (B, d), unit rows."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
        out = []
        with torch.inference_mode(), self.bundle.autocast(self.device):
            for i in range(0, len(images), self.batch_size):
                pixels = images_to_tensor(images[i:i + self.batch_size], self.bundle.image_size, self.device)
                out.append(encode_image(self.model, pixels).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.bundle.embed_dim)

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        """B captions -> float32 CPU (B, d), unit rows (tokenized by the bundle's tokenizer, truncated to L)."""
        captions = list(captions)
        out = []
        with torch.inference_mode(), self.bundle.autocast(self.device):
            for i in range(0, len(captions), self.batch_size):
                ids = self.bundle.tokenizer(captions[i:i + self.batch_size]).to(self.device)
                out.append(encode_text(self.model, ids).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.bundle.embed_dim)

