"""Metrics on hand-made embeddings with known answers, plus a tiny random open_clip model end to end."""
from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from otc_ray.evaluate import (
    Encoder,
    backdoor_asr,
    backdoor_asr_from_predictions,
    build_zeroshot_classifier,
    class_index,
    classifier_from_text_embeddings,
    damage_metrics,
    detection_auroc,
    detection_metrics,
    encode_images,
    evaluate_backdoor,
    evaluate_linear_probe,
    evaluate_retrieval,
    evaluate_targeted,
    evaluate_zeroshot,
    expand_templates,
    fit_linear_probe,
    linear_probe_metrics,
    poison_mask,
    retrieval_metrics,
    targeted_asr,
    targeted_asr_from_predictions,
    topk_accuracy,
    zeroshot_metrics,
    zeroshot_predict,
)
from otc_ray.poison.triggers import TriggerSpec


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _separable(num_classes: int = 8, per_class: int = 10, dim: int = 16, noise: float = 0.1, seed: int = 0):
    """Class c's images and prompts sit near the basis vector e_c: (N, d) images, (N,) labels, (C, T, d) prompts."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(dim)[:num_classes]
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = _unit(eye[labels] + noise * torch.randn(len(labels), dim, generator=g))
    prompts = _unit(eye[:, None, :] + noise * torch.randn(num_classes, 3, dim, generator=g))
    return images, labels, prompts


# ----------------------------------------------------------------------------------------- zero-shot
def test_expand_templates_is_class_major_and_needs_the_placeholder() -> None:
    assert expand_templates(["cat", "dog"], ["a {c}.", "{c}!"]) == ["a cat.", "cat!", "a dog.", "dog!"]
    assert expand_templates(["{x}"], ["a {c}"]) == ["a {x}"]        # no str.format surprises
    with pytest.raises(ValueError, match="placeholder"):
        expand_templates(["cat"], ["a photo"])


def test_classifier_averages_normalized_templates_per_class() -> None:
    text = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, -3.0], [0.0, -1.0]]])   # (C=2, T=2, d=2)
    w = classifier_from_text_embeddings(text)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(w, torch.tensor([[s, 0.0], [s, -1.0]]))           # (d, C), unit columns


def test_zeroshot_is_perfect_on_separable_embeddings() -> None:
    images, labels, prompts = _separable()
    weights = classifier_from_text_embeddings(prompts)
    m = zeroshot_metrics(images, labels, weights)
    assert m == {"zeroshot_top1": 1.0, "zeroshot_top5": 1.0}
    assert torch.equal(zeroshot_predict(images, weights), labels)
    wrong = zeroshot_metrics(images, (labels + 1) % 8, weights)
    assert wrong["zeroshot_top1"] == 0.0


def test_topk_accuracy_known_answers_and_ties() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.0],      # label 0: rank 0
                           [0.5, 0.4, 0.3, 0.0],      # label 2: rank 2
                           [0.1, 0.2, 0.3, 0.4],      # label 0: rank 3
                           [0.5, 0.5, 0.0, 0.0],      # label 1: ties with class 0, which wins -> rank 1
                           [0.5, 0.5, 0.0, 0.0]])     # label 0: wins its tie -> rank 0
    acc = topk_accuracy(logits, [0, 2, 0, 1, 0], ks=(1, 2, 3, 5))
    assert acc == {1: 2 / 5, 2: 3 / 5, 3: 4 / 5, 5: 1.0}
    assert logits.argmax(1).tolist() == [0, 0, 3, 0, 0]   # top-1 agrees with argmax predictions
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        topk_accuracy(logits, [0, 1, 2, 3, 4])


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30), c=st.integers(2, 12))
def test_topk_is_monotone_in_k(seed: int, n: int, c: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (n, c), generator=g).float()    # many ties
    labels = torch.randint(0, c, (n,), generator=g)
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5, 20))
    assert 0.0 <= acc[1] <= acc[2] <= acc[5] <= acc[20] == 1.0
    assert acc[1] == int((logits.argmax(1) == labels).sum()) / n


def test_class_index_names_the_classes() -> None:
    assert class_index(["bag", "sneaker"], "sneaker") == 1
    with pytest.raises(ValueError, match="'boot' is not one of the 2 classes"):
        class_index(["bag", "sneaker"], "boot")


# ----------------------------------------------------------------------------------------- linear probe
def _blobs(n_per_class: int, seed: int, num_classes: int = 4, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return means[y] + torch.randn(len(y), dim, generator=g), y


def test_linear_probe_separates_gaussian_blobs_deterministically() -> None:
    train_x, train_y = _blobs(100, seed=1)
    test_x, test_y = _blobs(100, seed=2)
    m1 = linear_probe_metrics(train_x, train_y, test_x, test_y)
    m2 = linear_probe_metrics(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy())
    assert m1["linear_probe_acc"] >= 0.95 and m1["linear_probe_train_acc"] >= 0.95
    assert m1 == m2
    p1, p2 = fit_linear_probe(train_x, train_y), fit_linear_probe(train_x, train_y)
    assert torch.equal(p1.weight, p2.weight) and torch.equal(p1.bias, p2.bias)


def test_linear_probe_beats_chance_only_with_signal() -> None:
    """Shuffled labels carry no signal: test accuracy must fall to about chance (1/4)."""
    train_x, train_y = _blobs(100, seed=1)
    test_x, test_y = _blobs(100, seed=2)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    assert linear_probe_metrics(train_x, shuffled, test_x, test_y)["linear_probe_acc"] < 0.45


def test_linear_probe_on_a_known_threshold() -> None:
    x = torch.tensor([[-3.0], [-2.0], [-1.0], [1.0], [2.0], [3.0]])
    probe = fit_linear_probe(x, [0, 0, 0, 1, 1, 1])
    assert probe.predict(torch.tensor([[-0.5], [0.5], [-10.0], [10.0]])).tolist() == [0, 1, 0, 1]
    assert probe.weight.shape == (1, 2) and probe.bias.shape == (2,)


def test_linear_probe_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3,\)"):
        fit_linear_probe(torch.zeros(3, 2), [0, 1])
    probe = fit_linear_probe(torch.randn(4, 2), [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        probe.predict(torch.zeros(1, 3))


# ----------------------------------------------------------------------------------------- ASR
def test_backdoor_asr_excludes_images_of_the_target_class() -> None:
    labels = [0, 1, 2, 2, 3, 4]
    preds = [2, 2, 2, 0, 1, 2]        # non-target images: 0, 1, 4, 5 -> predicted 2, 2, 1, 2
    assert backdoor_asr_from_predictions(preds, labels, target=2) == {"backdoor_asr": 0.75, "backdoor_asr_count": 4.0}
    nan = backdoor_asr_from_predictions([2, 2], [2, 2], target=2)
    assert math.isnan(nan["backdoor_asr"]) and nan["backdoor_asr_count"] == 0.0


def test_backdoor_asr_from_embeddings_uses_the_zeroshot_classifier() -> None:
    weights = torch.eye(4)                                                   # (d=4, C=4)
    emb = torch.eye(4)[[3, 3, 1, 3, 0]] + 0.01                               # predicted 3, 3, 1, 3, 0
    m = backdoor_asr(emb, [0, 3, 2, 1, 2], weights, target=3)                # image 1 is a true target
    assert m == {"backdoor_asr": 0.5, "backdoor_asr_count": 4.0}
    with pytest.raises(ValueError, match="outside the classifier's 4 classes"):
        backdoor_asr(emb, [0, 3, 2, 1, 2], weights, target=4)


def test_targeted_asr_known_answers() -> None:
    assert targeted_asr_from_predictions([1, 1, 0, 3], 1) == {"targeted_asr": 0.5, "targeted_asr_count": 4.0}
    assert targeted_asr_from_predictions([1, 2, 0], [1, 2, 2])["targeted_asr"] == pytest.approx(2 / 3)
    emb = torch.eye(3)[[2, 0, 2]]
    assert targeted_asr(emb, torch.tensor([2, 2, 1]), torch.eye(3))["targeted_asr"] == pytest.approx(1 / 3)


class GrayLevelEncoder:
    """A fixed, hand-built encoder: class c = images of gray level 40 c; any yellow pixel -> the 'target' axis.

    Texts "class k" embed to e_k, so a model that has 'learned' the yellow-patch backdoor is simulated
    exactly, and the wrappers (triggering, filtering, batching, classifier) are checked end to end.
    """

    def __init__(self, num_classes: int, target: int) -> None:
        self.num_classes, self.target = num_classes, target

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        yellow = ((images[..., 0] == 255) & (images[..., 1] == 255) & (images[..., 2] == 0)).any(axis=(1, 2))
        level = np.round(images[..., 2].astype(np.float64).mean(axis=(1, 2)) / 40).astype(np.int64)
        cls = np.where(yellow, self.target, np.clip(level, 0, self.num_classes - 1))
        return torch.eye(self.num_classes)[torch.from_numpy(cls)]

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        return torch.eye(self.num_classes)[[int(c.split()[-1]) for c in captions]]


def _gray_images(labels: np.ndarray, size: int = 16) -> np.ndarray:
    return np.broadcast_to((40 * labels).astype(np.uint8)[:, None, None, None], (len(labels), size, size, 3)).copy()


def test_wrappers_on_a_hand_built_encoder() -> None:
    classes, target = [f"class {k}" for k in range(5)], 3
    labels = np.arange(5).repeat(4)
    images = _gray_images(labels)
    enc = GrayLevelEncoder(5, target)
    assert isinstance(enc, Encoder)
    weights = build_zeroshot_classifier(enc, [str(k) for k in range(5)], ["class {c}"], batch_size=3)
    torch.testing.assert_close(weights, torch.eye(5))
    assert evaluate_zeroshot(enc, images, labels, classes, ["{c}"], weights=weights)["zeroshot_top1"] == 1.0
    solid = TriggerSpec(kind="solid", size=2, location="random")
    assert evaluate_backdoor(enc, images, labels, weights, target, solid, batch_size=7) == {
        "backdoor_asr": 1.0, "backdoor_asr_count": 16.0}
    harmless = TriggerSpec(kind="blended", alpha=0.0)
    assert evaluate_backdoor(enc, images, labels, weights, target, harmless)["backdoor_asr"] == 0.0
    assert evaluate_targeted(enc, images[:4], 0, weights)["targeted_asr"] == 1.0   # class-0 images
    m = evaluate_retrieval(enc, images, [f"class {k}" for k in labels])
    assert m["retrieval_i2t_r1"] == 1.0 and m["retrieval_t2i_r1"] == 1.0


# ----------------------------------------------------------------------------------------- detection
def test_detection_precision_recall_on_a_known_confusion_matrix() -> None:
    flags = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)      # tp = 3, fp = 1
    truth = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=bool)      # fn = 2, tn = 4
    m = detection_metrics(flags, truth)
    assert m["detect_precision"] == 0.75 and m["detect_recall"] == 0.6
    assert m["detect_f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6)) and m["detect_flag_rate"] == 0.4
    assert (m["detect_tp"], m["detect_fp"], m["detect_fn"], m["detect_tn"]) == (3.0, 1.0, 2.0, 4.0)
    keys = [f"{i:05d}" for i in range(10)]
    assert detection_metrics(flags, {"00000", "00001", "00002", "00004", "00005", "zz"}, keys=keys) == m
    assert poison_mask(keys, ["00003"]).tolist() == [i == 3 for i in range(10)]
    none = detection_metrics(np.zeros(4, bool), np.zeros(4, bool))
    assert math.isnan(none["detect_precision"]) and math.isnan(none["detect_recall"])
    with pytest.raises(ValueError, match=r"\(10,\)"):
        detection_metrics(flags, truth[:9])


def test_detection_auroc_known_answers() -> None:
    truth = np.array([1, 1, 0, 0], dtype=bool)
    assert detection_auroc([0.9, 0.4, 0.5, 0.1], truth) == {"detect_auroc": 0.75}
    assert detection_auroc([1.0, 2.0, -1.0, 0.0], truth)["detect_auroc"] == 1.0
    assert detection_auroc([-1.0, 0.0, 1.0, 2.0], truth)["detect_auroc"] == 0.0
    assert detection_auroc([0.5, 0.5, 0.5, 0.1], truth)["detect_auroc"] == 0.75          # a tie counts 1/2
    assert detection_auroc(np.zeros(4), truth)["detect_auroc"] == 0.5
    assert math.isnan(detection_auroc([0.1, 0.2], [True, True])["detect_auroc"])


def test_damage_counts_only_clean_samples_given_another_class() -> None:
    clean = [True, True, True, False, True]
    m = damage_metrics(clean, [0, 1, 2, 3, 4], [0, 2, 2, 7, 1])   # clean samples 1 and 4 changed class
    assert m == {"damage": 0.5, "damage_count": 2.0}
    assert damage_metrics(clean, [0, 1, 2, 3, 4], [0, 1, 2, 0, 4])["damage"] == 0.0
    with pytest.raises(ValueError, match="must all be"):
        damage_metrics(clean, [0, 1], [0, 1])


# ----------------------------------------------------------------------------------------- retrieval
def test_retrieval_identity_pairs_are_perfect_and_collapse_scores_zero() -> None:
    emb = _unit(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)))
    assert set(retrieval_metrics(emb, emb).values()) == {1.0}
    collapsed = retrieval_metrics(torch.ones(20, 8), torch.ones(20, 8))
    assert set(collapsed.values()) == {0.0}


def test_retrieval_on_a_known_shift() -> None:
    """Images at angles 0, 10, .., 40 degrees, texts 6 degrees further: each query but one ranks its pair 2nd."""
    rad = np.deg2rad
    img = torch.tensor([[math.cos(rad(10 * i)), math.sin(rad(10 * i))] for i in range(5)])
    txt = torch.tensor([[math.cos(rad(10 * i + 6)), math.sin(rad(10 * i + 6))] for i in range(5)])
    m = retrieval_metrics(img, txt, ks=(1, 2, 5))
    assert m == {"retrieval_i2t_r1": 0.2, "retrieval_i2t_r2": 1.0, "retrieval_i2t_r5": 1.0,
                 "retrieval_t2i_r1": 0.2, "retrieval_t2i_r2": 1.0, "retrieval_t2i_r5": 1.0}


def test_retrieval_on_a_known_swap_and_with_duplicate_captions() -> None:
    img = torch.eye(8)
    swapped = img[[1, 0, 2, 3, 4, 5, 6, 7]]
    m = retrieval_metrics(img, swapped)
    assert m["retrieval_i2t_r1"] == 0.75 and m["retrieval_t2i_r1"] == 0.75
    dup = torch.stack([_unit(img[0] + img[1])] * 2)           # two images, one identical caption twice
    assert retrieval_metrics(img[:2], dup)["retrieval_i2t_r1"] == 0.0        # ties go against the query
    assert retrieval_metrics(img[:2], dup, groups=["a", "a"])["retrieval_i2t_r1"] == 1.0
    with pytest.raises(ValueError, match="2 and 3"):
        retrieval_metrics(img[:2], img[:3])


# ----------------------------------------------------------------------------------------- tiny open_clip
class OpenClipEncoder:
    """A tiny random open_clip model behind uint8 preprocessing (what the trainer's encoder will do)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = open_clip.model.CustomTextCLIP(
            embed_dim=64, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=4, layers=2)).eval()
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=32)
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return self.model.encode_image((x - self.mean) / self.std, normalize=True)

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(captions), normalize=True)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (240, 240, 240),
           "black": (10, 10, 10), "yellow": (230, 220, 20), "purple": (140, 30, 160), "orange": (240, 140, 20)}


def _colour_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(len(COLOURS)).repeat(per_class)
    base = np.array(list(COLOURS.values()), dtype=np.float64)[labels][:, None, None, :]
    images = np.clip(base + rng.normal(0, 25, size=(len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)
    return images, labels


def test_tiny_open_clip_end_to_end() -> None:
    enc = OpenClipEncoder()
    classes, templates = list(COLOURS), ["a photo of a {c} thing.", "something {c}."]
    train_x, train_y = _colour_images(12, seed=0)
    test_x, test_y = _colour_images(6, seed=1)
    weights = build_zeroshot_classifier(enc, classes, templates, batch_size=5)
    assert weights.shape == (64, 8)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(8))
    torch.testing.assert_close(encode_images(enc, test_x, batch_size=7), encode_images(enc, test_x, batch_size=64),
                               atol=1e-5, rtol=1e-5)   # batching keeps rows in order
    zs = evaluate_zeroshot(enc, test_x, test_y, classes, templates, batch_size=16)
    lp = evaluate_linear_probe(enc, train_x, train_y, test_x, test_y, batch_size=32)
    bd = evaluate_backdoor(enc, test_x, test_y, weights, class_index(classes, "yellow"), TriggerSpec(size=8))
    rt = evaluate_retrieval(enc, test_x, [templates[0].replace("{c}", classes[y]) for y in test_y])
    metrics = {**zs, **lp, **bd, **rt}
    rates = {k: v for k, v in metrics.items() if not k.endswith("_count")}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rates.values()), metrics
    assert zs["zeroshot_top5"] >= zs["zeroshot_top1"]
    assert bd["backdoor_asr_count"] == 42.0
    assert lp["linear_probe_acc"] >= 0.5      # colours are easy for even random features (chance 0.125)
