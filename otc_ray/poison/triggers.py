"""Backdoor triggers: pure, batched, seeded functions on uint8 images (B, H, W, 3).

    spec = TriggerSpec.from_config(cfg.poison)
    poisoned = apply_trigger(images, spec)          # same kind (np.ndarray / torch.Tensor) as `images`
    mask = trigger_region_mask(spec, H, W)          # (H, W) bool: pixels the trigger may change

Kinds (docs/method.md, Attacks):
- ``patch``   BadNets: a fixed noise patch (size x size x 3, drawn once from the seed) pasted at a corner
              or at a seeded random position per image. The same pattern in training and evaluation.
- ``solid``   a solid colour patch (default yellow), placed like ``patch``.
- ``blended`` ``image * (1 - alpha) + pattern * alpha`` with a fixed seeded uniform-noise image (H, W, 3).
- ``sig``     ``image + delta * sin(2 pi * frequency * col / W)`` (a horizontal sinusoid), clipped.

Every random draw comes from ``numpy.random.default_rng([seed, stream, ...])`` with a separate stream per
purpose, so patterns depend only on (seed, kind, size / image shape), never on global state or on batching.
Inputs are never modified in place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, TypeVar, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from otc_ray.config import PoisonConfig

KINDS = ("patch", "solid", "blended", "sig")
LOCATIONS = ("br", "bl", "tr", "tl", "random")
PATCH_KINDS = ("patch", "solid")

# Independent random streams (the second entropy word of the seed sequence).
_STREAM_NOISE_PATCH = 1
_STREAM_BLEND_PATTERN = 2
_STREAM_LOCATION = 3

ImageBatch = TypeVar("ImageBatch", np.ndarray, torch.Tensor)
RngSeed = Union[int, Sequence[int], np.ndarray, None]


@dataclass(frozen=True)
class TriggerSpec:
    """What trigger to stamp. Fields not used by `kind` are ignored (and still logged).

    kind: "patch" | "solid" | "blended" | "sig"
    size: patch side in pixels (patch, solid)
    location: "br" | "bl" | "tr" | "tl" | "random" (patch, solid)
    alpha: blend weight of the pattern in [0, 1] (blended)
    delta: SIG amplitude in pixel units, >= 0 (sig)
    frequency: SIG cycles across the image width, >= 0 (sig)
    seed: seeds the noise patch, the blend pattern and random locations
    color: RGB of the solid patch (solid)
    """

    kind: str = "patch"
    size: int = 4
    location: str = "br"
    alpha: float = 0.2
    delta: float = 20.0
    frequency: float = 6.0
    seed: int = 0
    color: tuple[int, int, int] = (255, 255, 0)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"trigger kind {self.kind!r} is not one of {KINDS}")
        if self.location not in LOCATIONS:
            raise ValueError(f"trigger location {self.location!r} is not one of {LOCATIONS}")
        if not _is_int(self.size) or self.size < 1:
            raise ValueError(f"trigger size must be an integer >= 1, got {self.size!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"trigger alpha must be in [0, 1], got {self.alpha}")
        if self.delta < 0:
            raise ValueError(f"trigger delta must be >= 0, got {self.delta}")
        if self.frequency < 0:
            raise ValueError(f"trigger frequency must be >= 0, got {self.frequency}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"trigger seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "seed", int(self.seed))
        color = tuple(int(c) for c in self.color)
        if len(color) != 3 or any(not 0 <= c <= 255 for c in color):
            raise ValueError(f"trigger color must be 3 integers in [0, 255], got {self.color!r}")
        object.__setattr__(self, "color", color)

    @classmethod
    def from_config(cls, poison_cfg: "PoisonConfig") -> "TriggerSpec":
        """The spec named by a `PoisonConfig` (trigger, trigger_size, trigger_location, blend_alpha, sig_*, seed)."""
        return cls(kind=poison_cfg.trigger, size=poison_cfg.trigger_size, location=poison_cfg.trigger_location,
                   alpha=poison_cfg.blend_alpha, delta=poison_cfg.sig_delta, frequency=poison_cfg.sig_frequency,
                   seed=poison_cfg.seed)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (for MLflow params and manifests); `color` as a list."""
        d = dataclasses.asdict(self)
        d["color"] = list(self.color)
        return d


# ----------------------------------------------------------------------------------------- patterns
def noise_patch(spec: TriggerSpec) -> np.ndarray:
    """The BadNets noise patch: uint8 (size, size, 3), uniform in [0, 255], a function of (seed, size) only."""
    rng = np.random.default_rng([spec.seed, _STREAM_NOISE_PATCH])
    return rng.integers(0, 256, size=(spec.size, spec.size, 3), dtype=np.uint8)


def solid_patch(spec: TriggerSpec) -> np.ndarray:
    """The solid colour patch: uint8 (size, size, 3) filled with `spec.color`."""
    return np.broadcast_to(np.asarray(spec.color, dtype=np.uint8), (spec.size, spec.size, 3)).copy()


def blend_pattern(spec: TriggerSpec, height: int, width: int) -> np.ndarray:
    """The blended trigger's pattern: uint8 (height, width, 3) uniform noise, a function of (seed, H, W) only."""
    rng = np.random.default_rng([spec.seed, _STREAM_BLEND_PATTERN])
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def sig_signal(spec: TriggerSpec, width: int) -> np.ndarray:
    """The SIG offset per column: float32 (width,), ``delta * sin(2 pi * frequency * col / width)``."""
    cols = np.arange(width, dtype=np.float64)
    return (spec.delta * np.sin(2.0 * np.pi * spec.frequency * cols / width)).astype(np.float32)


def patch_origins(spec: TriggerSpec, n: int, height: int, width: int, rng_seed: RngSeed = None) -> np.ndarray:
    """Top-left (row, col) of the patch for each of `n` images: int64 (n, 2).

    Corners are fixed. For ``random`` the position is uniform over all placements that fit, drawn from
    ``default_rng([spec.seed, stream, rng_seed])``: an int seeds the whole batch (image i gets the i-th draw),
    a sequence of n ints seeds each image on its own (e.g. per-sample key hashes, so a sample's position does
    not depend on its batch); None means rng_seed = 0.
    """
    _check_patch_fits(spec, height, width)
    s = spec.size
    corner = {"tl": (0, 0), "tr": (0, width - s), "bl": (height - s, 0), "br": (height - s, width - s)}
    if spec.location != "random":
        return np.tile(np.asarray(corner[spec.location], dtype=np.int64), (n, 1))
    high = np.array([height - s + 1, width - s + 1])
    if rng_seed is None or np.ndim(rng_seed) == 0:
        seed = 0 if rng_seed is None else _nonneg_int(rng_seed)
        rng = np.random.default_rng([spec.seed, _STREAM_LOCATION, seed])
        return rng.integers(0, high, size=(n, 2), dtype=np.int64)
    seeds = np.asarray(rng_seed)
    if seeds.shape != (n,):
        raise ValueError(f"rng_seed holds {seeds.shape} seeds; expected one int or one per image ({n},)")
    out = np.empty((n, 2), dtype=np.int64)
    for i, s_i in enumerate(seeds.tolist()):
        out[i] = np.random.default_rng([spec.seed, _STREAM_LOCATION, _nonneg_int(s_i)]).integers(0, high)
    return out


def trigger_region_mask(spec: TriggerSpec, height: int, width: int, n: int | None = None,
                        rng_seed: RngSeed = None) -> np.ndarray:
    """Pixels the trigger may change: bool (H, W), or (n, H, W) per image when `n` is given.

    Without `n`, a ``random`` patch may land anywhere, so the mask is the whole image; with `n` (and the
    same `rng_seed` as `apply_trigger`) it is each image's actual patch square. Blended and SIG: everything.
    """
    _check_patch_fits(spec, height, width)
    if spec.kind not in PATCH_KINDS or (n is None and spec.location == "random"):
        full = np.ones((height, width), dtype=bool)
        return full if n is None else np.broadcast_to(full, (n, height, width)).copy()
    origins = patch_origins(spec, 1 if n is None else n, height, width, rng_seed)
    rows, cols = np.arange(height), np.arange(width)
    r0, c0 = origins[:, 0, None], origins[:, 1, None]
    in_rows = (rows >= r0) & (rows < r0 + spec.size)          # (n, H)
    in_cols = (cols >= c0) & (cols < c0 + spec.size)          # (n, W)
    masks = in_rows[:, :, None] & in_cols[:, None, :]         # (n, H, W)
    return masks[0] if n is None else masks


# ----------------------------------------------------------------------------------------- entry point
def apply_trigger(images: ImageBatch, spec: TriggerSpec, rng_seed: RngSeed = None) -> ImageBatch:
    """Stamp `spec` on every image. images: uint8 (B, H, W, 3) np.ndarray or torch.Tensor (any device).

    Returns a new array of the same kind, shape, dtype and device. `rng_seed` only matters for
    ``location="random"`` (see `patch_origins`). Numpy and torch inputs give identical bytes.
    """
    is_numpy = isinstance(images, np.ndarray)
    if not is_numpy and not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if tuple(images.shape[-1:]) != (3,) or len(images.shape) != 4:
        raise ValueError(f"images must have shape (B, H, W, 3), got {tuple(images.shape)}")
    if (is_numpy and images.dtype != np.uint8) or (not is_numpy and images.dtype != torch.uint8):
        raise ValueError(f"images must be uint8, got {images.dtype}")
    x = torch.from_numpy(np.array(images, copy=True)) if is_numpy else images.detach().clone()
    out = _apply(x, spec, rng_seed)
    return out.numpy() if is_numpy else out


def _apply(x: torch.Tensor, spec: TriggerSpec, rng_seed: RngSeed) -> torch.Tensor:
    """Trigger on a private copy `x` (B, H, W, 3) uint8; may write into `x`."""
    b, h, w, _ = x.shape
    if spec.kind in PATCH_KINDS:
        patch = noise_patch(spec) if spec.kind == "patch" else solid_patch(spec)
        origins = torch.from_numpy(patch_origins(spec, b, h, w, rng_seed)).to(x.device)
        offs = torch.arange(spec.size, device=x.device)
        rows = (origins[:, 0, None] + offs)[:, :, None]           # (B, s, 1)
        cols = (origins[:, 1, None] + offs)[:, None, :]           # (B, 1, s)
        batch = torch.arange(b, device=x.device)[:, None, None]   # (B, 1, 1)
        x[batch, rows, cols] = torch.from_numpy(patch).to(x.device)
        return x
    if spec.kind == "blended":
        pattern = torch.from_numpy(blend_pattern(spec, h, w)).to(x.device, torch.float32)
        mixed = x.to(torch.float32) * (1.0 - spec.alpha) + pattern * spec.alpha
        return mixed.round().clamp(0, 255).to(torch.uint8)
    signal = torch.from_numpy(sig_signal(spec, w)).to(x.device)       # (W,)
    shifted = x.to(torch.float32) + signal[None, None, :, None]
    return shifted.round().clamp(0, 255).to(torch.uint8)


def _check_patch_fits(spec: TriggerSpec, height: int, width: int) -> None:
    if spec.kind in PATCH_KINDS and (spec.size > height or spec.size > width):
        raise ValueError(f"trigger patch of size {spec.size} does not fit images of {height}x{width}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _nonneg_int(value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"rng_seed values must be integers >= 0, got {value!r}")
    return int(value)
