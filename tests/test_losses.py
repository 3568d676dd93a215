"""otc_ray.losses on hand-made features, a tiny model, and a real 2-process gloo group."""
from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from otc_ray.config import ModelConfig, OTConfig
from otc_ray.losses import (
    augment_token_ids,
    clip_loss,
    combine_losses,
    ot_contrastive_loss,
    ot_inter_loss,
    ot_intra_loss,
    otcclip_terms,
    unimodal_contrastive_loss,
)
from otc_ray.ot import pairwise_ot_distance, pairwise_ot_distance_cfg

TAU = 0.1
FULL = OTConfig(train_negatives=0, train_iters=50)


def _concept_tokens(B=6, M=8, L=5, d=16, seed=0, noise=0.5):
    """Sample i's patch and word tokens scatter around its own concept direction; word sets have padding."""
    g = torch.Generator().manual_seed(seed)
    concept = F.normalize(torch.randn(B, 1, d, generator=g), dim=-1)
    patches = F.normalize(concept + noise * torch.randn(B, M, d, generator=g) / d ** 0.5, dim=-1)
    words = F.normalize(concept + noise * torch.randn(B, L, d, generator=g) / d ** 0.5, dim=-1)
    mask = torch.arange(L) < torch.randint(2, L + 1, (B, 1), generator=g)
    words = torch.where(mask.unsqueeze(-1), words, torch.randn(B, L, d, generator=g))   # junk in padding
    return patches, words, mask


DERANGE = torch.tensor([1, 2, 3, 4, 5, 0])


# ----------------------------------------------------------------------------------------- CLIP loss
def test_clip_loss_equals_open_clip_and_prefers_matched_pairs():
    import open_clip  # here, not at the top: the gloo test's worker processes import this module

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ours = clip_loss(img, txt, scale)
    torch.testing.assert_close(ours, open_clip.ClipLoss()(img, txt, scale))
    assert ours < clip_loss(img, txt[torch.roll(torch.arange(8), 1)], scale)
    with pytest.raises(ValueError, match=r"\(8, 16\) and \(7, 16\)"):
        clip_loss(img, txt[:7], scale)


WEIGHTS = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.1])       # 2 ranks x 4 pairs


def test_weighted_clip_loss_drops_and_downweights_pairs():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    torch.testing.assert_close(clip_loss(img, txt, scale, weights=torch.ones(6)), clip_loss(img, txt, scale))
    logits = scale * img @ txt.T
    labels = torch.arange(6)
    per_pair = (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2
    weights = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0])
    # a dropped pair (weight 0) loses its own terms but stays a negative of the others
    torch.testing.assert_close(clip_loss(img, txt, scale, weights=weights), (per_pair * weights).sum() / 3.5)
    # the dropped pair still acts as a negative: moving its caption onto image 0 raises the weighted loss
    confusing = txt.clone()
    confusing[1] = img[0]
    assert clip_loss(img, confusing, scale, weights=weights) > clip_loss(img, txt, scale, weights=weights) + 0.1
    zero = clip_loss(img.clone().requires_grad_(True), txt, scale, weights=torch.zeros(6))
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match=r"weights must be \(6,\)"):
        clip_loss(img, txt, scale, weights=torch.ones(5))


def test_weighted_ot_inter_loss_is_the_weighted_mean_of_per_anchor_terms():
    g = torch.Generator().manual_seed(2)
    a = F.normalize(torch.randn(5, 4, 8, generator=g), dim=-1)
    b = F.normalize(a[:, :3] + 0.2 * torch.randn(5, 3, 8, generator=g), dim=-1)
    cfg = OTConfig(train_negatives=0)
    one_hot = torch.zeros(5)
    one_hot[2] = 1.0
    single = ot_inter_loss(a, None, b, None, 0.1, cfg, weights=one_hot)
    logits = -pairwise_ot_distance_cfg(a, b, None, None, cfg, iters=cfg.train_iters) / 0.1
    expected = (F.cross_entropy(logits[2:3], torch.tensor([2])) + F.cross_entropy(logits.T[2:3], torch.tensor([2]))) / 2
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ot_inter_loss(a, None, b, None, 0.1, cfg, weights=torch.ones(5)),
                               ot_inter_loss(a, None, b, None, 0.1, cfg))


def _dist_worker(rank: int, world: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        img_all = F.normalize(torch.randn(world * 4, 8, generator=g), dim=-1)
        txt_all = F.normalize(img_all + 0.5 * torch.randn(world * 4, 8, generator=g), dim=-1)
        sl = slice(rank * 4, rank * 4 + 4)
        res = {}
        for local, with_grad in ((False, False), (True, True), (False, True)):
            img = img_all[sl].clone().requires_grad_(True)
            loss = clip_loss(img, txt_all[sl], 5.0, local_loss=local, gather_with_grad=with_grad)
            loss.backward()
            res[f"{local}-{with_grad}"] = (torch.tensor(loss.item()), img.grad.clone())
        weighted = clip_loss(img_all[sl], txt_all[sl], 5.0, weights=WEIGHTS[sl])
        res["weighted"] = (torch.tensor(weighted.item()), torch.zeros(1))
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_clip_loss_gathers_across_a_real_gloo_group(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    # fork: the workers inherit the imported modules (spawn would re-import torch twice); they use 1 thread
    mp.start_processes(_dist_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True, start_method="fork")
    out = [{k: (v[0].item(), v[1]) for k, v in torch.load(tmp_path / f"rank{r}.pt").items()} for r in range(world)]
    g = torch.Generator().manual_seed(0)
    img_all = F.normalize(torch.randn(world * 4, 8, generator=g), dim=-1).requires_grad_(True)
    txt_all = F.normalize(img_all.detach() + 0.5 * torch.randn(world * 4, 8, generator=g), dim=-1)
    ref = clip_loss(img_all, txt_all, 5.0)
    ref.backward()
    for rank in range(world):
        loss, _ = out[rank]["False-False"]
        assert abs(loss - ref.item()) < 1e-6                     # every rank scores the global batch
        # the weights are gathered with the features: every rank scores the global weighted batch
        assert abs(out[rank]["weighted"][0] - clip_loss(img_all.detach(), txt_all, 5.0, weights=WEIGHTS).item()) < 1e-6
    local = [out[r]["True-True"] for r in range(world)]
    assert abs(sum(l for l, _ in local) / world - ref.item()) < 1e-6    # local losses average to the global one
    for rank in range(world):
        sl = slice(rank * 4, rank * 4 + 4)
        # through the autograd gather each rank's slice receives the sum over ranks' losses: world x global grad
        torch.testing.assert_close(local[rank][1] / world, img_all.grad[sl], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[rank]["False-True"][1] / world, img_all.grad[sl], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- OT losses
@pytest.mark.parametrize("negatives", [0, 2])
def test_ot_inter_loss_matched_below_mismatched(negatives):
    patches, words, mask = _concept_tokens()
    cfg = dataclasses.replace(FULL, train_negatives=negatives)
    matched = ot_inter_loss(patches, None, words, mask, TAU, cfg)
    mismatched = ot_inter_loss(patches, None, words[DERANGE], mask[DERANGE], TAU, cfg)
    assert torch.isfinite(matched) and matched < mismatched - 0.5


def test_full_batch_inter_loss_is_symmetric_cross_entropy_over_ot_logits():
    patches, words, mask = _concept_tokens()
    logits = -pairwise_ot_distance(patches, words, None, mask, iters=FULL.train_iters) / TAU
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(ot_inter_loss(patches, None, words, mask, TAU, FULL), expected)


def test_hard_negative_losses_grow_with_k_and_stay_below_full_batch():
    patches, words, mask = _concept_tokens(B=8, noise=2.0, seed=3)
    losses = [ot_inter_loss(patches, None, words, mask, TAU, dataclasses.replace(FULL, train_negatives=k)).item()
              for k in (1, 3, 5)]
    full = ot_inter_loss(patches, None, words, mask, TAU, FULL).item()
    assert losses[0] < losses[1] < losses[2] < full


def test_ot_intra_loss_matched_views_below_mismatched():
    patches, words, mask = _concept_tokens()
    g = torch.Generator().manual_seed(5)
    view_p = F.normalize(patches + 0.3 * torch.randn(patches.shape, generator=g) / 4, dim=-1)
    for cfg in (FULL, dataclasses.replace(FULL, train_negatives=2)):
        matched = ot_intra_loss(patches, None, view_p, None, TAU, cfg)
        assert matched < ot_intra_loss(patches, None, view_p[DERANGE], None, TAU, cfg) - 0.5
        w_matched = ot_intra_loss(words, mask, words.flip(1), mask.flip(1), TAU, cfg)   # same set, reordered
        w_mismatched = ot_intra_loss(words, mask, words.flip(1)[DERANGE], mask.flip(1)[DERANGE], TAU, cfg)
        assert w_matched < w_mismatched - 0.5


def test_gradient_flows_through_the_ot_cost_and_skips_padding():
    patches, words, mask = _concept_tokens()
    patches.requires_grad_(True)
    words.requires_grad_(True)
    for cfg in (FULL, dataclasses.replace(FULL, train_negatives=2)):
        patches.grad = words.grad = None
        ot_inter_loss(patches, None, words, mask, TAU, cfg).backward()
        assert patches.grad.abs().sum() > 0 and torch.isfinite(patches.grad).all()
        assert words.grad[mask].abs().sum() > 0 and (words.grad[~mask] == 0).all()


def test_ot_losses_name_the_sizes_on_mismatch():
    patches, words, mask = _concept_tokens()
    with pytest.raises(ValueError, match="a=6, b=5"):
        ot_contrastive_loss(patches, None, words[:5], mask[:5], TAU, FULL)
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)"):
        ot_inter_loss(patches, None, words, mask[:, :4], TAU, FULL)
    with pytest.raises(ValueError, match="tau"):
        ot_inter_loss(patches, None, words, mask, 0.0, FULL)


# ----------------------------------------------------------------------------------------- text view, unimodal
def test_augment_token_ids_drops_words_only_and_keeps_order():
    ids = torch.tensor([[49406, 11, 12, 13, 14, 49407, 0, 0], [49406, 21, 49407, 0, 0, 0, 0, 0]])
    assert torch.equal(augment_token_ids(ids, 0.0), ids)
    only_special = augment_token_ids(ids, 1.0)
    assert only_special.tolist() == [[49406, 49407, 0, 0, 0, 0, 0, 0], [49406, 49407, 0, 0, 0, 0, 0, 0]]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = augment_token_ids(ids, 0.5, g1), augment_token_ids(ids, 0.5, g2)
    assert torch.equal(a, b)
    for row_in, row_out in zip(ids.tolist(), a.tolist()):
        kept = [t for t in row_out if t != 0]
        assert kept[0] == 49406 and kept[-1] == 49407
        words_in = [t for t in row_in if t not in (0, 49406, 49407)]
        words_out = kept[1:-1]
        assert all(w in words_in for w in words_out) and words_out == sorted(words_out, key=words_in.index)
        assert row_out[len(kept):] == [0] * (len(row_out) - len(kept))
    with pytest.raises(ValueError, match="drop_prob"):
        augment_token_ids(ids, 1.5)


def test_unimodal_contrastive_loss():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 8, generator=g)
    b = a + 0.2 * torch.randn(6, 8, generator=g)
    loss = unimodal_contrastive_loss(a, b, 0.1)
    torch.testing.assert_close(loss, clip_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), 10.0))
    assert loss < unimodal_contrastive_loss(a, b[DERANGE], 0.1)
    with pytest.raises(ValueError, match=r"\(6, 8\) and \(6, 7\)"):
        unimodal_contrastive_loss(a, b[:, :7], 0.1)


# ----------------------------------------------------------------------------------------- combining
def test_combine_losses_weights_names_and_logs():
    x = torch.tensor(2.0, requires_grad=True)
    terms = {"clip_loss": x * 1.5, "inter_loss": x * x, "intra_loss": torch.tensor(float("nan"))}
    total, logs = combine_losses(terms, {"inter_loss": 0.5, "intra_loss": 0.0, "absent_loss": 3.0})
    assert total.item() == pytest.approx(3.0 + 2.0)
    total.backward()
    assert x.grad.item() == pytest.approx(1.5 + 2.0)
    assert logs["clip_loss"] == pytest.approx(3.0) and logs["inter_loss"] == pytest.approx(4.0)
    assert logs["total_loss"] == pytest.approx(5.0) and set(logs) == {"clip_loss", "inter_loss", "intra_loss",
                                                                          "total_loss"}
    with pytest.raises(ValueError, match="'clip'"):
        combine_losses({"clip": x}, {})
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        combine_losses({"clip_loss": torch.ones(2)}, {})


def test_otcclip_terms_on_a_tiny_model_backpropagates():
    from otc_ray.model import build_model, features

    torch.manual_seed(0)
    bundle = build_model(ModelConfig())
    pixels = torch.randn(6, 3, 32, 32)
    ids = bundle.tokenizer([f"a photo of item {i}" for i in range(6)])
    f = features(bundle.model, pixels, ids)
    sub = torch.arange(3)
    with torch.no_grad():
        view = features(bundle.model, pixels[sub].flip(-1), augment_token_ids(ids[sub], 0.3))
    cfg = OTConfig(train_negatives=2, train_iters=10)
    terms = otcclip_terms(f, 0.05, cfg, 0.5, 0.5, view, sub)
    assert set(terms) == {"clip_loss", "inter_loss", "intra_loss"}
    total, logs = combine_losses(terms, {"inter_loss": 0.5, "intra_loss": 0.5})
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    total.backward()
    assert bundle.model.visual.proj.grad.abs().sum() > 0 and bundle.model.logit_scale.grad is not None
    assert set(otcclip_terms(f, 0.05, cfg, 0.0, 0.5)) == {"clip_loss"}      # no view, lambda_inter 0


# ----------------------------------------------------------------------------------------- false negatives
def test_identical_captions_or_images_are_not_negatives_in_the_clip_loss():
    """Rows 0 and 1 carry the byte-identical caption (same text id), rows 2 and 3 the same image (same pixel id):
    with content ids the loss equals plain cross-entropy with those off-diagonal logits removed."""
    from otc_ray.losses import clip_loss, duplicate_pairs

    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt[1] = txt[0]
    ids = torch.tensor([[7, 100], [7, 101], [8, 102], [9, 102], [10, 103], [11, 104]])
    same = duplicate_pairs(ids)
    assert same.nonzero().tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]
    logits = 10.0 * img @ txt.T
    masked = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(6)
    expected = (F.cross_entropy(masked, labels) + F.cross_entropy(masked.T, labels)) / 2
    got = clip_loss(img, txt, 10.0, content_ids=ids)
    torch.testing.assert_close(got, expected)
    assert float(got) < float(clip_loss(img, txt, 10.0)), "the positive's own text no longer counts against it"


def test_the_hardest_ot_negative_is_never_a_duplicate():
    """In L_inter a batch-mate with the identical caption is the hardest 'negative' by construction; masked, the
    loss no longer pushes the anchor away from its own text, and matches the all-pairs form with the mask."""
    from otc_ray.losses import duplicate_pairs, ot_contrastive_loss

    patches, words, wmask = _concept_tokens(B=8, seed=3)[:3]
    words = words.clone()
    words[1], wmask[1] = words[0], wmask[0]                          # row 1 carries row 0's caption
    ids = torch.stack([torch.tensor([0, 0, 2, 3, 4, 5, 6, 7]), torch.arange(100, 108)], dim=1)
    same = duplicate_pairs(ids)
    cfg = OTConfig(eps=0.05, train_iters=50, train_negatives=3)
    hard = ot_contrastive_loss(patches, None, words, wmask, 0.1, cfg, not_negative=same)
    full = ot_contrastive_loss(patches, None, words, wmask, 0.1, dataclasses.replace(cfg, train_negatives=0),
                               not_negative=same)
    unmasked = ot_contrastive_loss(patches, None, words, wmask, 0.1, cfg)
    assert torch.isfinite(hard) and torch.isfinite(full)
    assert float(hard) < float(unmasked)
    assert float(hard) <= float(full) + 1e-5                         # k hardest negatives are a subset of all
