"""open_clip models, tokenizer and features: global embeddings plus projected patch / word tokens.

    bundle = build_model(ModelConfig(arch="otc-tiny-vit-32"))
    pixels = images_to_tensor(uint8_images, bundle.image_size, "cpu")      # (B, 3, S, S)
    ids = bundle.tokenizer(["a photo of a shoe", ...])                       # (B, L) int64, 0 = padding
    f = features(bundle.model, pixels, ids)                                  # ClipFeatures

Any registered open_clip architecture works by name, randomly initialised (`pretrained=None`, nothing is
downloaded; `model_checkpoint` loads a local or s3:// checkpoint into it). The tiny CPU architectures ship as JSON in `otc_ray/model_configs/` and are added to open_clip's
registry when this module is imported (idempotent). Tokens come from `forward_intermediates` (last block,
final norm applied), so they work for `CLIP` and `CustomTextCLIP` alike and leave `model(image, text)` and
`model.encode_*` untouched; the towers must be open_clip's own ViT and text transformer.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import Tensor, nn

from otc_ray.config import ModelConfig

CONFIG_DIR = Path(__file__).parent / "model_configs"
PAD_ID = 0   # open_clip's SimpleTokenizer pads with 0


def register_model_configs() -> list[str]:
    """Add the package's architecture JSONs to open_clip's registry (once); returns their names."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)
    return names


register_model_configs()


# ----------------------------------------------------------------------------------------- containers
@dataclass
class ClipBundle:
    """A model and what callers need to feed it.

    model: open_clip CLIP / CustomTextCLIP (float32 weights); tokenizer: list[str] -> LongTensor (B, context_length);
    image_size: input side S; context_length: L; embed_dim: d of every feature; autocast_dtype: the compute dtype
    that `ModelConfig.precision` asks for (None = fp32), for `torch.autocast`.
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    image_size: int
    context_length: int
    embed_dim: int
    autocast_dtype: Optional[torch.dtype] = None

    def autocast(self, device: Union[str, torch.device]) -> torch.autocast:
        """`torch.autocast` at `autocast_dtype` on the device's type; disabled (fp32) when it is None."""
        device_type = torch.device(device).type
        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


@dataclass
class ClipFeatures:
    """Features of a batch of B images and B captions, all L2-normalized, dimension d.

    image: (B, d) pooled image embeddings; text: (B, d) pooled caption embeddings;
    patches: (B, M, d) projected patch tokens (class token excluded); words: (B, L, d) projected text tokens at
    every position; word_mask: (B, L) bool, True at the tokens that carry the caption (`word_token_mask`: the
    words, without SOT / EOT unless asked for; padding always False);
    logit_scale: the model's exp(logit_scale) (scalar tensor), for `losses.clip_loss`.
    """

    image: Tensor
    text: Tensor
    patches: Tensor
    words: Tensor
    word_mask: Tensor
    logit_scale: Optional[Tensor] = None


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _RandomInitNote(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" warning: a random start is what
    build_model asks for (weights, when wanted, are loaded afterwards by otc_ray.model_checkpoint)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init():
    root, note = logging.getLogger(), _RandomInitNote()
    root.addFilter(note)
    try:
        yield
    finally:
        root.removeFilter(note)


def build_model(cfg: ModelConfig) -> ClipBundle:
    """A randomly initialised open_clip model for `cfg.arch` (a registered name; never downloads)."""
    register_model_configs()
    known = open_clip.list_models()
    if cfg.arch not in known:
        tiny = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.json")))
        raise ValueError(f"unknown model arch {cfg.arch!r}: use a registered open_clip architecture "
                         f"(open_clip.list_models()) or one of this package's: {tiny}")
    arch_cfg = open_clip.get_model_config(cfg.arch)
    if arch_cfg.get("text_cfg", {}).get("hf_model_name") or arch_cfg.get("vision_cfg", {}).get("timm_model_name"):
        raise ValueError(f"arch {cfg.arch!r} needs a Hugging Face / timm tower (downloads, no token features); "
                         "use an open_clip ViT architecture")
    with _quiet_random_init():
        model = open_clip.create_model(cfg.arch, pretrained=None, load_weights=False, precision="fp32",
                                       pretrained_image=False, pretrained_text=False)
    size = model.visual.image_size
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(cfg.arch),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        context_length=int(model.context_length),
        embed_dim=int(arch_cfg["embed_dim"]),
        autocast_dtype=_AUTOCAST[cfg.precision],
    )


def model_input_size(arch: str) -> int:
    """The side S of the (S, S) images the registered architecture `arch` takes (its vision config's image_size)."""
    register_model_configs()
    arch_cfg = open_clip.get_model_config(arch)
    if arch_cfg is None:
        raise ValueError(f"unknown model arch {arch!r}: use a registered open_clip architecture")
    size = arch_cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def check_image_size(arch: str, image_size: int) -> None:
    """ValueError when shards decoded at `image_size` (data.image_size) would not be the model's input size (a
    silent resize in the model would train and score on images that are not what the data holds)."""
    want = model_input_size(arch)
    if image_size != want:
        raise ValueError(f"data.image_size={image_size} but model arch {arch!r} takes {want}x{want} images: set "
                         f"data.image_size={want} (shards are resized to it when read)")


# ----------------------------------------------------------------------------------------- inputs
def images_to_tensor(
    images: Union[np.ndarray, Tensor], image_size: int, device: Union[str, torch.device] = "cpu",
) -> Tensor:
    """uint8 images (B, H, W, 3) (or (B, H, W) / (B, H, W, 1) grey) -> float (B, 3, S, S), OpenAI CLIP mean/std.

    Resized (bilinear, antialiased) only when H or W differs from S = image_size.
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()          # Ray hands out read-only views of its object store; torch wants to own them
    t = torch.as_tensor(images)
    if t.dim() == 3:
        t = t.unsqueeze(-1)
    if t.dim() != 4 or t.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, 3) uint8, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {t.dtype}")
    x = t.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(OPENAI_DATASET_STD, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x - mean) / std


# ----------------------------------------------------------------------------------------- features
def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / FSDP-style wrappers (`.module`, any depth); the model itself when bare."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _text_tower(m: nn.Module) -> tuple[nn.Module, object]:
    """(tower owning forward_intermediates checks, text projection) for CustomTextCLIP or CLIP."""
    if hasattr(m, "text"):
        if not isinstance(m.text, TextTransformer):
            raise ValueError(f"word tokens need open_clip's TextTransformer, got {type(m.text).__name__}")
        return m.text, m.text.text_projection
    if hasattr(m, "transformer") and hasattr(m, "text_projection"):
        return m, m.text_projection
    raise ValueError(f"{type(m).__name__} has no open_clip text tower")


def _project(tokens: Tensor, proj: object) -> Tensor:
    if proj is None:
        return tokens
    if isinstance(proj, nn.Linear):
        return proj(tokens)
    return tokens @ proj


def _check_visual(m: nn.Module) -> None:
    visual = getattr(m, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"patch tokens need open_clip's VisionTransformer tower, got {type(visual).__name__}")


def _image_part(m: nn.Module, out: dict) -> tuple[Tensor, Tensor]:
    patches = _project(out["image_intermediates"][-1], m.visual.proj)
    return out["image_features"], F.normalize(patches, dim=-1)


def word_token_mask(ids: Tensor, special_tokens: bool = False) -> Tensor:
    """ids (B, L) from open_clip's tokenizer -> (B, L) bool, True at the tokens of the OT word set.

    Padding (id 0) is never in the set. SOT (position 0) and EOT (the row's largest id) are left out unless
    `special_tokens`: with a causal text tower SOT's output is the same for every caption, and EOT is the pooled
    summary, not a word; a caption of only SOT and EOT keeps them (an empty set would carry no mass).
    """
    real = ids != PAD_ID
    if special_tokens:
        return real
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    words = real & (pos != 0) & (pos != ids.argmax(dim=1, keepdim=True))
    return torch.where(words.any(dim=1, keepdim=True), words, real)


def trim_ids(ids: Tensor) -> Tensor:
    """ids (B, L) -> (B, L'): without the trailing columns that are padding in every row (L' >= 1)."""
    used = (ids != PAD_ID).any(dim=0).nonzero()
    return ids[:, :int(used.max()) + 1] if len(used) else ids[:, :1]


def _trimmable(tower: nn.Module) -> bool:
    """A causal TextTransformer without a pad mask or class token: a token's output depends on earlier tokens
    only, so trailing padding can be left out without changing any output at the positions kept."""
    return (isinstance(tower, TextTransformer) and tower.cls_emb is None and not tower.use_pad_mask
            and tower.attn_mask is not None and tower.pool_type in ("argmax", "eos", "first"))


def _text_tokens(m: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(text features (B, d) L2-normalized, projected last-block tokens (B, L', d) before normalizing, ids (B, L'))
    of caption ids (B, L). A causal text tower runs on `trim_ids(ids)` only (open_clip's own forward always runs
    all L = context_length positions: about 2.5x the text tower's work for 8-13-token captions); its outputs at
    the kept positions are the full forward's."""
    tower, proj = _text_tower(m)
    if not _trimmable(tower):
        out = m.forward_intermediates(text=ids, text_indices=1, normalize=True, normalize_intermediates=True)
        return out["text_features"], _project(out["text_intermediates"][-1], proj), ids
    ids = trim_ids(ids)
    L = ids.shape[1]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(ids).to(cast) + tower.positional_embedding[:L].to(cast)
    x, _ = tower.transformer.forward_intermediates(x, attn_mask=tower.attn_mask[:L, :L], indices=1)
    x = tower.ln_final(x)          # the last block's output: the tokens and, pooled, the caption's feature
    pooled = _project(text_global_pool(x, ids, pool_type=tower.pool_type, eos_token_id=getattr(tower, "eos_id", None)),
                      proj)
    return F.normalize(pooled, dim=-1), _project(x, proj), ids


def _text_part(m: nn.Module, ids: Tensor, special_tokens: bool) -> tuple[Tensor, Tensor, Tensor]:
    t, words, ids = _text_tokens(m, ids)
    return t, F.normalize(words, dim=-1), word_token_mask(ids, special_tokens)


def encode_image_tokens(model: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """pixels (B, 3, S, S) -> (g (B, d), patches (B, M, d)), both L2-normalized; patches use the visual projection."""
    m = unwrap(model)
    _check_visual(m)
    out = m.forward_intermediates(image=pixels, image_indices=1, normalize=True, normalize_intermediates=True,
                                  image_output_fmt="NLC")
    return _image_part(m, out)


def encode_text_tokens(model: nn.Module, ids: Tensor, special_tokens: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """ids (B, L) -> (t (B, d), words (B, L', d), mask (B, L') bool (`word_token_mask`)); L2-normalized, words use
    the text projection; L' <= L leaves out trailing padding columns (`trim_ids`) for a causal text tower."""
    return _text_part(unwrap(model), ids, special_tokens)


def _pooled(out: Union[Tensor, tuple]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out   # towers built with output_tokens return (pooled, tokens)


def encode_image(model: nn.Module, pixels: Tensor) -> Tensor:
    """pixels (B, 3, S, S) -> normalized global image embeddings (B, d) (no token work)."""
    return F.normalize(_pooled(unwrap(model).visual(pixels)), dim=-1)


def encode_text(model: nn.Module, ids: Tensor) -> Tensor:
    """ids (B, L) -> normalized global caption embeddings (B, d) (no token work)."""
    m = unwrap(model)
    if _trimmable(_text_tower(m)[0]):
        return _text_tokens(m, ids)[0]
    return F.normalize(_pooled(m.text(ids)) if hasattr(m, "text") else m.encode_text(ids), dim=-1)


def features(model: nn.Module, pixels: Tensor, ids: Tensor, special_tokens: bool = False) -> ClipFeatures:
    """One pass of both towers -> ClipFeatures (see its docstring for shapes); `special_tokens` puts SOT / EOT in
    the word set (`word_token_mask`, config `ot.special_tokens`)."""
    m = unwrap(model)
    _check_visual(m)
    out = m.forward_intermediates(image=pixels, image_indices=1, normalize=True, normalize_intermediates=True,
                                  image_output_fmt="NLC")
    g, patches = _image_part(m, out)
    t, words, mask = _text_part(m, ids, special_tokens)
    return ClipFeatures(image=g, text=t, patches=patches, words=words, word_mask=mask,
                        logit_scale=m.logit_scale.exp())


class FeatureModel(nn.Module):
    """`features` as a module, so that DDP (`ray.train.torch.prepare_model`) wraps the call that trains."""

    def __init__(self, model: nn.Module, special_tokens: bool = False):
        super().__init__()
        self.model = model
        self.special_tokens = special_tokens

    def forward(self, pixels: Tensor, ids: Tensor) -> ClipFeatures:
        return features(self.model, pixels, ids, self.special_tokens)
