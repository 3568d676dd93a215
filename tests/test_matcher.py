"""The matcher's core on hand-built features (known answers), and its model-facing wrapper on the tiny model."""
from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from otc_ray.config import ModelConfig, OTConfig, RematchConfig
from otc_ray.rematch.matcher import (GATES, CaptionBank, CaptionFeatures, ImageFeatures, Matcher, Pool, build_pool,
                                     match_block, shortlist)

OT = OTConfig(eps=0.05, iters=50)


def _cfg(**kw) -> RematchConfig:
    """The default re-matching settings (gate evidence, action recaption), k = 8, changed by kw."""
    return dataclasses.replace(RematchConfig(k=8), **kw)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _permutation_block(seed: int = 0, groups: int = 8, per_group: int = 4, d: int = 32, M: int = 6, L: int = 8,
                       perm: torch.Tensor | None = None):
    """B = groups * per_group images. Global embeddings are ambiguous inside a group (one direction per group plus
    1% noise, for images and captions alike), token sets are not: image i's patches are M random unit vectors and
    its true caption's words are the same vectors shuffled (+ noise), padded to L. Sample j carries the true
    caption of image perm[j] (a random permutation unless given). Returns (images, pool, key_ids, perm)."""
    g = torch.Generator().manual_seed(seed)
    B = groups * per_group
    centre = _unit(torch.randn(groups, d, generator=g)).repeat_interleave(per_group, 0)          # (B, d)
    img_g = _unit(centre + 0.01 * torch.randn(B, d, generator=g))
    txt_g = _unit(centre + 0.01 * torch.randn(B, d, generator=g))
    patches = _unit(torch.randn(B, M, d, generator=g))
    order = torch.argsort(torch.rand(B, M, generator=g), dim=1)
    words = torch.zeros(B, L, d)
    words[:, :M] = _unit(patches.gather(1, order.unsqueeze(-1).expand(B, M, d)) + 0.05 * torch.randn(B, M, d, generator=g))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :M] = True
    perm = torch.randperm(B, generator=g) if perm is None else perm
    caps = CaptionFeatures(txt_g[perm], words[perm], mask[perm])
    images = ImageFeatures(img_g, patches)
    keys = torch.arange(B, dtype=torch.int64)
    pool = Pool(caps, img_g, keys, torch.ones(B, dtype=torch.bool))
    return images, pool, keys, perm


def test_otcclip_recovers_a_permutation_that_global_matching_cannot():
    """Every image re-matched (gate none): the fused score (alpha 0.5) finds every true caption, the global cosine
    alone (alpha 1, RoCLIP's) cannot."""
    images, pool, keys, perm = _permutation_block()
    B = len(perm)
    truth = torch.arange(B)
    ot_res = match_block(images, pool, keys, _cfg(gate="none", alpha=0.5), OT)
    ro_res = match_block(images, pool, keys, _cfg(gate="none", alpha=1.0), OT)
    # sample j's caption belongs to image perm[j]; the right pool row for image i is the j with perm[j] == i
    assert torch.equal(perm[ot_res.source], truth), "otcclip must recover every true caption"
    assert ot_res.recaptioned.sum() == (perm != truth).sum()
    ro_acc = (perm[ro_res.source] == truth).float().mean().item()
    assert ro_acc < 0.6, f"global matching should be ambiguous here, got accuracy {ro_acc}"
    # the true caption is in every shortlist (group captions are the nearest by cosine), with the best fused score
    assert bool((perm[ot_res.shortlist] == truth.unsqueeze(1)).any(1).all())
    assert bool((ot_res.suspicion >= 0).all())


def test_shortlist_forces_the_own_caption_in():
    cos = torch.tensor([[0.1, 0.9, 0.8, 0.7], [0.2, 0.95, 0.3, 0.1]])
    exclude = torch.zeros_like(cos, dtype=torch.bool)
    idx, valid, in_top = shortlist(cos, 2, exclude)
    assert idx[0].tolist() == [1, 0] and not in_top[0]          # own (0) replaced the runner-up
    assert idx[1].tolist() == [1, 2] and in_top[1]               # own (1) ranked first already
    assert bool(valid.all())


def _class_block(seed: int = 1, classes: int = 5, per_class: int = 48, poison: int = 4, d: int = 32):
    """Clean pairs: image near its class's image direction, caption near its class's text direction; captions are
    more or less specific (noise of norm 0.3-1.0), which spreads the agreement. Poisoned pairs (~2%): images of
    class 0 nudged by a trigger, captions of class 1. Returns (img (B, d), txt (B, d), label (B,), poisoned (B,))."""
    g = torch.Generator().manual_seed(seed)
    img_dir = _unit(torch.randn(classes, d, generator=g))
    txt_dir = _unit(torch.randn(classes, d, generator=g))
    label = torch.arange(classes).repeat_interleave(per_class)
    B = len(label)
    spread = (0.3 + 0.7 * torch.rand(B, 1, generator=g)) / d ** 0.5
    img = _unit(img_dir[label] + 0.3 / d ** 0.5 * torch.randn(B, d, generator=g))
    txt = _unit(txt_dir[label] + spread * torch.randn(B, d, generator=g))
    poisoned = torch.zeros(B, dtype=torch.bool)
    rows = torch.nonzero(label == 0).squeeze(1)[:poison]
    poisoned[rows] = True
    trigger = _unit(torch.randn(d, generator=g))
    img[rows] = _unit(img[rows] + 0.15 * trigger)
    txt[rows] = _unit(txt_dir[1] + spread[rows] * torch.randn(poison, d, generator=g))
    return img, txt, label, poisoned


def test_replacements_skip_untrusted_bank_entries_and_own_bank_copies():
    """Every block sample flagged (sticky prior): its new caption comes from a trusted bank entry, never from one
    flagged when it was matched, and never from a bank copy of its own key."""
    img, txt, label, poisoned = _class_block(seed=2)
    B = len(label)
    half = B // 2
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(0))
    first, second = perm[:half], perm[half:]
    bank = CaptionBank(size=1000)
    keys = torch.arange(B, dtype=torch.int64)
    # the bank holds the first half, with every entry marked untrusted except those of class 0
    bank.push(CaptionFeatures(txt[first]), img[first], keys[first], label[first] == 0,
              [f"c{i}" for i in first.tolist()], [f"k{i}" for i in first.tolist()], label[first].tolist())
    # ...and a copy of one second-half sample (same key): it must be neither a candidate nor a neighbour
    dup = second[:1]
    bank.push(CaptionFeatures(txt[dup]), img[dup], keys[dup], torch.ones(1, dtype=torch.bool), ["dup"], ["dup"], [0])
    own = CaptionFeatures(txt[second])
    pool = build_pool(own, ImageFeatures(img[second]), keys[second], bank)
    assert pool.captions.text.shape[0] == B - half + half + 1
    cfg = _cfg(gate_signals=("agreement",), neighbours=8, k=4, alpha=1.0)
    prior = torch.ones(len(second), dtype=torch.bool)
    res = match_block(ImageFeatures(img[second]), pool, keys[second], cfg, OT, prior=prior)
    dup_row = pool.captions.text.shape[0] - 1
    assert bool(res.flagged.all()) and not bool((res.shortlist[0] == dup_row).any())
    assert bool(res.recaptioned.all()), "class-0 bank entries are trusted candidates for every sample"
    assert bool((res.source >= len(second)).all()) and bool(pool.trusted[res.source].all())
    assert int(res.source[0]) != dup_row                     # its own bank copy: for the others, a trusted candidate


def test_actions_drop_and_downweight_keep_the_caption():
    images, pool, keys, perm = _permutation_block(seed=5)
    moved = perm != torch.arange(len(perm))
    drop = match_block(images, pool, keys, _cfg(gate="none", action="drop"), OT)
    assert torch.equal(drop.weight == 0, moved) and not bool(drop.recaptioned.any())
    down = match_block(images, pool, keys, _cfg(gate="none", action="downweight", flagged_weight=0.25), OT)
    assert torch.allclose(down.weight[moved], torch.tensor(0.25)) and bool((down.weight[~moved] == 1).all())


# ----------------------------------------------------------------------------------------- the wrapper
@pytest.fixture(scope="module")
def tiny_bundle():
    from otc_ray.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(arch="otc-tiny-vit-32"))


def test_matcher_on_the_tiny_model_fills_every_output_and_bounds_the_bank(tiny_bundle):
    rng = np.random.default_rng(0)
    B = 24
    images = rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8)
    words = ["red", "green", "blue", "small", "large", "square", "circle", "ring"]
    captions = [f"a {words[i % 8]} {words[(3 * i) % 8]} in the picture" for i in range(B)]
    keys = [f"{i:04d}" for i in range(B)]
    cfg = RematchConfig(neighbours=8, bank_size=40, k=4, candidate_neighbours=8)
    m = Matcher(tiny_bundle, cfg, OT)
    out = m.match(images, captions, keys)
    r = out.result
    assert r.shortlist.shape == (B, 4 + 8) and r.scores.shape == (B, 4 + 8)   # OT shortlist + image neighbours
    for t in (r.own_score, r.best_score, r.suspicion, r.gate_z, r.agreement):
        assert t.shape == (B,) and bool(torch.isfinite(t).all())
    assert bool((r.best_score >= r.own_score - 1e-6).all())
    changed = [i for i in range(B) if out.caption_used[i] != captions[i]]
    assert changed == torch.nonzero(r.recaptioned).squeeze(1).tolist()
    assert all(out.source_key[i] == keys[i] for i in range(B) if i not in changed)
    assert len(m.bank) == B
    m.match(images, captions, [f"b{k}" for k in keys])
    assert len(m.bank) == 40 and m.bank.keys[-1] == f"b{keys[-1]}" and m.bank.text.shape[0] == 40
    m.load_state_dict(tiny_bundle.model.state_dict())
    assert len(m.bank) == 0
    off = Matcher(tiny_bundle, dataclasses.replace(cfg, enabled=False), OT).match(images, captions, keys)
    assert off.caption_used == captions and not bool(off.result.flagged.any())
    with pytest.raises(ValueError, match="duplicate_similarity"):
        Matcher(tiny_bundle, dataclasses.replace(cfg, duplicate_similarity=0.0), OT)


def test_sticky_prior_flags_stay_flagged_unless_sticky_is_off():
    images, pool, keys, perm = _permutation_block(seed=6)
    moved = perm != torch.arange(len(perm))
    steady = int(torch.nonzero(~moved)[0])                     # a row with its own, correct caption
    prior = torch.zeros(len(perm), dtype=torch.bool)
    prior[steady] = True
    cfg = _cfg(gate="none", action="drop", sticky=True)
    res = match_block(images, pool, keys, cfg, OT, prior=prior)
    assert torch.equal(res.flagged, moved | prior) and res.weight[steady] == 0
    off = match_block(images, pool, keys, dataclasses.replace(cfg, sticky=False), OT, prior=prior)
    assert torch.equal(off.flagged, moved)


def test_an_unknown_gate_is_refused_and_the_known_ones_are_the_config_s():
    images, pool, keys, _ = _permutation_block()
    with pytest.raises(ValueError, match="rematch.gate must be one of evidence, gmm, none"):
        match_block(images, pool, keys, dataclasses.replace(_cfg(), gate="margin"), OT)
    assert set(GATES) == set(typing.get_args(typing.get_type_hints(RematchConfig)["gate"]))


def test_actors_encode_at_rematch_precision_with_features_close_to_fp32():
    """rematch.precision bf16: the actor's model autocasts to bfloat16 while training stays at model.precision, and
    its features are the fp32 ones to within bf16 rounding; "model" (the default) follows model.precision."""
    from otc_ray.rematch.stage import RematchActor

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    captions = [f"a photo of a {w}" for w in ["sneaker", "bag", "shirt", "coat"] * 4]
    model_cfg = ModelConfig(arch="otc-tiny-vit-32")
    actors = {p: RematchActor(RematchConfig(precision=p, sticky=False, propagate=False), model_cfg, OT) for p in ("model", "bf16")}
    assert actors["model"].matcher.bundle.autocast_dtype is None
    assert actors["bf16"].matcher.bundle.autocast_dtype is torch.bfloat16
    (img32, cap32), (img16, cap16) = (actors[p].matcher.encode(images, captions) for p in ("model", "bf16"))
    assert img16.image.dtype == torch.float32                      # features leave the encoder as float32
    cos_image = (img32.image * img16.image).sum(-1)
    cos_words = (cap32.words * cap16.words).sum(-1)[cap32.word_mask]
    assert float(cos_image.min()) > 0.99 and float(cos_words.min()) > 0.99
    assert not torch.equal(img32.image, img16.image)               # bf16 really ran
