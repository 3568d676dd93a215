"""Fashion-MNIST as image-caption data: single items (`fashion`) and composed scenes (`fashion-scenes`).

The 70k real images come from Debian's `dataset-fashion-mnist` (IDX files); `make setup` installs them.
    fashion:         one item per image, 28 px padded to 32 (or 56 padded to 64), grey or tinted, captions
                     from varied templates and class synonyms ("a photo of a red sneaker").
    fashion-scenes:  1-2 tinted items on a 64x64 canvas (2x2 cells, large 28 px or small 18 px), captions
                     naming class, colour, size and position ("a large red sneaker left of a small cyan bag").
The test split of scenes holds one item per image, so each test image has exactly one true class.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..class_info import fix_articles
from .shapes import COLOUR_NAMES, COLOUR_RGB

FASHION_ENV = "OTC_RAY_FASHION_MNIST"
_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
_REPO_ROOT = Path(__file__).resolve().parents[3] / ".data" / "usr" / "share" / "datasets" / "fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DatasetMissingError(FileNotFoundError):
    """A built-in data set's files are not installed (the message says how to install them)."""


def fashion_root() -> Path:
    """Folder with the Fashion-MNIST IDX files: $OTC_RAY_FASHION_MNIST, the Debian path, or ./.data of the repo."""
    candidates = [Path(os.environ[FASHION_ENV])] if os.environ.get(FASHION_ENV) else []
    candidates += [_SYSTEM_ROOT, _REPO_ROOT]
    for root in candidates:
        if all((root / f).is_file() for pair in _FILES.values() for f in pair):
            return root
    raise DatasetMissingError(
        "Fashion-MNIST is not installed. Run `make setup` (as root it runs `apt-get install -y dataset-fashion-mnist`; "
        "otherwise it extracts the .deb into ./.data), or set OTC_RAY_FASHION_MNIST to a folder holding "
        f"{', '.join(f for pair in _FILES.values() for f in pair)}. Looked in: {', '.join(map(str, candidates))}")


def load_fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,28,28) uint8, labels (N,) int64) of the official split: train 60000, test 10000."""
    if split not in _FILES:
        raise ValueError(f"fashion: split must be 'train' or 'test', got {split!r}")
    root = fashion_root()
    img_file, lbl_file = _FILES[split]
    with gzip.open(root / img_file, "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / lbl_file, "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"fashion: {len(images)} images but {len(labels)} labels in {root}")
    return images, labels


def _resize(gray: np.ndarray, side: int) -> np.ndarray:
    """(N,28,28) uint8 -> (N,side,side) uint8, bilinear; identity for side 28."""
    if side == gray.shape[1]:
        return gray
    return np.stack([np.asarray(Image.fromarray(g).resize((side, side), Image.BILINEAR)) for g in gray])


class FashionItems:
    """`fashion`: one item per image. Deterministic from (seed, split); items drawn without replacement."""

    def __init__(self, classes, synonyms, templates, image_size=32, seed=0, split="train", tint=0.0):
        if image_size not in (32, 64):
            raise ValueError(f"fashion: image_size must be 32 or 64, got {image_size}")
        self.images, self.labels = load_fashion(split)
        self.classes, self.synonyms, self.templates = classes, synonyms, templates
        self.size, self.tint = image_size, tint
        self.seed_key = [seed, 0 if split == "train" else 1, 7]
        self.rng = np.random.default_rng(self.seed_key)
        self.order = self.rng.permutation(len(self.images))
        self.cursor = 0

    def start_chunk(self, index: int, chunk: int) -> None:
        """Chunk `index` takes items order[index*chunk:] with its own random stream for tints and captions."""
        self.rng = np.random.default_rng(self.seed_key + [index])
        self.cursor = index * chunk

    def capacity(self) -> int:
        return len(self.images)

    def sample(self, n: int) -> dict:
        idx = self.order[self.cursor:self.cursor + n]
        self.cursor += n
        inner = 28 if self.size == 32 else 56
        pad = (self.size - inner) // 2
        gray = _resize(self.images[idx], inner).astype(np.float32) / 255.0
        tinted = self.rng.random(n) < self.tint
        colour = self.rng.integers(0, len(COLOUR_NAMES), n)
        rgb = np.where(tinted[:, None], COLOUR_RGB[colour], 255.0)              # (n,3)
        items = gray[..., None] * rgb[:, None, None, :]
        images = np.zeros((n, self.size, self.size, 3), np.uint8)
        images[:, pad:pad + inner, pad:pad + inner] = np.clip(np.rint(items), 0, 255).astype(np.uint8)
        captions, metas = [], []
        for i in range(n):
            name = self.classes[self.labels[idx[i]]]
            words = self.synonyms[name][self.rng.integers(len(self.synonyms[name]))]
            if tinted[i]:
                words = f"{COLOUR_NAMES[colour[i]]} {words}"
            template = self.templates[self.rng.integers(len(self.templates))]
            captions.append(fix_articles(template.format(c=words)))
            metas.append({"source_index": int(idx[i]),
                          "colour": COLOUR_NAMES[colour[i]] if tinted[i] else "grey"})
        return {"images": images, "captions": captions, "labels": self.labels[idx], "metas": metas}


class FashionScenes:
    """`fashion-scenes`: 1-2 tinted items on a 64x64 canvas with class, colour, size and position words."""

    CELL = 32
    LARGE, SMALL = 28, 18

    def __init__(self, classes, synonyms, templates, image_size=64, seed=0, split="train", tint=1.0):
        if image_size != 64:
            raise ValueError(f"fashion-scenes: image_size must be 64 (--image-size 64 or data.image_size=64), got {image_size}")
        self.images, self.labels = load_fashion(split)
        self.classes, self.synonyms = classes, synonyms
        self.max_items = 1 if split == "test" else 2
        self.seed_key = [seed, 0 if split == "train" else 1, 64]
        self.rng = np.random.default_rng(self.seed_key)

    def start_chunk(self, index: int, chunk: int) -> None:
        self.rng = np.random.default_rng(self.seed_key + [index])

    def capacity(self) -> int:
        return 10 ** 9          # items are drawn with replacement: scenes are combinatorial

    def _item_words(self, size_name: str, colour: str, label: int) -> str:
        name = self.classes[label]
        return f"{size_name} {colour} {self.synonyms[name][self.rng.integers(len(self.synonyms[name]))]}"

    def sample(self, n: int) -> dict:
        rng = self.rng
        images = np.zeros((n, 64, 64, 3), np.float32)
        captions, labels, metas = [], np.zeros(n, np.int64), []
        rows, cols = ("top", "bottom"), ("left", "right")
        for i in range(n):
            k = int(rng.integers(1, self.max_items + 1))
            cells = rng.permutation(4)[:k]
            phrases, objs = [], []
            for c in cells:
                j = int(rng.integers(len(self.images)))
                large = bool(rng.random() < 0.5)
                colour = int(rng.integers(len(COLOUR_NAMES)))
                item = (self.images[j] if large else _resize(self.images[j:j + 1], self.SMALL)[0]) / 255.0
                s = item.shape[0]
                r0 = (c // 2) * self.CELL + int(rng.integers(0, self.CELL - s + 1))
                c0 = (c % 2) * self.CELL + int(rng.integers(0, self.CELL - s + 1))
                region = images[i, r0:r0 + s, c0:c0 + s]
                images[i, r0:r0 + s, c0:c0 + s] = region * (1 - item[..., None]) + item[..., None] * COLOUR_RGB[colour]
                size_name = "large" if large else "small"
                phrases.append(self._item_words(size_name, COLOUR_NAMES[colour], int(self.labels[j])))
                objs.append({"label": int(self.labels[j]), "colour": COLOUR_NAMES[colour], "size": size_name,
                             "row": int(c // 2), "col": int(c % 2), "source_index": j})
            labels[i] = objs[0]["label"]
            if k == 1:
                where = f"in the {rows[objs[0]['row']]} {cols[objs[0]['col']]}"
                captions.append(fix_articles(f"a {phrases[0]} {where}"))
            else:
                dc, dr = objs[0]["col"] - objs[1]["col"], objs[0]["row"] - objs[1]["row"]
                rel = ("left of" if dc < 0 else "right of") if abs(dc) >= abs(dr) else ("above" if dr < 0 else "below")
                captions.append(fix_articles(f"a {phrases[0]} {rel} a {phrases[1]}"))
            metas.append({"objects": objs})
        return {"images": np.clip(np.rint(images), 0, 255).astype(np.uint8), "captions": captions,
                "labels": labels, "metas": metas}
