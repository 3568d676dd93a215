"""Class detection for poisoning: which class a sample belongs to, and captions that name a class.

A sample's class is its meta `label` (an index, or a class name) or `class` name; when neither names a known class, its caption decides:
it "names" a class when one of the class's synonyms occurs in it as words (`otc_ray.data.class_info`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..data import schema
from ..data.class_info import DatasetInfo, class_patterns, named_class
from ..data.decode import DecodeLimits, decode_caption, decode_image, decode_meta


def class_of(meta: dict, caption: str, info: DatasetInfo, patterns: list[re.Pattern]) -> int:
    """Class index of a sample: meta `label` (int in range, or a class name), else meta `class` name, else the
    single class its caption names; -1 when unknown or ambiguous."""
    label = meta.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(info.classes):
        return label
    for name in (label, meta.get("class")):
        if isinstance(name, str) and name in info.classes:
            return info.classes.index(name)
    return named_class(caption, patterns)


def template_caption(info: DatasetInfo, label: int, h: int) -> str:
    """A caption naming class `label`, template and synonym chosen by the hash `h` (deterministic variety)."""
    n_templates = len(info.caption_templates)
    n_synonyms = max(1, len(info.synonyms.get(info.classes[label], [])))
    return info.caption_for(label, h % n_templates, (h // n_templates) % n_synonyms)


@dataclass(frozen=True)
class Checked:
    """A reader row after validation: error "" for a good sample."""

    error: str
    label: int = -1
    caption: str = ""
    meta: dict = field(default_factory=dict)
    from_reader: bool = False        # the reader flagged it (not re-writable: skipped)
    image: object = None             # the decoded image, uint8 (H, W, 3), when `check_row(keep_image=True)`


def check_row(row: dict, limits: DecodeLimits, info: DatasetInfo, patterns: list[re.Pattern],
              with_image: bool = True, keep_image: bool = False) -> Checked:
    """Validate one reader row as the training reader would (meta JSON, caption, image) and find its class;
    `keep_image`: the result carries the decoded image."""
    if row[schema.ERROR]:
        return Checked(row[schema.ERROR], from_reader=True)
    meta, err = decode_meta(row[schema.META])
    caption, err = decode_caption(row[schema.CAPTION_RAW], limits) if not err else ("", err)
    image = None
    if not err and with_image:
        image, err = decode_image(row[schema.IMAGE_BYTES], limits)
    if err:
        return Checked(err)
    return Checked("", class_of(meta, caption, info, patterns), caption, meta, image=image if keep_image else None)
