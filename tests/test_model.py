"""otc_ray.model: builder, registry, tokenizer, image conversion, global and token features."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP

from otc_ray.config import ModelConfig
from otc_ray.model import (
    FeatureModel,
    word_token_mask,
    build_model,
    encode_image,
    encode_image_tokens,
    encode_text,
    encode_text_tokens,
    features,
    images_to_tensor,
    register_model_configs,
)

CAPTIONS = ["a photo of a sneaker", "a red bag", "a long white summer dress with a belt"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(arch="otc-tiny-vit-32"))
    bundle.model.eval()
    return bundle


@pytest.fixture(scope="module")
def batch(tiny):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    return images_to_tensor(images, tiny.image_size, "cpu"), tiny.tokenizer(CAPTIONS)


def test_registration_is_idempotent_and_ships_the_tiny_archs():
    names = register_model_configs()
    before = open_clip.list_models()
    assert register_model_configs() == names
    assert open_clip.list_models() == before
    assert {"otc-tiny-vit-32", "otc-tiny-vit-64"} <= set(before)


def test_bundle_fields(tiny):
    assert (tiny.image_size, tiny.context_length, tiny.embed_dim) == (32, 32, 128)
    assert tiny.autocast_dtype is None
    assert build_model(ModelConfig(precision="bf16")).autocast_dtype == torch.bfloat16
    ids = tiny.tokenizer(CAPTIONS)
    assert ids.shape == (3, 32) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and (ids[0] == 49407).sum() == 1 and ids[0, -1] == 0


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model arch 'no-such-net'.*otc-tiny-vit-32"):
        build_model(ModelConfig(arch="no-such-net"))


def test_images_to_tensor_normalizes_and_resizes():
    white = np.full((2, 32, 32, 3), 255, dtype=np.uint8)
    x = images_to_tensor(white, 32, "cpu")
    expected = (1.0 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, :, 5, 7], expected.expand(2, 3))
    grey = np.random.default_rng(1).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    y = images_to_tensor(torch.from_numpy(grey), 64, "cpu")
    assert y.shape == (4, 3, 64, 64)
    torch.testing.assert_close(y[:, 0] * OPENAI_DATASET_STD[0] + OPENAI_DATASET_MEAN[0],
                               y[:, 2] * OPENAI_DATASET_STD[2] + OPENAI_DATASET_MEAN[2])
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(white.astype(np.float32), 32, "cpu")
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        images_to_tensor(np.zeros((2, 32, 32, 4), dtype=np.uint8), 32, "cpu")


def test_features_shapes_norms_and_mask(tiny, batch):
    pixels, ids = batch
    f = features(tiny.model, pixels, ids)
    assert f.image.shape == (3, 128) and f.text.shape == (3, 128)
    L = int((ids != 0).sum(1).max())                      # trailing all-padding columns are left out
    assert f.patches.shape == (3, 64, 128) and f.words.shape == (3, L, 128) and L < ids.shape[1]
    for t in (f.image, f.text, f.patches, f.words):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))
    # the OT word set: the words only (SOT, EOT and padding out), unless special tokens are asked for
    assert f.word_mask.sum(1).tolist() == [(row != 0).sum().item() - 2 for row in ids]
    assert f.word_mask[0].tolist()[:8] == [False] + [True] * 5 + [False, False]     # SOT, 5 words, EOT, padding
    assert torch.equal(features(tiny.model, pixels, ids, special_tokens=True).word_mask, ids[:, :L] != 0)
    torch.testing.assert_close(f.logit_scale, tiny.model.logit_scale.exp())


def test_trimmed_text_forward_equals_open_clips_full_forward(tiny, batch):
    """The causal text tower runs on the captions' real length only; every output it keeps is the full forward's."""
    pixels, ids = batch
    f = features(tiny.model, pixels, ids)
    out = tiny.model.forward_intermediates(text=ids, text_indices=1, normalize=True, normalize_intermediates=True)
    words = torch.nn.functional.normalize(out["text_intermediates"][-1] @ tiny.model.text.text_projection, dim=-1)
    torch.testing.assert_close(f.text, out["text_features"])
    torch.testing.assert_close(f.words, words[:, :f.words.shape[1]])
    torch.testing.assert_close(encode_text(tiny.model, ids), out["text_features"])


def test_shared_template_prefix_does_not_hide_the_class_word(tiny):
    """Two captions that share a long template and differ only in the class word, against an image of that class.
    SOT is the same vector for every caption (causal tower) and EOT, the pooled summary, is dominated by the shared
    template: with them in the word set the class word holds 1/13 of the mass, without them 1/11, and the padding
    never holds any. Token features are hand-built; the mask comes from the real tokenizer."""
    from otc_ray.model import word_token_mask
    from otc_ray.ot import ot_distance

    prefix = "a low resolution black and white product photo of a"
    ids = tiny.tokenizer([f"{prefix} sneaker", f"{prefix} pullover"])
    g = torch.Generator().manual_seed(0)
    d = 64
    basis = torch.nn.functional.normalize(torch.randn(16, d, generator=g), dim=-1)
    sot, eot, sneaker, pullover, template = basis[0], basis[1], basis[2], basis[3], basis[4:14]
    words = torch.zeros(2, ids.shape[1], d)
    for row, cls in ((0, sneaker), (1, pullover)):
        n = int((ids[row] != 0).sum())                       # SOT, 10 template words, the class word, EOT
        words[row, :n] = torch.cat([sot[None], template, cls[None], eot[None]])
    patches = torch.cat([sneaker[None].expand(4, -1), template[:4]])[None].expand(2, -1, -1)
    gaps = {}
    for special in (True, False):
        mask = word_token_mask(ids, special_tokens=special)
        dist, _ = ot_distance(patches, words, None, mask)
        gaps[special] = float(dist[1] - dist[0])            # wrong class minus right class
    assert word_token_mask(ids).sum(1).tolist() == [11, 11]
    assert word_token_mask(ids, special_tokens=True).sum(1).tolist() == [13, 13]
    assert gaps[False] > gaps[True] > 0, gaps
    assert gaps[False] > 1.15 * gaps[True], gaps


def test_tokens_equal_open_clip_token_outputs_with_projection(tiny, batch):
    """Our tokens are open_clip's own `output_tokens` tokens passed through the towers' projections."""
    pixels, ids = batch
    m = tiny.model
    g, patches = encode_image_tokens(m, pixels)
    t, words, mask = encode_text_tokens(m, ids)
    m.visual.output_tokens = m.text.output_tokens = True
    try:
        pooled_i, tok_i = m.visual(pixels)
        pooled_t, tok_t = m.text(ids)
    finally:
        m.visual.output_tokens = m.text.output_tokens = False
    torch.testing.assert_close(patches, torch.nn.functional.normalize(tok_i @ m.visual.proj, dim=-1))
    L = words.shape[1]                    # trailing all-padding columns left out (causal tower: same outputs)
    torch.testing.assert_close(words, torch.nn.functional.normalize(tok_t @ m.text.text_projection, dim=-1)[:, :L])
    torch.testing.assert_close(mask, mask_of := word_token_mask(ids)[:, :L])
    assert not word_token_mask(ids)[:, L:].any() and mask_of.any()
    torch.testing.assert_close(g, torch.nn.functional.normalize(pooled_i, dim=-1))
    torch.testing.assert_close(t, torch.nn.functional.normalize(pooled_t, dim=-1))
    torch.testing.assert_close(encode_image(m, pixels), m.encode_image(pixels, normalize=True))
    torch.testing.assert_close(encode_text(m, ids), m.encode_text(ids, normalize=True))
    assert torch.equal(mask, word_token_mask(ids)[:, :L]) and torch.equal(encode_text_tokens(m, ids, True)[2],
                                                                          ids[:, :L] != 0)


def test_the_64px_arch_has_64_patches():
    bundle = build_model(ModelConfig(arch="otc-tiny-vit-64"))
    pixels = images_to_tensor(np.zeros((1, 64, 64, 3), dtype=np.uint8), bundle.image_size, "cpu")
    _, patches = encode_image_tokens(bundle.model, pixels)
    assert bundle.image_size == 64 and patches.shape == (1, 64, 128)


def test_plain_clip_without_custom_text_gives_tokens():
    vision = dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16)
    text = dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1)
    m = CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()
    ids = open_clip.get_tokenizer("ViT-B-32", context_length=12)(CAPTIONS[:2])
    f = features(m, torch.randn(2, 3, 16, 16), ids)
    assert f.patches.shape == (2, 4, 24) and f.words.shape == (2, 12, 24)
    torch.testing.assert_close(f.text, m.encode_text(ids, normalize=True))
    torch.testing.assert_close(encode_text(m, ids), f.text)


def test_gradient_reaches_both_towers_through_tokens(batch):
    bundle = build_model(ModelConfig())
    pixels, ids = batch
    f = FeatureModel(bundle.model)(pixels, ids)
    (f.patches[:, :, 0].sum() + (f.words[:, :, 0] * f.word_mask).sum()).backward()
    assert bundle.model.visual.proj.grad.abs().sum() > 0
    assert bundle.model.text.text_projection.grad.abs().sum() > 0
    assert bundle.model.visual.conv1.weight.grad.abs().sum() > 0


def test_the_fast_experiment_model_takes_the_tiny_ones_inputs_at_a_third_of_its_flops():
    """otc-fast-vit-32 (benchmarks/results/fast_model.md): the same 32 px images, and captions of the built-in sets
    fit its 16 tokens; one training step (forward + backward) costs at most a third of otc-tiny-vit-32's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from otc_ray.losses import clip_loss
    from otc_ray.model import model_input_size

    def step_flops(arch: str) -> int:
        bundle = build_model(ModelConfig(arch=arch))
        images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
        ids = bundle.tokenizer(["a photo of a large red circle in the top left"] * 4)
        counter = FlopCounterMode(display=False)
        with counter:
            f = features(bundle.model, images_to_tensor(images, bundle.image_size), ids)
            clip_loss(f.image, f.text, f.logit_scale).backward()
        assert f.patches.shape[1] > 1 and int(f.word_mask.sum(1).min()) > 1
        return counter.get_total_flops()

    assert model_input_size("otc-fast-vit-32") == model_input_size("otc-tiny-vit-32") == 32
    assert step_flops("otc-fast-vit-32") * 3 <= step_flops("otc-tiny-vit-32")
