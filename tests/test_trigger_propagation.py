"""Trigger propagation (rematch/trigger.py and the flag store): the pixel pattern a noisy flagged set shares is
found and carried to every triggered image, and flags without a separate shared pattern (one kind of image, a
random set, too few flags, a trigger at a random place, a patch the content of the images also fills) give none."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from otc_ray.config import ConfigError, ModelConfig, OTConfig, RematchConfig, validate
from otc_ray.data import schema
from otc_ray.data.builtin import generate
from otc_ray.poison.triggers import TriggerSpec, apply_trigger
from otc_ray.rematch.trigger import (PATTERN_SIDE, PropagateConfig, estimate_pattern, pattern_match,
                                     pixel_grid, separate_cluster)

N, POISONED = 600, 30


def _chunk(name: str):
    chunk = next(iter(generate(name, "train", N, seed=5, image_size=32)))
    return np.stack(chunk["images"]), list(chunk["keys"]), list(chunk["captions"]), np.asarray(chunk["labels"])


@pytest.fixture(scope="module")
def fashion():
    return _chunk("fashion")


def _flag_set(grid: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, float]:
    return grid[rows].sum(0), float(len(rows))


@pytest.mark.parametrize("spec", [TriggerSpec("patch", size=4, location="br"), TriggerSpec("blended", alpha=0.2),
                                  TriggerSpec("sig", delta=40.0)], ids=["patch", "blended", "sig"])
def test_a_pattern_shared_by_part_of_a_noisy_flag_set_finds_every_triggered_image(fashion, spec):
    images = fashion[0]
    images = images.copy()
    images[:POISONED] = apply_trigger(images[:POISONED], spec)
    grid = pixel_grid(images)
    flagged = list(range(0, 8)) + list(range(100, 108))           # 8 of the 30 triggered images, 8 clean ones
    pat = estimate_pattern(*_flag_set(grid, flagged), grid[::3], PropagateConfig())
    assert pat is not None
    hits = pattern_match(grid, pat) >= pat.match
    assert hits[:POISONED].all() and not hits[POISONED:].any()


def test_flags_without_a_shared_pattern_give_none(fashion):
    images, labels = fashion[0], fashion[3]
    grid = pixel_grid(images)
    cfg = PropagateConfig()
    one_class = np.flatnonzero(labels == labels[0])[:40].tolist()                   # one kind of image
    assert len(one_class) >= 20
    assert estimate_pattern(*_flag_set(grid, one_class), grid[::3], cfg) is None
    assert estimate_pattern(*_flag_set(grid, list(range(40))), grid[::3], cfg) is None   # a random flag set
    assert estimate_pattern(*_flag_set(grid, list(range(5))), grid[::3], cfg) is None    # too few flags
    moving = apply_trigger(images[:POISONED], TriggerSpec("patch", location="random"), rng_seed=0)
    grid_moving = pixel_grid(np.concatenate([moving, images[POISONED:]]))
    assert estimate_pattern(*_flag_set(grid_moving, list(range(16))), grid_moving[::3], cfg) is None


def test_a_blend_that_the_images_own_content_drowns_is_refused():
    """Shapes draws large coloured objects: a faint blend is no separate cluster there (clean images reach the
    triggered ones' cosines), so nothing is propagated rather than flagging clean images."""
    images = _chunk("shapes")[0].copy()
    images[:POISONED] = apply_trigger(images[:POISONED], TriggerSpec("blended", alpha=0.2))
    grid = pixel_grid(images)
    flagged = list(range(0, 8)) + list(range(100, 108))
    assert estimate_pattern(*_flag_set(grid, flagged), grid[::3], PropagateConfig()) is None


def test_a_benign_pattern_flagged_about_as_often_as_any_image_is_not_propagated_but_a_trigger_is(fashion):
    """A logo that 10% of the clean images carry, over-represented 3x among the gate's flags (a gate's bias), is a
    separate cluster but no trigger: its carriers' share of the flags is 3x their share of the data, under
    `min_enrichment`; the same logo on images the gate flags far above their share is found. Without the
    enrichment test the logo would be propagated to every clean carrier."""
    images = fashion[0].copy()
    logo = TriggerSpec("patch", size=4, location="tl", seed=7)
    carriers = np.arange(N) % 10 == 0                                                  # 60 of 600
    images[carriers] = apply_trigger(images[carriers], logo)
    grid = pixel_grid(images)
    flagged = np.flatnonzero(carriers)[:12].tolist() + np.flatnonzero(~carriers)[:28].tolist()   # 30% carriers
    assert estimate_pattern(*_flag_set(grid, flagged), grid[::3], PropagateConfig()) is None
    unguarded = estimate_pattern(*_flag_set(grid, flagged), grid[::3], PropagateConfig(min_enrichment=0.0))
    assert unguarded is not None and 2.0 < unguarded.enrichment < 4.0                   # 3x, estimated
    assert bool((pattern_match(grid, unguarded) >= unguarded.match)[carriers].all())
    mostly_carriers = np.flatnonzero(carriers)[:16].tolist() + np.flatnonzero(~carriers)[:4].tolist()   # 80%
    pat = estimate_pattern(*_flag_set(grid, mostly_carriers), grid[::3], PropagateConfig())
    assert pat is not None and pat.enrichment >= PropagateConfig().min_enrichment


def test_a_mask_of_a_pixel_or_two_is_refused(fashion):
    """A one-pixel 'pattern' (3 values: one pixel in 3 channels) is below `min_mask`: refused, though it would
    make a cluster without the guard."""
    images = fashion[0].copy()
    images[:POISONED, 0, 0] = 255                                                    # a corner: background elsewhere
    grid = pixel_grid(images)
    flagged = list(range(0, 12)) + list(range(100, 104))
    assert estimate_pattern(*_flag_set(grid, flagged), grid[::3], PropagateConfig()) is None
    loose = estimate_pattern(*_flag_set(grid, flagged), grid[::3], PropagateConfig(min_mask=0))
    assert loose is not None and int((loose.pattern != 0).sum()) < PropagateConfig().min_mask


def test_a_cluster_needs_a_gap_a_few_members_and_to_be_a_minority():
    cfg = PropagateConfig(floor=0.5, min_gap=0.15, max_share=0.1)
    rest = torch.linspace(-0.5, 0.7, 95)
    k, match, gap = separate_cluster(torch.cat([torch.full((5,), 0.95), rest]), cfg)
    assert k == 5 and abs(gap - 0.25) < 1e-5 and abs(match - 0.825) < 1e-5
    assert separate_cluster(torch.cat([torch.full((5,), 0.8), rest]), cfg) is None           # gap 0.1
    assert separate_cluster(torch.cat([torch.full((2,), 0.95), rest]), cfg) is None          # two are the tail
    assert separate_cluster(torch.cat([torch.full((20,), 0.95), rest]), cfg) is None         # 20 of 115: no minority
    assert separate_cluster(torch.linspace(-1, 1, 100), cfg) is None                        # a continuum


def test_pixel_grid_keeps_small_images_and_area_averages_large_ones():
    small = np.zeros((2, 32, 32, 3), np.uint8)
    small[0, -4:, -4:] = 255
    assert pixel_grid(small).shape == (2, 3 * 32 * 32) and float(pixel_grid(small)[0].max()) == 255.0
    large = np.zeros((1, 256, 256, 3), np.uint8)
    large[0, :128] = 200
    g = pixel_grid(large).view(1, 3, PATTERN_SIDE, PATTERN_SIDE)
    assert g.shape[-1] == PATTERN_SIDE and float(g[0, :, :32].mean()) == 200.0 and float(g[0, :, 32:].max()) == 0.0


def test_propagate_needs_sticky_flags():
    with pytest.raises(ConfigError, match="sticky"):
        validate(RematchConfig(propagate=True, sticky=False))
    validate(RematchConfig(propagate=True))


@pytest.mark.ray
def test_the_stage_flags_an_image_that_carries_the_stores_pattern(ray_local, fashion):
    """Blocks through the real actor: the store learns the pattern from the first block's gate flags (patched
    images given as flagged before would not count: only the gate's own flags feed it) and a later block's
    triggered images are flagged (and re-captioned) although the gate passes them."""
    from otc_ray.rematch import stage
    from otc_ray.rematch.flags import flag_store

    images, keys, captions, _ = fashion
    images = images.copy()
    images[:POISONED] = apply_trigger(images[:POISONED], TriggerSpec("patch", size=4, location="br"))
    cfg = RematchConfig(gate_threshold=-100.0, block_size=64, k=4, neighbours=8, propagate=True)   # flags nothing
    store = flag_store(propagate=PropagateConfig(min_weight=8.0))
    grid = pixel_grid(images)
    reference = [i for i in range(N) if i % 2]
    ray_local.get(store.add_reference.remote([keys[i] for i in reference], grid[reference].round().byte().numpy()))
    assert ray_local.get(store.pattern.remote()) is None                              # no flags yet
    gate_flags = list(range(0, 10)) + list(range(200, 204))     # what a gate found earlier: 10 triggered, 4 clean
    ray_local.get(store.add.remote([keys[i] for i in gate_flags], grid[gate_flags].sum(0).numpy(),
                                   float(len(gate_flags))))
    assert ray_local.get(store.pattern.remote()) is not None
    actor = stage.RematchActor(cfg, ModelConfig(arch="otc-tiny-vit-32"), OTConfig(iters=20), flags=store)
    rows = list(range(10, 40)) + list(range(300, 334))                 # 20 unflagged triggered images, 34 clean
    batch = {schema.KEY: np.asarray([keys[i] for i in rows], dtype=object), schema.IMAGE: images[rows],
             schema.CAPTION: np.asarray([captions[i] for i in rows], dtype=object),
             schema.ERROR: np.asarray([""] * len(rows), dtype=object)}
    out = actor(batch)
    triggered = np.arange(len(rows)) < 20
    assert out[schema.FLAGGED][triggered].all() and not out[schema.FLAGGED][~triggered].any()
    assert not out[schema.GATE_FLAGGED].any()
    unflagged_store = flag_store()                                    # propagation off: the same block passes
    plain = stage.RematchActor(dataclasses.replace(cfg, propagate=False), ModelConfig(arch="otc-tiny-vit-32"),
                               OTConfig(iters=20), flags=unflagged_store)
    assert not plain(batch)[schema.FLAGGED].any()
