"""`otc-ray data inspect`: sample and skip counts, caption length statistics, a contact sheet PNG."""
from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..config import DataConfig
from . import schema
from .decode import decode_meta, good_rows
from .ray_io import load_samples
from .shards import read_info


@dataclass
class InspectReport:
    """What a shard set holds; `skipped` maps each skip reason to its count."""

    path: str
    total: int
    ok: int
    skipped: dict[str, int]
    caption_chars: dict[str, float]
    caption_words: dict[str, float]
    duplicate_keys: int
    sheet: str | None = None
    info: dict | None = field(default=None, repr=False)

    def lines(self) -> list[str]:
        out = [f"shard set      {self.path}", f"samples        {self.total} ({self.ok} ok, {self.total - self.ok} skipped)"]
        if self.info:
            out.append(f"data set       {self.info.get('dataset', {}).get('name', '?')} / {self.info.get('split', '?')}")
        for reason, n in sorted(self.skipped.items()):
            out.append(f"  skipped      {reason:<18} {n}")
        out.append(f"duplicate keys {self.duplicate_keys} (copies skipped; the first file's is kept)")
        for name, stats in (("caption chars", self.caption_chars), ("caption words", self.caption_words)):
            out.append(f"{name:<14} " + "  ".join(f"{k} {v:.1f}" for k, v in stats.items()))
        if self.sheet:
            out.append(f"contact sheet  {self.sheet}")
        return out


def _length_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    caps = batch[schema.CAPTION]
    return {schema.KEY: batch[schema.KEY], schema.ERROR: batch[schema.ERROR],
            "chars": np.array([len(c) for c in caps], np.int32), "words": np.array([len(c.split()) for c in caps], np.int32)}


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {"mean": float(values.mean()), "min": float(values.min()), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)), "max": float(values.max())}


def contact_sheet(images: np.ndarray, captions: list[str], path: str, columns: int = 8, tile: int = 128) -> str:
    """Save a grid of images (n,H,W,3) uint8 with their captions under each; returns the path."""
    n = len(images)
    rows = max(1, -(-n // columns))
    text_h = 52
    sheet = Image.new("RGB", (columns * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        sheet.paste(Image.fromarray(img).resize((tile - 8, tile - 8), Image.NEAREST), (x + 4, y + 4))
        wrapped = textwrap.wrap(cap, width=22)[:4]
        draw.multiline_text((x + 4, y + tile - 2), "\n".join(wrapped), fill=(0, 0, 0), font=font, spacing=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _is_poisoned(meta) -> bool:
    return decode_meta(meta)[0].get("poisoned") is True


def _poisoned_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the rows whose JSON meta says `"poisoned": true` (a poisoned set's ground truth)."""
    keep = np.array([_is_poisoned(m) for m in batch[schema.META]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def _sheet_sample(ds, n: int, poisoned_first: bool) -> dict[str, np.ndarray]:
    """Up to n good rows for the contact sheet; with `poisoned_first`, poisoned rows (captions marked [P]) lead."""
    good = ds.map_batches(good_rows, batch_format="numpy")
    if not poisoned_first:
        return good.take_batch(n, batch_format="numpy")
    rows = [r for r in good.map_batches(_poisoned_rows, batch_format="numpy").take(n)]
    for r in rows:
        r[schema.CAPTION] = "[P] " + r[schema.CAPTION]
    if len(rows) < n:
        rows += [r for r in good.take(n) if not _is_poisoned(r[schema.META])][:n - len(rows)]
    return {schema.IMAGE: np.stack([r[schema.IMAGE] for r in rows]), schema.CAPTION: np.array([r[schema.CAPTION] for r in rows])}


def inspect_shards(path: str, cfg: DataConfig, sheet_path: str | None = None, sheet_samples: int = 32,
                   poisoned_first: bool = False) -> InspectReport:
    """Read every sample of the shard set through Ray Data and summarise it (one streaming pass).

    poisoned_first: the contact sheet shows samples whose meta has `"poisoned": true` first (marked [P])."""
    ds = load_samples(path, cfg)
    outcomes: Counter = Counter()
    chars, words = [], []
    for batch in ds.map_batches(_length_columns, batch_format="numpy").iter_batches(batch_format="numpy"):
        ok = np.array([not e for e in batch[schema.ERROR]])
        outcomes.update(str(e) or "ok" for e in batch[schema.ERROR])
        chars.append(batch["chars"][ok])
        words.append(batch["words"][ok])
    total = sum(outcomes.values())
    sheet = None
    if sheet_path and outcomes.get("ok", 0):
        sample = _sheet_sample(ds, sheet_samples, poisoned_first)
        sheet = contact_sheet(sample[schema.IMAGE], list(sample[schema.CAPTION]), sheet_path)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    return InspectReport(path, total, outcomes.get("ok", 0), {k: v for k, v in outcomes.items() if k != "ok"},
                         _stats(cat(chars)), _stats(cat(words)), outcomes.get(schema.DUPLICATE_KEY, 0), sheet,
                         read_info(path, cfg.s3))


