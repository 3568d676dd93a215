"""Triggers: shape/dtype/range, determinism, where they write, numpy == torch, config round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otc_ray.config import PoisonConfig
from otc_ray.poison.triggers import (
    KINDS,
    LOCATIONS,
    TriggerSpec,
    apply_trigger,
    blend_pattern,
    noise_patch,
    patch_origins,
    sig_signal,
    trigger_region_mask,
)

H, W = 32, 24   # not square, so rows and columns cannot be swapped unnoticed

ALL_SPECS = [TriggerSpec(kind=k, location=loc, size=5, seed=3) for k in ("patch", "solid") for loc in LOCATIONS] + [
    TriggerSpec(kind="blended", alpha=0.3, seed=3), TriggerSpec(kind="sig", delta=25.0, frequency=4.0)]
SPEC_IDS = [f"{s.kind}-{s.location}" if s.kind in ("patch", "solid") else s.kind for s in ALL_SPECS]


def _images(b: int = 6, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=SPEC_IDS)
def test_shape_dtype_and_input_untouched(spec: TriggerSpec) -> None:
    x = _images()
    before = x.copy()
    out = apply_trigger(x, spec, rng_seed=1)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == x.shape
    assert not np.shares_memory(out, x)
    np.testing.assert_array_equal(x, before)
    assert (out != x).any()
    xt = torch.from_numpy(before.copy())
    out_t = apply_trigger(xt, spec, rng_seed=1)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.uint8 and out_t.shape == xt.shape
    assert torch.equal(xt, torch.from_numpy(before))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=SPEC_IDS)
def test_numpy_and_torch_give_the_same_bytes(spec: TriggerSpec) -> None:
    x = _images()
    from_torch = apply_trigger(torch.from_numpy(x), spec, rng_seed=5).numpy()
    np.testing.assert_array_equal(apply_trigger(x, spec, rng_seed=5), from_torch)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=SPEC_IDS)
def test_same_seed_same_bytes(spec: TriggerSpec) -> None:
    x = _images()
    a = apply_trigger(x, spec, rng_seed=2)
    b = apply_trigger(x.copy(), TriggerSpec(**spec.to_dict()), rng_seed=2)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("kind", ["patch", "blended"])
def test_different_seed_gives_a_different_pattern(kind: str) -> None:
    x = _images()
    a = apply_trigger(x, TriggerSpec(kind=kind, seed=0))
    b = apply_trigger(x, TriggerSpec(kind=kind, seed=1))
    assert not np.array_equal(a, b)
    assert not np.array_equal(noise_patch(TriggerSpec(seed=0)), noise_patch(TriggerSpec(seed=1)))


def test_noise_pattern_is_fixed_across_images_calls_and_batches() -> None:
    """The BadNets patch is the same for every image, for training and evaluation data alike."""
    spec = TriggerSpec(kind="patch", size=4, location="tl", seed=9)
    train = apply_trigger(_images(b=5, seed=0), spec)
    test = apply_trigger(_images(b=3, seed=1), spec)
    for img in np.concatenate([train, test]):
        np.testing.assert_array_equal(img[:4, :4], noise_patch(spec))
    assert len(np.unique(noise_patch(spec))) > 10     # noise, not a flat colour


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if s.kind in ("patch", "solid")], ids=lambda s: s.location)
def test_patch_writes_its_pattern_inside_its_region_and_nothing_outside(spec: TriggerSpec) -> None:
    x = _images(b=8)
    out = apply_trigger(x, spec, rng_seed=4)
    masks = trigger_region_mask(spec, H, W, n=len(x), rng_seed=4)
    assert masks.shape == (8, H, W) and (masks.sum(axis=(1, 2)) == spec.size ** 2).all()
    expected = noise_patch(spec) if spec.kind == "patch" else np.broadcast_to(np.uint8(spec.color), (5, 5, 3))
    for img, new, m in zip(x, out, masks):
        np.testing.assert_array_equal(new[~m], img[~m])
        np.testing.assert_array_equal(new[m].reshape(spec.size, spec.size, 3), expected)


@pytest.mark.parametrize("location, rows, cols", [
    ("tl", slice(0, 5), slice(0, 5)), ("tr", slice(0, 5), slice(W - 5, W)),
    ("bl", slice(H - 5, H), slice(0, 5)), ("br", slice(H - 5, H), slice(W - 5, W))])
def test_corner_masks_sit_in_their_corner(location: str, rows: slice, cols: slice) -> None:
    mask = trigger_region_mask(TriggerSpec(location=location, size=5), H, W)
    expected = np.zeros((H, W), dtype=bool)
    expected[rows, cols] = True
    np.testing.assert_array_equal(mask, expected)


def test_union_masks_of_global_and_random_triggers_cover_the_image() -> None:
    for spec in (TriggerSpec(kind="blended"), TriggerSpec(kind="sig"), TriggerSpec(location="random")):
        assert trigger_region_mask(spec, H, W).all()


def test_random_location_varies_per_image_and_is_deterministic() -> None:
    spec = TriggerSpec(location="random", size=4, seed=1)
    origins = patch_origins(spec, 16, H, W, rng_seed=0)
    assert len({tuple(o) for o in origins}) > 4
    assert (origins >= 0).all() and (origins[:, 0] <= H - 4).all() and (origins[:, 1] <= W - 4).all()
    np.testing.assert_array_equal(origins, patch_origins(spec, 16, H, W, rng_seed=0))
    assert not np.array_equal(origins, patch_origins(spec, 16, H, W, rng_seed=1))
    assert not np.array_equal(origins, patch_origins(TriggerSpec(location="random", size=4, seed=2), 16, H, W, 0))
    x = _images(b=16)
    np.testing.assert_array_equal(apply_trigger(x, spec, rng_seed=0), apply_trigger(x, spec, rng_seed=0))


def test_random_locations_cover_the_whole_range() -> None:
    origins = patch_origins(TriggerSpec(location="random", size=4), 4000, 8, 6, rng_seed=0)
    assert set(origins[:, 0].tolist()) == set(range(5)) and set(origins[:, 1].tolist()) == set(range(3))


def test_per_image_seeds_do_not_depend_on_the_batch() -> None:
    spec = TriggerSpec(location="random", size=3, seed=5)
    batch = patch_origins(spec, 3, H, W, rng_seed=[70, 80, 90])
    np.testing.assert_array_equal(batch[1], patch_origins(spec, 1, H, W, rng_seed=[80])[0])
    x = _images(b=3)
    together = apply_trigger(x, spec, rng_seed=np.array([70, 80, 90]))
    np.testing.assert_array_equal(together[2:], apply_trigger(x[2:], spec, rng_seed=[90]))


def test_blended_follows_its_formula() -> None:
    x = _images()
    spec = TriggerSpec(kind="blended", alpha=0.25, seed=7)
    pattern = blend_pattern(spec, H, W)
    assert pattern.shape == (H, W, 3) and pattern.dtype == np.uint8
    expected = x.astype(np.float64) * 0.75 + pattern.astype(np.float64) * 0.25
    assert np.abs(apply_trigger(x, spec).astype(np.float64) - expected).max() <= 0.5 + 1e-4
    np.testing.assert_array_equal(apply_trigger(x, TriggerSpec(kind="blended", alpha=0.0)), x)
    one = TriggerSpec(kind="blended", alpha=1.0, seed=7)
    np.testing.assert_array_equal(apply_trigger(x, one), np.broadcast_to(pattern, x.shape))


def test_sig_is_a_horizontal_sinusoid_added_and_clipped() -> None:
    spec = TriggerSpec(kind="sig", delta=20.0, frequency=3.0)
    gray = np.full((2, H, W, 3), 128, dtype=np.uint8)
    diff = apply_trigger(gray, spec).astype(np.int64) - 128
    cols = np.arange(W)
    expected = np.round(20.0 * np.sin(2 * np.pi * 3.0 * cols / W)).astype(np.int64)
    np.testing.assert_array_equal(diff, np.broadcast_to(expected[None, None, :, None], diff.shape))
    np.testing.assert_allclose(sig_signal(spec, W), 20.0 * np.sin(2 * np.pi * 3.0 * cols / W), atol=1e-5)
    white = apply_trigger(np.full((1, H, W, 3), 250, dtype=np.uint8), spec)
    assert white.max() == 255 and (white[..., expected > 5, :] == 255).all()
    black = apply_trigger(np.zeros((1, H, W, 3), dtype=np.uint8), spec)
    assert (black[..., expected < 0, :] == 0).all() and black.max() == 20
    x = _images()
    np.testing.assert_array_equal(apply_trigger(x, TriggerSpec(kind="sig", delta=0.0)), x)


def test_from_config_and_to_dict_round_trip() -> None:
    cfg = PoisonConfig(trigger="sig", trigger_size=6, trigger_location="tl", blend_alpha=0.4, sig_delta=30.0,
                       sig_frequency=2.0, seed=11)
    spec = TriggerSpec.from_config(cfg)
    assert (spec.kind, spec.size, spec.location, spec.alpha, spec.delta, spec.frequency, spec.seed) == (
        "sig", 6, "tl", 0.4, 30.0, 2.0, 11)
    d = json.loads(json.dumps(spec.to_dict()))
    assert TriggerSpec(**d) == spec
    assert TriggerSpec.from_config(PoisonConfig()) == TriggerSpec()


def test_empty_batch() -> None:
    for spec in ALL_SPECS:
        out = apply_trigger(np.zeros((0, H, W, 3), dtype=np.uint8), spec)
        assert out.shape == (0, H, W, 3)


@pytest.mark.parametrize("bad", [dict(kind="warped"), dict(location="centre"), dict(size=0), dict(size=2.5),
                                 dict(alpha=1.5), dict(delta=-1.0), dict(seed=-1), dict(color=(0, 0, 256))])
def test_invalid_spec_raises(bad: dict) -> None:
    with pytest.raises(ValueError):
        TriggerSpec(**bad)


def test_invalid_images_raise_with_sizes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        apply_trigger(np.zeros((1, 8, 8, 3), dtype=np.float32), TriggerSpec())
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        apply_trigger(np.zeros((8, 8, 3), dtype=np.uint8), TriggerSpec())
    with pytest.raises(ValueError, match="size 9 does not fit images of 8x16"):
        apply_trigger(np.zeros((1, 8, 16, 3), dtype=np.uint8), TriggerSpec(size=9))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        apply_trigger(_images(b=3), TriggerSpec(location="random"), rng_seed=[1, 2])


@settings(max_examples=40, deadline=None, database=None)
@given(kind=st.sampled_from(KINDS), location=st.sampled_from(LOCATIONS), size=st.integers(1, 6),
       h=st.integers(6, 12), w=st.integers(6, 12), b=st.integers(1, 4), seed=st.integers(0, 2**32),
       rng_seed=st.integers(0, 2**32))
def test_any_trigger_stays_in_its_region(kind, location, size, h, w, b, seed, rng_seed) -> None:
    spec = TriggerSpec(kind=kind, location=location, size=size, seed=seed)
    x = _images(b=b, seed=seed % 1000, h=h, w=w)
    out = apply_trigger(x, spec, rng_seed=rng_seed)
    assert out.dtype == np.uint8 and out.shape == x.shape
    masks = trigger_region_mask(spec, h, w, n=b, rng_seed=rng_seed)
    assert (out[~masks] == x[~masks]).all()
    assert (trigger_region_mask(spec, h, w)[None] | ~masks).all()   # the (H, W) mask covers every image's
