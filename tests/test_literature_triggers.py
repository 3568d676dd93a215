"""The literature's triggers as pure functions: CleanCLIP's BadNet (fresh noise per image at a random place),
per-image blended noise, SIG with a random phase per image, and WaNet warping. Each test checks what the trigger
writes: where, what, differing across images, reproducible from the seed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from otc_ray.config import ConfigError, PoisonConfig
from otc_ray.poison.triggers import TriggerSpec, apply_trigger, noise_patch, trigger_region_mask, warp_field

H, W = 32, 24     # not square: rows and columns cannot be swapped unnoticed


def _images(b: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(b, H, W, 3), dtype=np.uint8)


def _grey(b: int, level: int = 128) -> np.ndarray:
    return np.full((b, H, W, 3), level, dtype=np.uint8)


SEEDS = np.array([11, 22, 33, 44, 55, 66, 77, 88])


# ----------------------------------------------------------------------------------------- BadNet, per image
def test_per_image_badnet_writes_fresh_noise_inside_each_images_own_square_only() -> None:
    spec = TriggerSpec(kind="patch", size=5, location="random", per_image=True, seed=4)
    x = _images()
    out = apply_trigger(x, spec, rng_seed=SEEDS)
    squares = trigger_region_mask(spec, H, W, n=len(x), rng_seed=SEEDS)          # (B, H, W)
    changed = (out != x).any(axis=-1)
    assert not (changed & ~squares).any()                                       # nothing outside the square
    assert (changed & squares).sum(axis=(1, 2)).min() >= 20                     # the square is rewritten (25 px)
    origins = {tuple(np.argwhere(m)[0]) for m in squares}
    assert len(origins) >= 6                                                    # places differ across images
    patches = [out[i][squares[i]] for i in range(len(x))]                       # (25, 3) each
    assert len({p.tobytes() for p in patches}) == len(x)                        # fresh noise: all differ
    fixed = noise_patch(TriggerSpec(kind="patch", size=5, seed=4)).reshape(-1, 3)
    assert all(p.tobytes() != fixed.tobytes() for p in patches)                 # not the fixed BadNets patch
    again = apply_trigger(x.copy(), TriggerSpec(**spec.to_dict()), rng_seed=SEEDS)
    assert again.tobytes() == out.tobytes()                                     # reproducible from the seeds
    one = apply_trigger(x[3:4], spec, rng_seed=SEEDS[3:4])
    np.testing.assert_array_equal(one[0], out[3])                               # independent of the batch
    other = apply_trigger(x, TriggerSpec(**{**spec.to_dict(), "seed": 5}), rng_seed=SEEDS)
    assert other.tobytes() != out.tobytes()


def test_per_image_badnet_noise_is_the_images_channel_mean_plus_unit_normal_noise() -> None:
    """CleanCLIP's BadNet: patch = per-channel image mean + N(0, 1) in [0, 1] units, clipped. On a flat image of
    level (64, 128, 192) over many 16 px patches: the clipped-normal fractions of each channel are those of
    N(level, 255) (a fixed uniform patch would give ~50% above 128 on every channel)."""
    spec = TriggerSpec(kind="patch", size=16, location="tl", per_image=True, seed=1)
    flat = np.broadcast_to(np.array([64, 128, 192], np.uint8), (200, H, W, 3)).copy()
    values = apply_trigger(flat, spec, rng_seed=np.arange(200))[:, :16, :16].reshape(-1, 3).astype(np.float64)
    from math import erf, sqrt

    for c, level in enumerate((64, 128, 192)):
        want_zero = 0.5 * (1 + erf((0 - level) / 255 / sqrt(2)))           # P(mean + 255 z <= 0)
        want_full = 1 - 0.5 * (1 + erf((255 - level) / 255 / sqrt(2)))     # P(mean + 255 z >= 255)
        assert (values[:, c] == 0).mean() == pytest.approx(want_zero, abs=0.01)
        assert (values[:, c] == 255).mean() == pytest.approx(want_full, abs=0.01)


# ----------------------------------------------------------------------------------------- blended, per image
def test_per_image_blend_mixes_a_fresh_uniform_pattern_into_every_pixel_at_alpha() -> None:
    spec = TriggerSpec(kind="blended", alpha=0.2, per_image=True, seed=2)
    zeros = _grey(8, 0)
    out = apply_trigger(zeros, spec, rng_seed=SEEDS).astype(np.int64)     # = round(0.2 * pattern)
    assert out.min() == 0 and out.max() == 51                              # 0.2 x [0, 255]
    assert len({o.tobytes() for o in out}) == 8                            # a new pattern per image
    corr = np.corrcoef(out.reshape(8, -1))[np.triu_indices(8, 1)]
    assert np.abs(corr).max() < 0.1                 # independent draws (n = 2304: |r| ~ 0.02; one pattern: 1)
    x = _images()
    mixed = apply_trigger(x, spec, rng_seed=SEEDS).astype(np.float64)
    pattern = out / 0.2                                                     # each image's pattern (+-2.5 rounding)
    np.testing.assert_allclose(mixed, 0.8 * x + 0.2 * pattern, atol=1.01)  # image * 0.8 + pattern * 0.2
    fixed = apply_trigger(zeros, TriggerSpec(kind="blended", alpha=0.2, seed=2), rng_seed=SEEDS)
    assert len({o.tobytes() for o in fixed}) == 1                          # the old fixed pattern stays
    assert apply_trigger(zeros, spec, rng_seed=SEEDS).tobytes() == out.astype(np.uint8).tobytes()


# ----------------------------------------------------------------------------------------- SIG, random phase
def _phase(row: np.ndarray, delta: float, freq: float) -> float:
    cols = np.arange(W)
    grid = np.linspace(0, 2 * np.pi, 3600, endpoint=False)
    fits = [np.abs(row - (128 + delta * np.sin(2 * np.pi * freq * cols / W + p))).max() for p in grid]
    return float(grid[int(np.argmin(fits))]), float(min(fits))


def test_sig_random_phase_is_a_horizontal_sinusoid_with_its_own_phase_per_image() -> None:
    spec = TriggerSpec(kind="sig", delta=40.0, frequency=3.0, per_image=True, seed=7)
    out = apply_trigger(_grey(8), spec, rng_seed=SEEDS).astype(np.float64)
    assert (out == out[:, :1]).all()                                  # every row the same: a horizontal signal
    assert (out == out[..., :1]).all()                                # every channel the same
    fits = [_phase(o[0, :, 0], 40.0, 3.0) for o in out]
    assert max(err for _, err in fits) <= 0.51                        # the sinusoid up to rounding
    phases = np.array([p for p, _ in fits])
    assert len({round(p, 2) for p in phases}) == 8                    # a different phase per image
    plain = apply_trigger(_grey(2), TriggerSpec(kind="sig", delta=40.0, frequency=3.0), rng_seed=SEEDS[:2])
    assert _phase(plain[0, 0, :, 0].astype(np.float64), 40.0, 3.0)[0] == pytest.approx(0.0, abs=1e-3)
    again = apply_trigger(_grey(8), spec, rng_seed=SEEDS)
    assert again.tobytes() == out.astype(np.uint8).tobytes()


# ----------------------------------------------------------------------------------------- WaNet
def test_wanet_field_is_a_smooth_upsampling_of_a_k_by_k_grid_with_mean_abs_one() -> None:
    spec = TriggerSpec(kind="wanet", warp_grid=4, warp_strength=0.5, seed=3)
    field = warp_field(spec, 31, 31)                                    # 31 = 3 x 10 + 1: control points land on pixels
    assert field.shape == (31, 31, 2)
    control = field[::10, ::10]                                         # the 4 x 4 grid values (align corners)
    assert np.abs(control).mean() == pytest.approx(1.0, abs=1e-5)
    step = np.abs(np.diff(field, axis=0)).max(), np.abs(np.diff(field, axis=1)).max()
    assert max(step) < 0.5                                              # smooth: no jumps between neighbours
    assert not np.allclose(field, warp_field(TriggerSpec(kind="wanet", seed=4), 31, 31))
    np.testing.assert_array_equal(field, warp_field(TriggerSpec(**spec.to_dict()), 31, 31))


def test_wanet_is_one_warp_for_every_image_that_moves_content_by_a_fraction_of_a_pixel() -> None:
    spec = TriggerSpec(kind="wanet", warp_grid=4, warp_strength=0.5, seed=3)
    x = _images(6)
    out = apply_trigger(x, spec, rng_seed=SEEDS[:6])
    for i in range(6):                                                  # the same warp, whatever the batch / seeds
        np.testing.assert_array_equal(apply_trigger(x[i:i + 1], spec, rng_seed=999)[0], out[i])
    assert (out != x).mean() > 0.5                                      # most pixels move
    ramp = np.broadcast_to(np.arange(W, dtype=np.float64)[None, :, None] * 10, (H, W, 3))   # x = col * 10
    warped = apply_trigger(ramp.astype(np.uint8)[None], spec)[0].astype(np.float64)
    dx_px = (warped - ramp)[1:-1, 1:-1, 0] / 10                          # horizontal displacement in pixels
    bound = 0.5 * np.abs(warp_field(spec, H, W)[..., 0]).max() / H * (W - 1) / 2
    assert 0.05 < np.abs(dx_px).max() <= bound + 0.06                   # s * field / H in [-1, 1] units
    none = apply_trigger(x, TriggerSpec(kind="wanet", warp_strength=0.0))
    np.testing.assert_array_equal(none, x)                               # strength 0: the identity
    assert trigger_region_mask(spec, H, W).all()


# ----------------------------------------------------------------------------------------- spec and config
def test_numpy_torch_agree_and_specs_round_trip_through_json() -> None:
    import json

    for spec in (TriggerSpec(kind="patch", location="random", per_image=True),
                 TriggerSpec(kind="blended", per_image=True),
                 TriggerSpec(kind="sig", per_image=True), TriggerSpec(kind="wanet", warp_grid=5, warp_strength=0.7)):
        x = _images(4)
        np.testing.assert_array_equal(apply_trigger(x, spec, rng_seed=SEEDS[:4]),
                                      apply_trigger(torch.from_numpy(x), spec, rng_seed=SEEDS[:4]).numpy())
        assert TriggerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = {k: v for k, v in TriggerSpec().to_dict().items() if k not in ("per_image", "warp_grid", "warp_strength")}
    assert TriggerSpec.from_dict(old) == TriggerSpec()                  # a manifest written before these fields
    with pytest.raises(ValueError, match="unknown fields"):
        TriggerSpec.from_dict({"kind": "patch", "jitter": 2})


def test_bad_literature_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="per_image applies to"):
        TriggerSpec(kind="wanet", per_image=True)
    with pytest.raises(ValueError, match="warp_grid"):
        TriggerSpec(kind="wanet", warp_grid=1)
    with pytest.raises(ConfigError, match="trigger_per_image"):
        PoisonConfig(trigger="solid", trigger_per_image=True)
    with pytest.raises(ConfigError, match="base_nearest"):
        PoisonConfig(base_nearest=2, base_classes=("bag",))
    spec = TriggerSpec.from_config(PoisonConfig(trigger="wanet", warp_grid=6, warp_strength=0.25, seed=9))
    assert (spec.kind, spec.warp_grid, spec.warp_strength, spec.seed) == ("wanet", 6, 0.25, 9)
    assert TriggerSpec.from_config(PoisonConfig(trigger="sig", trigger_per_image=True)).per_image
