"""OTCCLIP's gate and caption choice on hand-built features (known answers): the evidence signals, their
calibration within a caption's cluster, duplicate groups judged as one, and OT choosing the new caption."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from otc_ray.config import OTConfig, RematchConfig
from otc_ray.rematch.matcher import CaptionFeatures, ImageFeatures, Pool, match_block
from otc_ray.rematch.signals import SIGNALS, caption_calibrated_z, mean_z, plan_concentration

OT = OTConfig(eps=0.05, iters=100)


def _cfg(**kw) -> RematchConfig:
    base = RematchConfig(k=4, candidate_neighbours=4, neighbours=8, gate_reference=16)
    return dataclasses.replace(base, **kw)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_plan_concentration_known_answers():
    M, L = 4, 3
    uniform = torch.full((1, M, L), 1.0 / (M * L))
    peaked = torch.zeros(1, M, L)
    peaked[0, 0, 0] = peaked[0, 1, 1] = peaked[0, 2, 2] = 1.0 / L                        # each word on one patch
    half = peaked.clone()
    half[0, :, 2] = 0
    half[0, 0, 2] = half[0, 3, 2] = 0.5 / L                                              # word 2 split over two
    conc = plan_concentration(torch.cat([uniform, peaked, half]))
    torch.testing.assert_close(conc, torch.tensor([1 / M, 1.0, (1 + 1 + 0.5) / 3]))
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(plan_concentration(half, mask), torch.tensor([1.0]))      # word 2 masked out
    assert torch.isnan(plan_concentration(uniform, torch.zeros(1, L, dtype=torch.bool))).all()


def test_calibration_within_the_caption_cluster_finds_an_outlier_a_block_z_misses():
    """Two caption clusters with different typical values (class A pairs score ~0.8, class B ~0.3). A class-A pair
    scoring 0.45 is normal for the block but far below its own cluster."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 40
    a_dir, b_dir = _unit(torch.randn(2, d, generator=g))
    text = _unit(torch.cat([a_dir.expand(n, d), b_dir.expand(n, d)]) + 0.05 * torch.randn(2 * n, d, generator=g))
    values = torch.cat([0.8 + 0.03 * torch.randn(n, generator=g), 0.3 + 0.03 * torch.randn(n, generator=g)])
    values[0] = 0.45
    self_mask = torch.eye(2 * n, dtype=torch.bool)
    z = caption_calibrated_z(values, values, text, text, reference=16, exclude=self_mask)
    assert float(z[0]) < -3 and float(z[1:].min()) > -3, z[:5]
    block = (values - values.median()) / (1.4826 * (values - values.median()).abs().median())
    assert float(block[0]) > -1, "a block-wide z sees nothing unusual"
    assert torch.equal(mean_z({"a": torch.tensor([-4.0, 0.0]), "b": torch.tensor([0.0, 0.0])}),
                       torch.tensor([-2.0, 0.0]))


def test_an_attack_that_fills_half_the_reference_calibrates_itself_away():
    """The failure a too narrow reference has (shapes: 100 pairs captioned "a circle", unlike every clean caption):
    30 poisoned pairs whose captions are alike and nearest to each other score far below the 200 clean pairs of
    their class. Against the 16 nearest captions (all poisoned) their median is their own and nothing stands out;
    against 128 (a clean majority) every one of them is a low outlier."""
    g = torch.Generator().manual_seed(0)
    d, clean, poisoned = 16, 200, 30
    cls = _unit(torch.randn(d, generator=g))
    text = torch.cat([_unit(cls + 0.30 * torch.randn(clean, d, generator=g)),
                      _unit(cls + 0.30 * torch.randn(d, generator=g) + 0.02 * torch.randn(poisoned, d, generator=g))])
    values = torch.cat([0.6 + 0.05 * torch.randn(clean, generator=g), 0.2 + 0.05 * torch.randn(poisoned, generator=g)])
    self_mask = torch.eye(clean + poisoned, dtype=torch.bool)
    narrow = caption_calibrated_z(values, values, text, text, reference=16, exclude=self_mask)
    wide = caption_calibrated_z(values, values, text, text, reference=128, exclude=self_mask)
    assert float((narrow[clean:] < -3).float().mean()) < 0.2, narrow[clean:]
    assert bool((wide[clean:] < -3).all()) and float((wide[:clean] < -3).float().mean()) < 0.05, wide


def _clusters(seed: int, classes: int = 4, per_class: int = 24, d: int = 32):
    """Aligned image and caption embeddings: class c's images and captions both lie near direction c."""
    g = torch.Generator().manual_seed(seed)
    dirs = _unit(torch.randn(classes, d, generator=g))
    label = torch.arange(classes).repeat_interleave(per_class)
    img = _unit(dirs[label] + 0.25 * torch.randn(len(label), d, generator=g) / d ** 0.5)
    txt = _unit(dirs[label] + 0.25 * torch.randn(len(label), d, generator=g) / d ** 0.5)
    return img, txt, label, dirs


def test_copies_of_a_target_are_one_group_flagged_together_and_weighted_one_over_k():
    """A targeted attack: K pixel-identical copies of a class-0 image, captioned with class 1. Their cosine is low
    for class-1 captions; the group is flagged as a whole and each copy weighs 1/K."""
    img, txt, label, dirs = _clusters(seed=1)
    B0, K = len(label), 6
    target = _unit(dirs[0] + 0.25 * torch.randn(dirs.shape[1]) / dirs.shape[1] ** 0.5)    # a new class-0 image
    img = torch.cat([img, target.expand(K, -1)])
    txt = torch.cat([txt, _unit(dirs[1] + 0.02 * torch.randn(K, dirs.shape[1]))])
    ids = torch.arange(B0 + K, dtype=torch.int64)
    ids[B0:] = 10_000                                                                  # identical pixels
    B = B0 + K
    keys = torch.arange(B, dtype=torch.int64)
    images = ImageFeatures(img, None, ids)
    pool = Pool(CaptionFeatures(txt), img, keys, torch.ones(B, dtype=torch.bool), image_ids=ids)
    res = match_block(images, pool, keys, _cfg(gate_signals=("cosine",), alpha=1.0, gate_threshold=-3.0), OT)
    copies = torch.arange(B0, B)
    assert res.group_size[copies].tolist() == [K] * K and bool((res.group_size[:B0] == 1).all())
    assert bool(res.flagged[copies].all()), res.gate_z[copies]
    assert not bool(res.flagged[:B0].any()), res.gate_z[:B0].min()
    torch.testing.assert_close(res.weight[copies], torch.full((K,), 1.0 / K))
    # re-captioned with a caption of the image's real class, never with another copy's false caption
    assert bool((label[res.source[copies]] == 0).all()) and bool((res.source[copies] < B0).all())


def test_pixel_neighbours_find_a_trigger_the_model_has_learnt():
    """A model that has learnt a trigger maps 6 triggered images (classes 0, 2, 3) beside the class-1 images and
    captions: in its embedding their neighbours' captions agree with their class-1 captions, so `agreement` passes
    them. Their pixel signatures still lie with their own classes, whose captions disagree: `pixel_agreement`
    flags them, and no clean pair; without signatures the signal is unknown (NaN) and flags nothing."""
    g = torch.Generator().manual_seed(5)
    img, txt, label, dirs = _clusters(seed=4, per_class=32)
    d, P = dirs.shape[1], 6
    pixel_dirs = _unit(torch.randn(len(dirs), d, generator=g))                         # a pixel space of its own
    sig = _unit(pixel_dirs[label] + 0.3 * torch.randn(len(label), d, generator=g) / d ** 0.5)
    txt = _unit(dirs[label] + 0.5 * torch.randn(len(label), d, generator=g) / d ** 0.5)     # loosely worded captions
    true = torch.tensor([0, 2, 3, 0, 2, 3])
    img = torch.cat([img, _unit(dirs[1] + 0.25 * torch.randn(P, d, generator=g) / d ** 0.5)])     # learnt: class 1
    txt = torch.cat([txt, _unit(dirs[1] + 0.5 * torch.randn(P, d, generator=g) / d ** 0.5)])
    sig = torch.cat([sig, _unit(pixel_dirs[true] + 0.3 * torch.randn(P, d, generator=g) / d ** 0.5)])
    B = len(label) + P
    keys = torch.arange(B, dtype=torch.int64)
    pool = Pool(CaptionFeatures(txt), img, keys, torch.ones(B, dtype=torch.bool), image_ids=keys, signatures=sig)
    # a poisoned image also lowers its clean pixel neighbours' agreement a little (z down to about -4 here)
    base = _cfg(alpha=1.0, neighbours=5, gate_reference=32, gate_threshold=-5.0)
    model = match_block(ImageFeatures(img, None, keys, sig), pool, keys, dataclasses.replace(
        base, gate_signals=("agreement",)), OT)
    assert not bool(model.flagged[-P:].any()), model.gate_z[-P:]
    pixel = match_block(ImageFeatures(img, None, keys, sig), pool, keys, dataclasses.replace(
        base, gate_signals=("pixel_agreement",)), OT)
    assert bool(pixel.flagged[-P:].all()) and not bool(pixel.flagged[:-P].any()), pixel.gate_z
    assert bool(torch.isnan(model.signals[:, SIGNALS.index("pixel_agreement")]).all()), "measured only when the gate asks for it"
    blind = match_block(ImageFeatures(img, None, keys), Pool(CaptionFeatures(txt), img, keys, torch.ones(
        B, dtype=torch.bool), image_ids=keys), keys, dataclasses.replace(base, gate_signals=("pixel_agreement",)), OT)
    assert bool(torch.isnan(blind.signals[:, SIGNALS.index("pixel_agreement")]).all()) and not bool(blind.flagged.any())


def test_ot_picks_the_caption_whose_words_match_the_patches():
    """A flagged image with two candidate captions: X's words are the image's patches but X's global embedding
    points away from the image; Y's global embedding is the image's but its words match nothing. The fused score
    with alpha = 1 (cosine only) takes Y, OT (alpha = 0, or 0.3) takes X."""
    g = torch.Generator().manual_seed(0)
    d, M, L = 32, 6, 4
    basis = _unit(torch.randn(24, d, generator=g))
    patches = basis[:M]                                                                 # image 0's patches
    img_g = _unit(patches.mean(0))
    rows_g = [img_g, _unit(img_g + 0.9 * basis[20]), _unit(img_g + 0.25 * basis[21]), _unit(img_g + 0.5 * basis[22])]
    image = torch.stack(rows_g)                                                         # 0 flagged, 1..3 others
    text = torch.stack([_unit(basis[23]),                                                # own (false) caption
                        _unit(img_g + 1.2 * basis[20]),                                  # X: far globally ...
                        _unit(img_g + 0.05 * basis[21]),                                 # Y: near globally ...
                        _unit(img_g + 0.5 * basis[22])])
    words = torch.stack([basis[12:16], patches[:L], basis[16:20], basis[8:12]])         # ... X's words = patches
    mask = torch.ones(4, L, dtype=torch.bool)
    pts = torch.stack([patches, _unit(torch.randn(M, d, generator=g)), _unit(torch.randn(M, d, generator=g)),
                       _unit(torch.randn(M, d, generator=g))])
    keys = torch.arange(4, dtype=torch.int64)
    pool = Pool(CaptionFeatures(text, words, mask), image, keys, torch.ones(4, dtype=torch.bool))
    images = ImageFeatures(image, pts)
    prior = torch.tensor([True, False, False, False])                                   # sample 0 is flagged
    cfg = _cfg(gate_signals=("cosine",), gate_threshold=-1e9, neighbours=3, candidate_neighbours=3, k=3)
    picks = {}
    for name, kw in {"cosine": dict(alpha=1.0), "ot": dict(alpha=0.0), "fused": dict(alpha=0.3)}.items():
        res = match_block(images, pool, keys, dataclasses.replace(cfg, **kw), OT, prior=prior)
        assert res.flagged.tolist() == [True, False, False, False]
        picks[name] = int(res.source[0])
    assert picks == {"cosine": 2, "ot": 1, "fused": 1}, picks


def test_the_cleaning_matcher_picks_by_fused_score_so_alpha_changes_the_captions():
    """`otc-ray clean` runs the same `Matcher` (through the same stage): with half the samples flagged (the other half
    are the trusted candidates), alpha = 1 (cosine only) and alpha = 0 (OT only) choose different new captions for
    some of them on a real tiny model."""
    import numpy as np

    from otc_ray.config import ModelConfig
    from otc_ray.model import build_model
    from otc_ray.rematch.matcher import Matcher

    torch.manual_seed(0)
    bundle = build_model(ModelConfig(arch="otc-tiny-vit-32"))
    rng = np.random.default_rng(0)
    B = 32
    images = rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8)
    words = ["red", "green", "blue", "small", "large", "square", "circle", "ring", "left", "right"]
    captions = [f"a {words[i % 10]} {words[(3 * i + 1) % 10]} {words[(7 * i + 2) % 10]}" for i in range(B)]
    keys = [f"k{i}" for i in range(B)]
    prior = [i % 2 == 0 for i in range(B)]
    picks = {}
    for alpha in (1.0, 0.0):
        cfg = _cfg(alpha=alpha, gate_threshold=-1e9, k=6, candidate_neighbours=4)
        out = Matcher(bundle, cfg, OT).match(images, captions, keys, prior=prior)
        assert out.result.flagged.tolist() == prior
        assert all(out.caption_used[i] != captions[i] for i in range(0, B, 2))        # flagged: a trusted caption
        picks[alpha] = out.caption_used
    changed = sum(a != b for a, b in zip(picks[1.0], picks[0.0]))
    assert changed > 0, "alpha must change which captions the cleaning job picks"


def test_a_group_the_model_has_learnt_is_judged_by_its_neighbourhood_alone():
    """K copies of a class-0 image whose false class-1 caption the model has already learnt (pair cosine as high as
    a clean class-1 pair's): cosine says nothing, but the copies' non-duplicate image neighbours are class 0 and
    disagree with the caption. The group is flagged by neighbour agreement alone, though the mean of the two z-scores
    would let it through."""
    img, txt, label, dirs = _clusters(seed=2)
    B0, K, d = len(label), 8, dirs.shape[1]
    target = _unit(dirs[0] + 0.45 * dirs[1])                                             # learnt towards class 1
    img = torch.cat([img, target.expand(K, -1)])
    txt = torch.cat([txt, _unit(target + 0.02 * torch.randn(K, d, generator=torch.Generator().manual_seed(3)))])
    ids = torch.arange(B0 + K, dtype=torch.int64)
    ids[B0:] = 10_000
    B = B0 + K
    keys = torch.arange(B, dtype=torch.int64)
    pool = Pool(CaptionFeatures(txt), img, keys, torch.ones(B, dtype=torch.bool), image_ids=ids)
    cfg = _cfg(gate_signals=("cosine", "agreement"), alpha=1.0, gate_threshold=-3.0)
    res = match_block(ImageFeatures(img, None, ids), pool, keys, cfg, OT)
    copies = torch.arange(B0, B)
    cosine_z, agreement_z = res.signal_z[copies, 0], res.signal_z[copies, 1]
    assert float(cosine_z.min()) > -1.5 and float(agreement_z.max()) < -3, (cosine_z, agreement_z)
    assert float(((cosine_z + agreement_z) / 2).max()) > -3, "the mean of the two would let the group through"
    assert bool(res.flagged[copies].all()) and not bool(res.flagged[:B0].any()), res.gate_z


def test_gmm_gate_splits_low_similarity_pairs_as_risky_and_caps_the_safe_share():
    """SafeCLIP's split (gate gmm): pairs whose image and caption disagree (low similarity) are risky, keep their
    caption and get weight 0 (action drop); even when every pair looks clean, at most 85% are safe."""
    from otc_ray.rematch.gates import gmm_clean_probability

    img, txt, label, dirs = _clusters(seed=4)
    B = len(label)
    bad = torch.arange(0, B, 12)                                                         # 8 mismatched pairs
    txt = txt.clone()
    txt[bad] = txt[(bad + 30) % B]
    keys = torch.arange(B, dtype=torch.int64)
    pool = Pool(CaptionFeatures(txt), img, keys, torch.ones(B, dtype=torch.bool))
    cfg = _cfg(alpha=1.0, gate="gmm", action="drop")
    res = match_block(ImageFeatures(img, None), pool, keys, cfg, OT)
    assert bool(res.flagged[bad].all()) and res.weight[bad].eq(0).all()
    assert not bool(res.recaptioned.any()) and 0.15 <= float(res.flagged.float().mean()) < 0.3
    clean = match_block(ImageFeatures(img, None), Pool(CaptionFeatures(_clusters(seed=4)[1]), img, keys,
                                                        torch.ones(B, dtype=torch.bool)), keys, cfg, OT)
    assert float(clean.flagged.float().mean()) >= 0.15 - 1 / B                   # the 85% cap
    torch.testing.assert_close(gmm_clean_probability(torch.full((5,), 0.3)), torch.ones(5))
