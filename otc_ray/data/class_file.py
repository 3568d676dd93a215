"""A shard set's classes: a user's classes file (`eval.classes`), or the `_info.json` a built-in set carries.

    info = read_classes_file("s3://bkt/pets/classes.json", s3)           # DatasetInfo
    info = shard_set_classes("data/pets-test", cfg.eval.classes, cfg.data.s3)
    label = meta_label({"label": "cat"}, info.classes)                    # 0, or -1 when the meta names none

A classes file is the JSON of `otc_ray/data/classes/*.json`:
    {"name": "pets",                                   optional (default: the file's stem)
     "classes": ["cat", "dog"],                        required: class names, in label order
     "synonyms": {"cat": ["cat", "kitten"]},           optional: words a caption may use (default: the name)
     "zeroshot_templates": ["a photo of a {c}."],      optional (default: CLIP's "a photo of a {c}.")
     "caption_templates": ["a photo of a {c}"]}        optional: captions of targeted poison (default: zero-shot's)
Every template holds `{c}` and nothing else in braces; a file that does not fit is a ValueError naming the field.
"""
from __future__ import annotations

import json
import posixpath

from ..config import S3Config
from .class_info import DatasetInfo
from .shards import read_info
from .storage import resolve

DEFAULT_ZEROSHOT_TEMPLATES = ("a photo of a {c}.",)
MAX_CLASSES_FILE_BYTES = 16 * 2 ** 20


def _strings(value, what: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"classes file {where}: '{what}' must be a non-empty list of non-empty strings")
    return value


def _templates(value, what: str, where: str) -> tuple[str, ...]:
    for t in _strings(value, what, where):
        try:
            ok = "{c}" in t and t.format(c="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"classes file {where}: '{what}' template {t!r} must hold {{c}} and no other field")
    return tuple(value)


def classes_from_dict(raw: object, where: str, default_name: str = "classes") -> DatasetInfo:
    """A DatasetInfo from a classes file's parsed JSON (`where` names the file in errors)."""
    if not isinstance(raw, dict):
        raise ValueError(f"classes file {where}: expected a JSON object with a 'classes' list")
    classes = _strings(raw.get("classes"), "classes", where)
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise ValueError(f"classes file {where}: class names repeat: {dup[:5]}")
    synonyms = raw.get("synonyms", {})
    if not isinstance(synonyms, dict):
        raise ValueError(f"classes file {where}: 'synonyms' must map class names to lists of words")
    unknown = sorted(set(synonyms) - set(classes))
    if unknown:
        raise ValueError(f"classes file {where}: 'synonyms' names classes not in 'classes': {unknown[:5]}")
    synonyms = {c: _strings(synonyms[c], f"synonyms.{c}", where) if c in synonyms else [c] for c in classes}
    zeroshot = _templates(raw.get("zeroshot_templates", list(DEFAULT_ZEROSHOT_TEMPLATES)), "zeroshot_templates",
                          where)
    captions = _templates(raw.get("caption_templates", [t.rstrip(".") for t in zeroshot]), "caption_templates",
                          where)
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"classes file {where}: 'name' must be a non-empty string")
    return DatasetInfo(name, tuple(classes), synonyms, captions, zeroshot)


def read_classes_file(path: str, s3: S3Config) -> DatasetInfo:
    """The classes file at `path` (local or s3://); ValueError when missing, too large or malformed."""
    fs, file = resolve(path, s3)
    if not fs.isfile(file):
        raise ValueError(f"classes file not found: {path}")
    if fs.size(file) > MAX_CLASSES_FILE_BYTES:
        raise ValueError(f"classes file {path} is over {MAX_CLASSES_FILE_BYTES >> 20} MiB")
    with fs.open(file, "rb") as f:
        text = f.read()
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"classes file {path} is not valid JSON ({e})") from None
    stem = posixpath.splitext(posixpath.basename(file))[0]
    return classes_from_dict(raw, path, default_name=stem)


def shard_set_classes(path: str, classes_file: str, s3: S3Config) -> DatasetInfo:
    """The classes of the shard set at `path`: those of `classes_file` when given (`eval.classes`), else its
    `_info.json`'s `dataset` section (built-in and poisoned sets carry one); ValueError when neither exists."""
    if classes_file:
        return read_classes_file(classes_file, s3)
    info = read_info(path, s3)
    if not info or "dataset" not in info:
        raise ValueError(f"{path} names no classes (no _info.json with a 'dataset' section): set eval.classes to a "
                         "JSON file of class names, synonyms and zero-shot templates (see otc_ray/data/classes/)")
    return DatasetInfo.from_dict(info["dataset"])


def meta_label(meta: dict, classes: tuple[str, ...]) -> int:
    """The class index a sample's metadata names: an int `label` in range, a `label` or `class` string that is a
    class name; -1 when it names none. ValueError for a label outside the classes (a test set that does not
    belong to this classes file must not be scored as unlabelled)."""
    label = meta.get("label")
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(classes):
            raise ValueError(f"label {label} is outside the {len(classes)} classes ({', '.join(classes[:5])}, ...)")
        return label
    for name in (label, meta.get("class")):
        if isinstance(name, str):
            if name not in classes:
                raise ValueError(f"class {name!r} is not one of the {len(classes)} classes "
                                 f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
            return classes.index(name)
    return -1
