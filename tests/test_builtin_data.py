"""Built-in data sets: deterministic bytes, labels that agree with captions, the split rules."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from otc_ray.config import DataConfig
from otc_ray.data.builtin import dataset_info, generate
from otc_ray.data.builtin.shapes import COLOUR_NAMES
from otc_ray.data.make import make_shards

CASES = [("shapes", 32), ("shapes", 64), ("fashion", 32), ("fashion", 64), ("fashion-scenes", 64)]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name, size", CASES)
def test_same_seed_same_bytes(tmp_path, name, size):
    cfg = DataConfig(dataset=name, image_size=size, seed=3, samples_per_shard=40, tint=0.5)
    for run in ("a", "b"):
        make_shards(cfg, "train", 100, str(tmp_path / run), "wds", progress=False)
    make_shards(DataConfig(dataset=name, image_size=size, seed=4, samples_per_shard=40, tint=0.5),
                "train", 100, str(tmp_path / "c"), "wds", progress=False)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert len(a) == 4 and a == b                       # 3 shards + _info.json, byte-identical
    assert a["00000.tar"] != c["00000.tar"]


@pytest.mark.parametrize("name, size", CASES)
def test_prefix_stable_and_splits_differ(name, size):
    small = next(generate(name, "train", 50, seed=1, image_size=size))
    large = next(generate(name, "train", 120, seed=1, image_size=size))
    test = next(generate(name, "test", 50, seed=1, image_size=size))
    assert np.array_equal(small["images"], large["images"][:50]) and small["captions"] == large["captions"][:50]
    assert not np.array_equal(small["images"], test["images"])
    assert small["images"].dtype == np.uint8 and small["images"].shape == (50, size, size, 3)


def _synonym_at_start(info, label, phrase):
    return any(phrase.startswith(s) for s in info.synonyms[info.classes[label]])


@pytest.mark.parametrize("size", [32, 64])
def test_fashion_captions_name_their_class(size):
    info = dataset_info("fashion")
    chunk = next(generate("fashion", "train", 400, seed=0, image_size=size, tint=0.5))
    tinted = 0
    for caption, label, meta in zip(chunk["captions"], chunk["labels"], chunk["metas"]):
        assert meta["label"] == label and meta["class"] == info.classes[label]
        names = info.synonyms[info.classes[label]]
        assert any(n in caption for n in names), caption
        others = [s for c in info.classes if c != info.classes[label] for s in info.synonyms[c]
                  if not any(s in n for n in names)]
        assert not any(f" {o}" in caption and not any(o in n for n in names) for o in others if len(o) > 4), caption
        if meta["colour"] != "grey":
            tinted += 1
            assert meta["colour"] in caption
    assert 120 < tinted < 280                          # tint=0.5


def test_shapes_captions_name_object_zero_and_test_has_one_object():
    info = dataset_info("shapes", 32)
    chunk = next(generate("shapes", "train", 300, seed=0, image_size=32))
    for caption, label, meta in zip(chunk["captions"], chunk["labels"], chunk["metas"]):
        first = meta["objects"][0]
        assert first["shape"] == info.classes[label]
        assert f"{first['size']} {first['colour']} {first['shape']}" in caption
        mentioned = [s for s in info.classes if s in caption.split()]
        assert len(mentioned) >= 1 and caption.index(first["shape"]) == min(caption.index(s) for s in mentioned)
        if meta["negative"]:                    # objects 0 and 1 with their colours swapped (a binding negative)
            a, b = meta["objects"][0], meta["objects"][1]
            assert a["colour"] != b["colour"] and meta["negative"] != caption
            assert meta["negative"].startswith(f"a {a['size']} {b['colour']} {a['shape']} ")
            assert meta["negative"].endswith(f" a {b['size']} {a['colour']} {b['shape']}")
            assert set(meta["negative"].split()) <= set(caption.split()) | set(COLOUR_NAMES) | {"a"}
    test = next(generate("shapes", "test", 100, seed=0, image_size=32))
    assert all(len(m["objects"]) == 1 for m in test["metas"])


def test_shapes_colours_match_pixels():
    """The caption's colour is the colour of the pixels inside object 0's cell."""
    chunk = next(generate("shapes", "train", 200, seed=5, image_size=64))
    from otc_ray.data.builtin.shapes import COLOURS
    hits = 0
    for img, meta in zip(chunk["images"], chunk["metas"]):
        obj = meta["objects"][0]
        cell = img[obj["row"] * 21:(obj["row"] + 1) * 21, obj["col"] * 21:(obj["col"] + 1) * 21].reshape(-1, 3)
        bright = cell[cell.astype(int).sum(1) > 200]
        if len(bright) < 5:
            continue
        mean = bright.mean(0)
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
        hits += nearest == obj["colour"]
    assert hits >= 150


def test_fashion_scenes_label_is_first_item():
    info = dataset_info("fashion-scenes")
    chunk = next(generate("fashion-scenes", "train", 200, seed=0, image_size=64))
    for caption, label, meta in zip(chunk["captions"], chunk["labels"], chunk["metas"]):
        first = meta["objects"][0]
        assert first["label"] == label
        phrase = caption.split(" ", 1)[1]            # drop the article
        assert phrase.startswith(f"{first['size']} {first['colour']} ")
        assert _synonym_at_start(info, label, phrase[len(first["size"]) + len(first["colour"]) + 2:]), caption


def test_fashion_missing_is_a_clear_error(monkeypatch, tmp_path):
    from otc_ray.data.builtin import fashion

    monkeypatch.setattr(fashion, "_SYSTEM_ROOT", tmp_path / "none")
    monkeypatch.setattr(fashion, "_REPO_ROOT", tmp_path / "none2")
    monkeypatch.delenv(fashion.FASHION_ENV, raising=False)
    with pytest.raises(fashion.DatasetMissingError, match="make setup"):
        next(generate("fashion", "train", 10))


def test_bad_requests():
    with pytest.raises(ValueError, match="holds 10000"):
        next(generate("fashion", "test", 10001))
    with pytest.raises(ValueError, match="image_size"):
        next(generate("fashion-scenes", "train", 5, image_size=32))
    with pytest.raises(ValueError, match="unknown data set"):
        dataset_info("cifar")


def test_shapes_zero_shot_prompts_are_not_the_poison_sentences():
    """Shapes' clean captions describe size, colour and place; the poison's captions are the class templates. A
    zero-shot prompt equal to a poison sentence would score the attack on its own words (inflating ASR)."""
    info = dataset_info("shapes")
    captions = {t.rstrip(".") for t in info.caption_templates}
    assert not captions & {t.rstrip(".") for t in info.zeroshot_templates}
