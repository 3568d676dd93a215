"""Built-in image-caption data sets, deterministic from a seed: `shapes`, `fashion`, `fashion-scenes`.

    info = dataset_info("fashion")                      # classes, synonyms, caption / zero-shot templates
    for chunk in generate("fashion", "train", 5000, seed=0, image_size=32):
        chunk["keys"], chunk["images"], chunk["captions"], chunk["labels"], chunk["metas"]
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Iterator

from ..class_info import DatasetInfo
from .fashion import DatasetMissingError, FashionItems, FashionScenes
from .shapes import SHAPES, SHAPES_32PX, ShapesWorld

BUILTIN_DATASETS = ("fashion", "fashion-scenes", "shapes")
SPLITS = ("train", "test")


def dataset_info(name: str, image_size: int = 32) -> DatasetInfo:
    """Class names and templates of a built-in data set (shapes: 5 shapes at 32 px, 8 at 64 px)."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown data set {name!r} (built-in: {', '.join(BUILTIN_DATASETS)})")
    raw = json.loads(resources.files("otc_ray.data").joinpath("classes", f"{name}.json").read_text())
    classes = tuple(raw["classes"]) if name != "shapes" else (SHAPES_32PX if image_size == 32 else SHAPES)
    return DatasetInfo(name, classes, raw["synonyms"], tuple(raw["caption_templates"]),
                       tuple(raw["zeroshot_templates"]))


def _generator(name: str, split: str, seed: int, image_size: int, tint: float):
    info = dataset_info(name, image_size)
    if name == "shapes":
        return ShapesWorld(image_size=image_size, seed=seed, split=split)
    cls = FashionItems if name == "fashion" else FashionScenes
    return cls(info.classes, info.synonyms, info.caption_templates, image_size=image_size, seed=seed,
               split=split, tint=tint)


CHUNK = 1000


def generate(name: str, split: str, num: int, seed: int = 0, image_size: int = 32, tint: float = 0.0) -> Iterator[dict]:
    """Yield chunks of at most CHUNK samples: keys, images (n,S,S,3) uint8, captions, labels (n,), metas.

    Each chunk has its own random stream, so the same arguments give the same bytes and a larger `num`
    extends a smaller one (same prefix); the last chunk is drawn whole and cut.
    Each meta holds label, class name, data set and split (plus generator-specific fields).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    info = dataset_info(name, image_size)
    source = _generator(name, split, seed, image_size, tint)
    if num > source.capacity():
        raise ValueError(f"{name}/{split} holds {source.capacity()} images; asked for {num}")
    done = 0
    while done < num:
        n = min(CHUNK, num - done)
        source.start_chunk(done // CHUNK, CHUNK)
        full = source.sample(min(CHUNK, source.capacity() - done))
        out = {k: v[:n] for k, v in full.items()}
        keys = [f"{done + i:09d}" for i in range(n)]
        for meta, label in zip(out["metas"], out["labels"]):
            meta.update(label=int(label), **{"class": info.classes[int(label)]}, dataset=name, split=split)
        yield {"keys": keys, **out}
        done += n


__all__ = ["BUILTIN_DATASETS", "DatasetInfo", "DatasetMissingError", "dataset_info", "generate"]
