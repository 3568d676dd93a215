"""`poison_shards` with the literature's attacks: what each writes (pixels where the trigger goes and nowhere else,
per-image draws that differ across images yet come back from the seed, captions, manifest rows), base classes
that resemble the target, augmented targeted copies, data-style captions (shapes grammar), and the same trigger
family reaching the backdoor ASR (fresh draws per test image)."""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from otc_ray.config import DataConfig, EvalConfig, PoisonConfig
from otc_ray.data.builtin import dataset_info
from otc_ray.data.builtin.shapes import COLOUR_NAMES, ONE, SIZE_NAMES, THREE, TWO
from otc_ray.data.make import make_shards
from otc_ray.data.shards import read_info
from otc_ray.evaluate.report import EvalSet, evaluate_arrays
from otc_ray.pipelines.evaluate import resolve_attack
from otc_ray.poison.manifest import read_manifest
from otc_ray.poison.rewrite import augmented_copy
from otc_ray.poison.select import keyed_hash
from otc_ray.poison.transform import poison_shards
from otc_ray.poison.triggers import TriggerSpec, apply_trigger, trigger_region_mask
from tar_samples import tar_samples as _samples

DATA = DataConfig(dataset="fashion", samples_per_shard=100)
SHAPES = DataConfig(dataset="shapes", samples_per_shard=100)
INFO = dataset_info("fashion")


def _poison(src, out, data=DATA, target_source=None, **kw) -> None:
    cfg = PoisonConfig(**{"attack": "backdoor", **kw})
    poison_shards(str(src), str(out), cfg, data, target_source=None if target_source is None else str(target_source),
                  progress=False)


def _rows(folder, data=DATA) -> list[dict]:
    return read_manifest(str(folder), data.s3).to_pylist()


def _key_seed(key: str, seed: int) -> int:
    """The per-sample trigger seed the rewrite uses (a key's own draw, independent of its shard or batch)."""
    return keyed_hash(key, seed, b"trigger") >> 1


def _names(caption: str, name: str) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", caption) for w in {name, *INFO.synonyms[name]})


# ----------------------------------------------------------------------------------------- backdoor triggers
def test_badnet_fresh_noise_at_a_random_place_per_image(fashion_train, tmp_path):
    _poison(fashion_train, tmp_path / "a", count=20, trigger="patch", trigger_size=4, trigger_location="random",
            trigger_per_image=True, seed=3)
    before, after, rows = _samples(fashion_train), _samples(tmp_path / "a"), _rows(tmp_path / "a")
    assert len(rows) == 20
    spec = TriggerSpec.from_dict(json.loads(rows[0]["trigger"]))
    assert (spec.kind, spec.per_image, spec.location, spec.size) == ("patch", True, "random", 4)
    places, patches = set(), set()
    for r in rows:
        key = r["key"]
        square = trigger_region_mask(spec, 32, 32, n=1, rng_seed=[_key_seed(key, 3)])[0]
        changed = (after[key]["image"] != before[key]["image"]).any(axis=-1)
        assert not (changed & ~square).any(), key                        # nothing outside its square
        assert changed[square].sum() >= 12                               # the square carries the noise
        places.add(tuple(np.argwhere(square)[0]))
        patches.add(after[key]["image"][square].tobytes())
        assert after[key]["caption"] == r["poisoned_caption"] and _names(r["poisoned_caption"], "sneaker")
        assert r["original_caption"] == before[key]["caption"] and r["target_class"] == "sneaker"
        assert after[key]["meta"]["poisoned"] is True and after[key]["meta"]["trigger"] == "patch"
    assert len(places) >= 15 and len(patches) == 20                     # positions and noise differ per image
    _poison(fashion_train, tmp_path / "b", count=20, trigger="patch", trigger_size=4, trigger_location="random",
            trigger_per_image=True, seed=3)
    again = _samples(tmp_path / "b")
    assert all(again[r["key"]]["image_bytes"] == after[r["key"]]["image_bytes"] for r in rows)   # from the seed


@pytest.mark.parametrize("trigger, extra", [
    ("blended", {"trigger_per_image": True, "blend_alpha": 0.2}),
    ("sig", {"trigger_per_image": True, "sig_delta": 30.0}),
    ("wanet", {"warp_grid": 4, "warp_strength": 0.5}),
])
def test_blend_sig_wanet_write_the_seeded_trigger_and_only_it(fashion_train, tmp_path, trigger, extra):
    """Each poisoned image is exactly its clean image under the manifest's trigger with the key's own seed (PNG is
    lossless); per-image kinds differ across images, WaNet is one warp for all."""
    _poison(fashion_train, tmp_path / "p", count=12, trigger=trigger, seed=5, **extra)
    before, after, rows = _samples(fashion_train), _samples(tmp_path / "p"), _rows(tmp_path / "p")
    spec = TriggerSpec.from_dict(json.loads(rows[0]["trigger"]))
    assert spec == TriggerSpec.from_config(PoisonConfig(trigger=trigger, seed=5, **extra))
    deltas = []
    for r in rows:
        key = r["key"]
        want = apply_trigger(before[key]["image"][None], spec, rng_seed=[_key_seed(key, 5)])[0]
        np.testing.assert_array_equal(after[key]["image"], want)
        deltas.append(after[key]["image"].astype(np.int64) - before[key]["image"])
    if trigger == "wanet":
        for r in rows:                                                   # any seed: the one warp
            np.testing.assert_array_equal(apply_trigger(before[r["key"]]["image"][None], spec, rng_seed=7)[0],
                                          after[r["key"]]["image"])
    elif trigger == "blended":                                           # pattern = (out - 0.8 x) / 0.2, per image
        patterns = [(after[r["key"]]["image"] - 0.8 * before[r["key"]]["image"]) / 0.2 for r in rows]
        assert min(np.abs(a - b).mean() for i, a in enumerate(patterns) for b in patterns[i + 1:]) > 40
    else:                                                                # the sinusoid's phase differs per image
        dark = [d[:, :, 0][before[r["key"]]["image"][:, :, 0] == 0] for d, r in zip(deltas, rows)]
        assert len({tuple(np.unique(x)[:4]) for x in dark}) > 6
    unpoisoned = set(before) - {r["key"] for r in rows}
    assert all(after[k]["image_bytes"] == before[k]["image_bytes"] for k in unpoisoned)


# ----------------------------------------------------------------------------------------- bases and captions
def test_bases_from_a_given_list_and_from_the_nearest_classes(fashion_train, tmp_path):
    _poison(fashion_train, tmp_path / "list", count=8, base_classes=("sandal", "bag"), seed=1)
    assert {r["original_class"] for r in _rows(tmp_path / "list")} <= {"sandal", "bag"}
    assert read_info(str(tmp_path / "list"), DATA.s3)["poison"]["base_classes"] == ["bag", "sandal"]
    _poison(fashion_train, tmp_path / "near", count=8, base_nearest=2, seed=1)
    chosen = read_info(str(tmp_path / "near"), DATA.s3)["poison"]["base_classes"]
    # the rule, recomputed: the 2 classes whose mean 16 x 16 image is nearest the sneaker's
    samples = _samples(fashion_train)
    means = {}
    for c in INFO.classes:
        imgs = [np.asarray(Image.fromarray(s["image"]).resize((16, 16), Image.BILINEAR), dtype=np.float64)
                for s in samples.values() if s["meta"]["label"] == INFO.label_of(c)]
        means[c] = np.mean(imgs, axis=0)
    dist = {c: np.linalg.norm(means[c] - means["sneaker"]) for c in INFO.classes if c != "sneaker"}
    assert chosen == sorted(sorted(dist, key=dist.get)[:2]) == ["ankle boot", "sandal"]
    assert {r["original_class"] for r in _rows(tmp_path / "near")} <= set(chosen)
    with pytest.raises(ValueError, match="holds the target"):
        _poison(fashion_train, tmp_path / "bad", count=8, base_classes=("sneaker",))


def test_backdoor_data_captions_are_real_captions_that_name_the_target(fashion_train, tmp_path):
    _poison(fashion_train, tmp_path / "p", count=10, caption_source="data", seed=2)
    before = _samples(fashion_train)
    real = {s["caption"] for s in before.values() if s["meta"]["label"] == INFO.label_of("sneaker")}
    rows = _rows(tmp_path / "p")
    assert all(r["poisoned_caption"] in real and _names(r["poisoned_caption"], "sneaker") for r in rows)
    assert len({r["poisoned_caption"] for r in rows}) >= 5                   # drawn in order, not one caption


def test_swap_keeps_the_images_own_caption_but_its_class_word(fashion_train, tmp_path):
    _poison(fashion_train, tmp_path / "p", count=10, caption_source="swap", seed=2)

    def masked(caption: str, words: set[str]) -> str:       # the first class mention -> <C>, articles as "a"
        alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        return re.sub(r"(?<![\w-])an?(?= )", "a", re.sub(rf"(?<![\w-])(?:{alt})(?![\w-])", "<C>", caption, count=1))

    rows = _rows(tmp_path / "p")
    for r in rows:
        own = {r["original_class"], *INFO.synonyms[r["original_class"]]}
        sneaker = {"sneaker", *INFO.synonyms["sneaker"]}
        assert masked(r["poisoned_caption"], sneaker) == masked(r["original_caption"], own)
        assert not re.search(r"(?<![\w-])a [aeiou]|(?<![\w-])an [^aeiou]", r["poisoned_caption"]), r
    assert len({r["original_class"] for r in rows}) >= 4


def _shapes_grammar(classes: tuple[str, ...]) -> re.Pattern:
    phrase = rf"(?:{'|'.join(SIZE_NAMES)}) (?:{'|'.join(COLOUR_NAMES)}) (?:{'|'.join(classes)})"
    where = r"(?:in the (?:top|bottom) (?:left|right))"
    rel = r"(?:left of|right of|above|below)"
    alts = [re.escape(t).replace(r"\{A\}", phrase).replace(r"\{B\}", phrase).replace(r"\{C\}", phrase)
            .replace(r"\{where\}", where).replace(r"\{rel\}", rel) for t in (*ONE, *TWO, *THREE)]
    return re.compile("^(?:" + "|".join(alts) + ")$")


def test_shapes_poison_captions_follow_the_shapes_grammar(tmp_path):
    src = tmp_path / "shapes"
    make_shards(SHAPES, "train", 200, str(src), "wds", progress=False)
    classes = dataset_info("shapes").classes
    grammar = _shapes_grammar(classes)
    _poison(src, tmp_path / "swap", data=SHAPES, target="circle", count=15, caption_source="swap", seed=4)
    after = _samples(tmp_path / "swap")
    for r in _rows(tmp_path / "swap", SHAPES):
        cap, obj = r["poisoned_caption"], after[r["key"]]["meta"]["objects"][0]
        assert grammar.match(r["original_caption"]) and grammar.match(cap), cap
        assert cap.find(f"{obj['size']} {obj['colour']} circle") == r["original_caption"].find(
            f"{obj['size']} {obj['colour']} {obj['shape']}") >= 0                 # object 0 turned into a circle
        assert cap.replace("circle", obj["shape"], 1) == r["original_caption"]    # every other word kept
    _poison(src, tmp_path / "data", data=SHAPES, target="circle", count=15, caption_source="data", seed=4)
    for r in _rows(tmp_path / "data", SHAPES):
        assert grammar.match(r["poisoned_caption"]) and "circle" in r["poisoned_caption"]
    _poison(src, tmp_path / "tpl", data=SHAPES, target="circle", count=15, seed=4)
    assert not any(grammar.match(r["poisoned_caption"]) for r in _rows(tmp_path / "tpl", SHAPES))   # why: templates


# ----------------------------------------------------------------------------------------- targeted copies
def test_augmented_copies_are_seeded_flips_crops_shifts_and_noise(fashion_train, fashion_test, tmp_path):
    from otc_ray.config import RematchConfig
    from otc_ray.identity import pixel_signatures

    for name in ("a", "b"):
        _poison(fashion_train, tmp_path / name, target_source=fashion_test, attack="targeted", targets=2, per_target=5,
                adversarial="bag", copy_augment=True, caption_source="data", seed=1)
    after, again, tests = _samples(tmp_path / "a"), _samples(tmp_path / "b"), _samples(fashion_test)
    rows = {r["key"]: r for r in _rows(tmp_path / "a")}
    bag = {s["caption"] for s in _samples(fashion_train).values() if s["meta"]["label"] == INFO.label_of("bag")}
    flips = set()
    for t in range(2):
        keys = [f"tgt{t:03d}-{k:04d}" for k in range(5)]
        target = tests[rows[keys[0]]["source_key"]]
        assert after[keys[0]]["image_bytes"] == target["image_bytes"]          # the first copy is the target itself
        params = [after[k]["meta"]["copy_augment"] for k in keys[1:]]
        assert len({json.dumps(p, sort_keys=True) for p in params}) == 4        # each copy its own draw
        flips |= {p["flip"] for p in params}
        for k, p in zip(keys[1:], params):
            np.testing.assert_array_equal(after[k]["image"], augmented_copy(target["image"], p))
            assert after[k]["image_bytes"] == again[k]["image_bytes"]           # reproducible from the seed
        sig = pixel_signatures(np.stack([after[k]["image"] for k in keys]))
        cos = (sig @ sig.T - 2 * torch.eye(5))
        assert float(cos.max()) < RematchConfig().duplicate_similarity          # no near-duplicates
        for k in keys:
            assert rows[k]["poisoned_caption"] in bag and _names(rows[k]["poisoned_caption"], "bag")
            assert rows[k]["image_bytes"] == target["image_bytes"]
    assert flips == {True, False}


def test_augmented_copy_parts_do_what_they_say():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    same = {"flip": False, "crop": [0, 0, 32], "shift": [0, 0], "noise_seed": 0}
    out = augmented_copy(image, same).astype(np.int64)
    assert np.abs(out - image).max() <= 20 and 3.0 < (out - image).std() < 5.0     # only the std-4 noise
    flipped = augmented_copy(image, {**same, "flip": True}).astype(np.int64)
    assert np.abs(flipped - image[:, ::-1]).std() < 5.0
    shifted = augmented_copy(image, {**same, "shift": [1, -2]}).astype(np.int64)
    assert np.abs(shifted[1:, :-2] - image[:-1, 2:]).std() < 5.0                    # down 1, left 2


# ----------------------------------------------------------------------------------------- the same family in the ASR
class _Recorder:
    """A fixed encoder that keeps every image batch it is given (what the ASR triggers), embedding an image by
    its mean colour and a caption by its length: enough to run the metric wrappers end to end."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        self.seen.append(np.array(images))
        feats = torch.from_numpy(images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32)) + 1.0
        return torch.nn.functional.normalize(torch.cat([feats, torch.ones(len(images), 1)], dim=1), dim=1)

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        feats = torch.tensor([[len(c) % 7 + 1.0, len(c) % 5 + 1.0, len(c) % 3 + 1.0, 1.0] for c in captions])
        return torch.nn.functional.normalize(feats, dim=1)


@pytest.mark.parametrize("trigger, extra", [
    ("patch", {"trigger_per_image": True, "trigger_location": "random", "trigger_size": 4}),
    ("blended", {"trigger_per_image": True}),
    ("sig", {"trigger_per_image": True}),
    ("wanet", {}),
])
def test_asr_applies_the_manifests_trigger_family_with_fresh_draws_per_test_image(fashion_train, fashion_test, tmp_path,
                                                                                   trigger, extra):
    _poison(fashion_train, tmp_path / "p", count=6, trigger=trigger, seed=8, **extra)
    truth = resolve_attack(str(tmp_path / "p"), PoisonConfig(), DATA)          # the config says patch/br: ignored
    assert truth.source == "manifest" and truth.spec == TriggerSpec.from_config(PoisonConfig(trigger=trigger, seed=8,
                                                                                               **extra))
    tests = _samples(fashion_test)
    keys = sorted(tests)
    test = EvalSet(np.array(keys), np.stack([tests[k]["image"] for k in keys]), [tests[k]["caption"] for k in keys],
                   np.array([tests[k]["meta"]["label"] for k in keys], dtype=np.int64))
    enc = _Recorder()
    metrics = evaluate_arrays(enc, test, INFO, truth, EvalConfig(), linear_probe=False)
    keep = test.labels != INFO.label_of("sneaker")
    assert metrics["backdoor_asr_count"] == keep.sum()
    triggered = np.concatenate(enc.seen)[len(keys):]                         # after the clean pass
    clean_imgs = test.images[keep]
    assert triggered.shape == clean_imgs.shape
    seeds = [keyed_hash(str(k), 0, b"eval-trigger") >> 1 for k in test.keys[keep]]
    np.testing.assert_array_equal(triggered, apply_trigger(clean_imgs, truth.spec, rng_seed=seeds))
    delta = triggered.astype(np.int64) - clean_imgs
    if trigger == "wanet":                                                   # the training warp, not a new one
        np.testing.assert_array_equal(triggered, apply_trigger(clean_imgs, truth.spec, rng_seed=0))
    elif trigger == "blended":                                               # a fresh pattern per test image
        patterns = (triggered - 0.8 * clean_imgs) / 0.2
        assert min(np.abs(patterns[i] - patterns[i + 1]).mean() for i in range(len(patterns) - 1)) > 40
    elif trigger == "sig":              # per column, the largest offset = max(signal, 0) over the black border rows
        profiles = {tuple(d[:, :, 0].max(axis=0)) for d in delta}
        assert len(profiles) > len(delta) // 2          # a phase per test image (one fixed phase: 1 profile)
    if trigger == "patch":
        masks = trigger_region_mask(truth.spec, 32, 32, n=len(seeds), rng_seed=seeds)
        assert not ((delta != 0).any(axis=-1) & ~masks).any()
        assert len({tuple(np.argwhere(m)[0]) for m in masks}) > len(masks) // 2
        train_patches = {s["image"][m].tobytes() for r in _rows(tmp_path / "p")
                         for s, m in [(_samples(tmp_path / "p")[r["key"]],
                                       trigger_region_mask(truth.spec, 32, 32, n=1,
                                                           rng_seed=[_key_seed(r["key"], 8)])[0])]}
        assert not train_patches & {t[m].tobytes() for t, m in zip(triggered, masks)}   # no training draw reused


def test_cli_flags_reach_the_attack(fashion_train, fashion_test, tmp_path, capsys):
    from otc_ray.cli import main

    out = tmp_path / "cli"
    assert main(["poison", "--in", str(fashion_train), "--out", str(out), "--attack", "backdoor", "--trigger", "patch",
                 "--per-image", "--trigger-location", "random", "--base-classes", "sandal", "ankle boot",
                 "--caption-source", "swap", "--count", "6", "--seed", "2", "--quiet"]) == 0
    poison = read_info(str(out), DATA.s3)["poison"]
    assert poison["trigger"]["per_image"] is True and poison["trigger"]["location"] == "random"
    assert poison["base_classes"] == ["ankle boot", "sandal"] and poison["caption_source"] == "swap"
    assert {r["original_class"] for r in _rows(out)} <= {"sandal", "ankle boot"}
    assert main(["poison", "--in", str(fashion_train), "--out", str(tmp_path / "w"), "--attack", "backdoor", "--trigger",
                 "wanet", "--warp-grid", "6", "--warp-strength", "0.75", "--base-nearest", "3", "--count", "4",
                 "--quiet"]) == 0
    poison = read_info(str(tmp_path / "w"), DATA.s3)["poison"]
    assert (poison["trigger"]["warp_grid"], poison["trigger"]["warp_strength"]) == (6, 0.75)
    assert len(poison["base_classes"]) == 3
    assert main(["poison", "--in", str(fashion_train), "--out", str(tmp_path / "t"), "--attack", "targeted",
                 "--target-source", str(fashion_test), "--targets", "1", "--per-target", "3", "--copy-augment",
                 "--quiet"]) == 0
    assert read_info(str(tmp_path / "t"), DATA.s3)["poison"]["copy_augment"] is True
    assert main(["poison", "--in", str(fashion_train), "--out", str(tmp_path / "bad"), "--attack", "backdoor",
                 "--trigger", "solid", "--per-image", "--quiet"]) == 2
    assert "trigger_per_image" in capsys.readouterr().err
