"""Backdoor triggers: pure, batched, seeded functions on uint8 images (B, H, W, 3).

    spec = TriggerSpec.from_config(cfg.poison)
    poisoned = apply_trigger(images, spec)          # same kind (np.ndarray / torch.Tensor) as `images`
    mask = trigger_region_mask(spec, H, W)          # (H, W) bool: pixels the trigger may change

Kinds (docs/method.md, Attacks):
- ``patch``   BadNets: a fixed noise patch (size x size x 3, drawn once from the seed) pasted at a corner
              or at a seeded random position per image. The same pattern in training and evaluation.
              ``per_image``: a fresh patch per image (CleanCLIP's reference BadNet): each channel's mean over
              the image plus 255 x standard normal noise, clipped to [0, 255].
- ``solid``   a solid colour patch (default yellow), placed like ``patch``.
- ``blended`` ``image * (1 - alpha) + pattern * alpha`` with a fixed seeded uniform-noise image (H, W, 3);
              ``per_image``: a fresh uniform-noise pattern per image (CleanCLIP's blended attack, alpha 0.2).
- ``sig``     ``image + delta * sin(2 pi * frequency * col / W + phase)`` (a horizontal sinusoid), clipped;
              phase 0, or with ``per_image`` uniform in [0, 2 pi) per image.
- ``wanet``   WaNet warping: one smooth warp field for every image, uniform noise on a (2, k, k) control grid
              (k = ``warp_grid``) scaled to mean |value| 1, upsampled bicubically to (H, W); the sampling grid
              is ``identity + strength * field / H`` in [-1, 1] coordinates (clamped), applied bilinearly.

Every random draw comes from ``numpy.random.default_rng([seed, stream, ...])`` with a separate stream per
purpose, so patterns depend only on (seed, kind, size / image shape) and, for per-image draws, the image's
`rng_seed`, never on global state or on batching. Inputs are never modified in place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, TypeVar, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from otc_ray.config import PoisonConfig

KINDS = ("patch", "solid", "blended", "sig", "wanet")
LOCATIONS = ("br", "bl", "tr", "tl", "random")
PATCH_KINDS = ("patch", "solid")
PER_IMAGE_KINDS = ("patch", "blended", "sig")       # kinds with a random part that `per_image` redraws

# Independent random streams (the second entropy word of the seed sequence).
_STREAM_NOISE_PATCH = 1
_STREAM_BLEND_PATTERN = 2
_STREAM_LOCATION = 3
_STREAM_PATCH_PER_IMAGE = 4
_STREAM_BLEND_PER_IMAGE = 5
_STREAM_SIG_PHASE = 6
_STREAM_WARP = 7

ImageBatch = TypeVar("ImageBatch", np.ndarray, torch.Tensor)
RngSeed = Union[int, Sequence[int], np.ndarray, None]


@dataclass(frozen=True)
class TriggerSpec:
    """What trigger to stamp. Fields not used by `kind` are ignored (and still logged).

    kind: "patch" | "solid" | "blended" | "sig" | "wanet"
    size: patch side in pixels (patch, solid)
    location: "br" | "bl" | "tr" | "tl" | "random" (patch, solid)
    alpha: blend weight of the pattern in [0, 1] (blended)
    delta: SIG amplitude in pixel units, >= 0 (sig)
    frequency: SIG cycles across the image width, >= 0 (sig)
    seed: seeds the noise patch, the blend pattern, random locations, per-image draws and the warp field
    color: RGB of the solid patch (solid)
    per_image: draw the trigger's random part afresh per image (patch noise, blend pattern, SIG phase)
    warp_grid: WaNet control grid side k >= 2 (wanet)
    warp_strength: WaNet strength s >= 0 (wanet)
    """

    kind: str = "patch"
    size: int = 4
    location: str = "br"
    alpha: float = 0.2
    delta: float = 20.0
    frequency: float = 6.0
    seed: int = 0
    color: tuple[int, int, int] = (255, 255, 0)
    per_image: bool = False
    warp_grid: int = 4
    warp_strength: float = 0.5

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
        if not isinstance(self.per_image, (bool, np.bool_)):
            raise ValueError(f"trigger per_image must be a bool, got {self.per_image!r}")
        if self.per_image and self.kind not in PER_IMAGE_KINDS:
            raise ValueError(f"trigger per_image applies to {PER_IMAGE_KINDS} (their random part); "
                             f"{self.kind!r} has none to redraw")
        if not _is_int(self.warp_grid) or self.warp_grid < 2:
            raise ValueError(f"trigger warp_grid must be an integer >= 2, got {self.warp_grid!r}")
        if self.warp_strength < 0:
            raise ValueError(f"trigger warp_strength must be >= 0, got {self.warp_strength}")
        object.__setattr__(self, "per_image", bool(self.per_image))
        object.__setattr__(self, "warp_grid", int(self.warp_grid))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "seed", int(self.seed))
        color = tuple(int(c) for c in self.color)
        if len(color) != 3 or any(not 0 <= c <= 255 for c in color):
            raise ValueError(f"trigger color must be 3 integers in [0, 255], got {self.color!r}")
        object.__setattr__(self, "color", color)

    @classmethod
    def from_config(cls, poison_cfg: "PoisonConfig") -> "TriggerSpec":
        """The spec named by a `PoisonConfig` (trigger, trigger_size, trigger_location, blend_alpha, sig_*,
        trigger_per_image, warp_*, seed)."""
        return cls(kind=poison_cfg.trigger, size=poison_cfg.trigger_size, location=poison_cfg.trigger_location,
                   alpha=poison_cfg.blend_alpha, delta=poison_cfg.sig_delta, frequency=poison_cfg.sig_frequency,
                   seed=poison_cfg.seed, per_image=poison_cfg.trigger_per_image, warp_grid=poison_cfg.warp_grid,
                   warp_strength=poison_cfg.warp_strength)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TriggerSpec":
        """The spec of `to_dict` (a manifest's `trigger` column); fields an older manifest lacks take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"trigger spec has unknown fields {unknown}")
        return cls(**{**d, "color": tuple(d.get("color", (255, 255, 0)))})

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


def sig_signal(spec: TriggerSpec, width: int, phase: float = 0.0) -> np.ndarray:
    """The SIG offset per column: float32 (width,), ``delta * sin(2 pi * frequency * col / width + phase)``."""
    cols = np.arange(width, dtype=np.float64)
    return (spec.delta * np.sin(2.0 * np.pi * spec.frequency * cols / width + phase)).astype(np.float32)


def image_rngs(spec: TriggerSpec, stream: int, n: int, rng_seed: RngSeed = None) -> list[np.random.Generator]:
    """One generator per image for per-image draws: ``default_rng([spec.seed, stream, s_i])`` for a sequence of
    n seeds (e.g. key hashes: an image's draw does not depend on its batch), ``[spec.seed, stream, r, i]`` for
    one int r (None = 0)."""
    if rng_seed is None or np.ndim(rng_seed) == 0:
        r = 0 if rng_seed is None else _nonneg_int(rng_seed)
        return [np.random.default_rng([spec.seed, stream, r, i]) for i in range(n)]
    seeds = np.asarray(rng_seed)
    if seeds.shape != (n,):
        raise ValueError(f"rng_seed holds {seeds.shape} seeds; expected one int or one per image ({n},)")
    return [np.random.default_rng([spec.seed, stream, _nonneg_int(s)]) for s in seeds.tolist()]


def sig_phases(spec: TriggerSpec, n: int, rng_seed: RngSeed = None) -> np.ndarray:
    """SIG phase per image: float64 (n,), zeros, or with ``per_image`` uniform in [0, 2 pi) per image."""
    if not spec.per_image:
        return np.zeros(n)
    return np.array([g.uniform(0.0, 2.0 * np.pi) for g in image_rngs(spec, _STREAM_SIG_PHASE, n, rng_seed)])


def warp_field(spec: TriggerSpec, height: int, width: int) -> np.ndarray:
    """WaNet's warp field: float32 (H, W, 2) (x, y offsets before scaling), a function of (seed, k, H, W) only:
    uniform [-1, 1] on a (2, k, k) grid, divided by its mean |value|, bicubically upsampled (align corners)."""
    rng = np.random.default_rng([spec.seed, _STREAM_WARP, spec.warp_grid])
    grid = rng.uniform(-1.0, 1.0, size=(1, 2, spec.warp_grid, spec.warp_grid))
    grid = torch.from_numpy(grid / np.abs(grid).mean()).to(torch.float32)
    up = torch.nn.functional.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)
    return up[0].permute(1, 2, 0).contiguous().numpy()


def warp_grid_coords(spec: TriggerSpec, height: int, width: int) -> torch.Tensor:
    """The sampling grid of `torch.nn.functional.grid_sample`: float32 (1, H, W, 2) (x, y) in [-1, 1],
    ``identity + strength * field / H``, clamped (WaNet's definition)."""
    ys = torch.linspace(-1.0, 1.0, height)
    xs = torch.linspace(-1.0, 1.0, width)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((xx, yy), dim=-1)                               # (H, W, 2)
    field = torch.from_numpy(warp_field(spec, height, width))
    return (identity + spec.warp_strength * field / height).clamp(-1.0, 1.0)[None]


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
    same `rng_seed` as `apply_trigger`) it is each image's actual patch square. Blended, SIG, WaNet: everything.
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
    ``location="random"`` (see `patch_origins`) and ``per_image`` draws (see `image_rngs`): one int for the
    batch, or one per image (N,). Numpy and torch inputs give identical bytes.
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
    if b == 0:
        return x
    if spec.kind in PATCH_KINDS:
        if spec.per_image:
            patch = torch.from_numpy(fresh_patches(spec, x.cpu().numpy(), rng_seed)).to(x.device)  # (B, s, s, 3)
        else:
            patch = torch.from_numpy(noise_patch(spec) if spec.kind == "patch" else solid_patch(spec)).to(x.device)
        origins = torch.from_numpy(patch_origins(spec, b, h, w, rng_seed)).to(x.device)
        offs = torch.arange(spec.size, device=x.device)
        rows = (origins[:, 0, None] + offs)[:, :, None]           # (B, s, 1)
        cols = (origins[:, 1, None] + offs)[:, None, :]           # (B, 1, s)
        batch = torch.arange(b, device=x.device)[:, None, None]   # (B, 1, 1)
        x[batch, rows, cols] = patch
        return x
    if spec.kind == "blended":
        if spec.per_image:
            pattern = np.stack([g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                                for g in image_rngs(spec, _STREAM_BLEND_PER_IMAGE, b, rng_seed)])
        else:
            pattern = blend_pattern(spec, h, w)[None]
        pattern_t = torch.from_numpy(pattern).to(x.device, torch.float32)
        mixed = x.to(torch.float32) * (1.0 - spec.alpha) + pattern_t * spec.alpha
        return mixed.round().clamp(0, 255).to(torch.uint8)
    if spec.kind == "wanet":
        grid = warp_grid_coords(spec, h, w).to(x.device).expand(b, h, w, 2)
        src = x.permute(0, 3, 1, 2).to(torch.float32)                                     # (B, 3, H, W)
        warped = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="border",
                                                 align_corners=True)
        return warped.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).contiguous()
    phases = sig_phases(spec, b, rng_seed)
    signal = torch.from_numpy(np.stack([sig_signal(spec, w, p) for p in phases])).to(x.device)   # (B, W)
    shifted = x.to(torch.float32) + signal[:, None, :, None]
    return shifted.round().clamp(0, 255).to(torch.uint8)


def fresh_patches(spec: TriggerSpec, images: np.ndarray, rng_seed: RngSeed = None) -> np.ndarray:
    """CleanCLIP's per-image BadNet patch for each image: uint8 (B, size, size, 3), the image's per-channel mean
    plus 255 x standard normal noise, clipped; images uint8 (B, H, W, 3)."""
    means = images.reshape(len(images), -1, 3).mean(axis=1)                                # (B, 3)
    draws = np.stack([g.standard_normal((spec.size, spec.size, 3))
                      for g in image_rngs(spec, _STREAM_PATCH_PER_IMAGE, len(images), rng_seed)])
    return np.clip(np.rint(means[:, None, None, :] + 255.0 * draws), 0, 255).astype(np.uint8)


def _check_patch_fits(spec: TriggerSpec, height: int, width: int) -> None:
    if spec.kind in PATCH_KINDS and (spec.size > height or spec.size > width):
        raise ValueError(f"trigger patch of size {spec.size} does not fit images of {height}x{width}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _nonneg_int(value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"rng_seed values must be integers >= 0, got {value!r}")
    return int(value)
