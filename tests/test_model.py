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
    assert f.patches.shape == (3, 64, 128) and f.words.shape == (3, 32, 128)
    for t in (f.image, f.text, f.patches, f.words):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))
    assert torch.equal(f.word_mask, ids != 0)
    assert f.word_mask.sum(1).tolist() == [(row != 0).sum().item() for row in ids]
    assert f.word_mask[0].tolist()[:8] == [True] * 7 + [False]          # SOT, 5 words, EOT, then padding
    torch.testing.assert_close(f.logit_scale, tiny.model.logit_scale.exp())


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
    torch.testing.assert_close(words, torch.nn.functional.normalize(tok_t @ m.text.text_projection, dim=-1))
    torch.testing.assert_close(g, torch.nn.functional.normalize(pooled_i, dim=-1))
    torch.testing.assert_close(t, torch.nn.functional.normalize(pooled_t, dim=-1))
    torch.testing.assert_close(encode_image(m, pixels), m.encode_image(pixels, normalize=True))
    torch.testing.assert_close(encode_text(m, ids), m.encode_text(ids, normalize=True))
    assert torch.equal(mask, ids != 0)


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
