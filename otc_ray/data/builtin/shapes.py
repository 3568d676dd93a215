"""Procedural shapes world: 1-3 coloured shapes on a noisy dark canvas, with fine-grained captions.

    world = ShapesWorld(image_size=32, seed=0, split="train")
    chunk = world.sample(1000)   # images (1000, 32, 32, 3) uint8, captions, labels (shape of object 0)

Each object sits in its own cell of a G x G grid (G = 2 at 32 px, 3 at 64 px), so objects never overlap
and spatial relations ("left of", "above") follow from the cells. Within an image no two objects share
shape and colour, so every caption is unambiguous; `negative` captions swap the colours of objects 0
and 1 (attribute-binding hard negatives). The test split draws one object per image, so each test image
has exactly one true class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hexagon", "star")
SHAPES_32PX = ("circle", "square", "triangle", "cross", "ring")   # distinguishable at 32 px
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (40, 210, 220),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_RGB = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
SIZE_NAMES = ("small", "large")

ONE = ("a {A}", "a photo of a {A}", "an image of a {A}", "a {A} {where}", "there is a {A} {where}",
       "a picture showing a {A} {where}")
TWO = ("a {A} {rel} a {B}", "a photo of a {A} {rel} a {B}", "there is a {A} {rel} a {B}",
       "an image with a {A} {rel} a {B}")
THREE = ("a {A}, a {B} and a {C}", "a {A} {rel} a {B}, and a {C}", "a photo of a {A}, a {B} and a {C}")


def _where(row: int, col: int, grid: int) -> str:
    """Position words for a grid cell ("in the top left", "at the bottom", "in the center")."""
    rows = ("top", "bottom") if grid == 2 else ("top", "middle", "bottom")
    cols = ("left", "right") if grid == 2 else ("left", "center", "right")
    if grid == 3 and row == 1 and col == 1:
        return "in the center"
    if grid == 3 and row == 1:
        return f"on the {cols[col]}"
    if grid == 3 and col == 1:
        return f"at the {rows[row]}"
    return f"in the {rows[row]} {cols[col]}"


def _relation(row_a: int, col_a: int, row_b: int, col_b: int) -> str:
    """Where object a is relative to object b, from their cells (the larger offset wins)."""
    dc, dr = col_a - col_b, row_a - row_b
    if abs(dc) >= abs(dr):
        return "left of" if dc < 0 else "right of"
    return "above" if dr < 0 else "below"


def _shape_mask(name: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inside-test for one shape. dx, dy: offsets from the centre (n, W, W) in pixels; r: radius (n,1,1)."""
    ax, ay, d2 = np.abs(dx), np.abs(dy), dx * dx + dy * dy
    if name == "circle":
        return d2 <= r * r
    if name == "square":
        return np.maximum(ax, ay) <= 0.8 * r
    if name == "diamond":
        return ax + ay <= 1.05 * r
    if name == "triangle":
        return (dy <= 0.6 * r) & (dy >= -r + 1.732 * ax)
    if name == "cross":
        arm = 0.36 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if name == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if name == "hexagon":
        return (ax <= 0.866 * r) & (0.577 * ax + ay <= r)
    if name == "star":
        theta = np.arctan2(dy, dx) + np.pi / 2
        rr = r * (0.5 + 0.5 * np.abs(np.cos(2.5 * theta)) ** 1.5)
        return d2 <= rr * rr
    raise ValueError(f"unknown shape {name!r}")


@dataclass
class Layout:
    """Per-image object attributes, arrays of shape (n, max_objects) unless noted."""

    count: np.ndarray       # (n,) objects per image
    shape: np.ndarray       # index into the generator's shapes
    colour: np.ndarray      # index into COLOUR_NAMES
    size: np.ndarray        # 0 small, 1 large
    radius: np.ndarray      # pixels
    row: np.ndarray
    col: np.ndarray
    cx: np.ndarray          # centre, pixels
    cy: np.ndarray
    rgb: np.ndarray         # (n, max_objects, 3) float32


class ShapesWorld:
    """Deterministic generator: the same (image_size, seed, split) gives the same samples, chunk by chunk."""

    def __init__(self, image_size: int = 32, seed: int = 0, split: str = "train", supersample: int = 2):
        if image_size not in (32, 64):
            raise ValueError(f"shapes: image_size must be 32 or 64, got {image_size}")
        self.size = image_size
        self.grid = 2 if image_size == 32 else 3
        self.shapes = SHAPES_32PX if image_size == 32 else SHAPES
        self.max_objects = 1 if split == "test" else (2 if image_size == 32 else 3)
        probs = {1: (1.0,), 2: (0.5, 0.5), 3: (0.4, 0.4, 0.2)}[self.max_objects]
        self.p_objects = np.asarray(probs)
        self.ss = supersample
        self.cell = image_size / self.grid
        self.seed_key = [seed, 0 if split == "train" else 1, image_size]
        self.rng = np.random.default_rng(self.seed_key)

    def start_chunk(self, index: int, chunk: int) -> None:
        """Draw the samples of chunk `index` from their own stream (so a longer run extends a shorter one)."""
        self.rng = np.random.default_rng(self.seed_key + [index])

    def capacity(self) -> int:
        return 10 ** 9          # procedural: unbounded

    @property
    def classes(self) -> tuple[str, ...]:
        return self.shapes

    def layout(self, n: int) -> Layout:
        rng, k, G = self.rng, self.max_objects, self.grid
        count = rng.choice(np.arange(1, k + 1), size=n, p=self.p_objects)
        cells = np.argsort(rng.random((n, G * G)), axis=1)[:, :k]
        shape = rng.integers(0, len(self.shapes), (n, k))
        colour = rng.integers(0, len(COLOUR_NAMES), (n, k))
        size = rng.integers(0, 2, (n, k))
        for j in range(1, k):                      # no two objects share (shape, colour)
            for i in range(j):
                clash = (shape[:, j] == shape[:, i]) & (colour[:, j] == colour[:, i])
                while clash.any():
                    colour[clash, j] = rng.integers(0, len(COLOUR_NAMES), int(clash.sum()))
                    clash = (shape[:, j] == shape[:, i]) & (colour[:, j] == colour[:, i])
        lo = np.where(size == 1, 0.36, 0.22) * self.cell
        hi = np.where(size == 1, 0.46, 0.30) * self.cell
        radius = lo + (hi - lo) * rng.random((n, k))
        row, col = cells // G, cells % G
        slack = np.maximum(self.cell / 2 - radius - 0.5, 0.0)
        cx = (col + 0.5) * self.cell + (2 * rng.random((n, k)) - 1) * slack
        cy = (row + 0.5) * self.cell + (2 * rng.random((n, k)) - 1) * slack
        rgb = np.clip(COLOUR_RGB[colour] + rng.normal(0, 12.0, (n, k, 3)), 0, 255).astype(np.float32)
        return Layout(count, shape, colour, size, radius, row, col, cx, cy, rgb)

    def render(self, L: Layout) -> np.ndarray:
        """(n, S, S, 3) uint8. Masks are evaluated on each object's cell window only, supersampled."""
        n, ss = len(L.count), self.ss
        S = self.size * ss
        background = self.rng.integers(0, 60, (n, 1, 1, 1)).astype(np.float32)
        canvas = np.broadcast_to(background, (n, S, S, 3)).copy()
        win = int(np.ceil(self.cell * ss))
        offsets = np.arange(win)
        for j in range(self.max_objects):
            for s_id, s_name in enumerate(self.shapes):
                idx = np.nonzero((L.count > j) & (L.shape[:, j] == s_id))[0]
                if idx.size == 0:
                    continue
                x0 = np.minimum(np.floor(L.col[idx, j] * self.cell * ss).astype(int), S - win)
                y0 = np.minimum(np.floor(L.row[idx, j] * self.cell * ss).astype(int), S - win)
                xs, ys = x0[:, None] + offsets, y0[:, None] + offsets            # (m, win)
                dx = ((xs + 0.5) / ss - L.cx[idx, j, None])[:, None, :]
                dy = ((ys + 0.5) / ss - L.cy[idx, j, None])[:, :, None]
                inside = _shape_mask(s_name, dx, dy, L.radius[idx, j, None, None])
                I, Y, X = idx[:, None, None], ys[:, :, None], xs[:, None, :]
                canvas[I, Y, X] = np.where(inside[..., None], L.rgb[idx, j, None, None, :], canvas[I, Y, X])
        if ss > 1:
            canvas = canvas.reshape(n, self.size, ss, self.size, ss, 3).mean(axis=(2, 4))
        canvas += self.rng.normal(0, 8.0, canvas.shape).astype(np.float32)
        return np.clip(canvas, 0, 255).astype(np.uint8)

    def _phrase(self, L: Layout, i: int, j: int, colour: int | None = None) -> str:
        c = L.colour[i, j] if colour is None else colour
        return f"{SIZE_NAMES[L.size[i, j]]} {COLOUR_NAMES[c]} {self.shapes[L.shape[i, j]]}"

    def captions(self, L: Layout) -> tuple[list[str], list[str]]:
        """(captions, negatives): a caption per image; the colour-swapped negative ("" for 1 object)."""
        caps, negs = [], []
        for i in range(len(L.count)):
            k = int(L.count[i])
            if k == 1:
                t = ONE[self.rng.integers(len(ONE))]
                caps.append(t.format(A=self._phrase(L, i, 0), where=_where(L.row[i, 0], L.col[i, 0], self.grid)))
                negs.append("")
                continue
            rel = _relation(L.row[i, 0], L.col[i, 0], L.row[i, 1], L.col[i, 1])
            A, B = self._phrase(L, i, 0), self._phrase(L, i, 1)
            if k == 2:
                caps.append(TWO[self.rng.integers(len(TWO))].format(A=A, rel=rel, B=B))
            else:
                caps.append(THREE[self.rng.integers(len(THREE))].format(A=A, rel=rel, B=B, C=self._phrase(L, i, 2)))
            swapped = L.colour[i, 0] != L.colour[i, 1]
            negs.append(f"a {self._phrase(L, i, 0, L.colour[i, 1])} {rel} a {self._phrase(L, i, 1, L.colour[i, 0])}"
                        if swapped else "")
        return caps, negs

    def sample(self, n: int) -> dict:
        """n samples: images (n,S,S,3) uint8, captions, negatives, labels (n,) shape of object 0, metas."""
        L = self.layout(n)
        images = self.render(L)
        captions, negatives = self.captions(L)
        metas = []
        for i in range(n):
            objs = [{"shape": self.shapes[L.shape[i, j]], "colour": COLOUR_NAMES[L.colour[i, j]],
                     "size": SIZE_NAMES[L.size[i, j]], "row": int(L.row[i, j]), "col": int(L.col[i, j])}
                    for j in range(int(L.count[i]))]
            metas.append({"objects": objs, "negative": negatives[i],
                          "colour_label": int(L.colour[i, 0]),
                          "colour_shape_label": int(L.colour[i, 0] * len(self.shapes) + L.shape[i, 0])})
        return {"images": images, "captions": captions, "labels": L.shape[:, 0].astype(np.int64), "metas": metas}
