"""A data set's classes: names in label order, synonyms, templates, and which class a caption names.

The data layer's description of classes, shared by every stage that needs it (poisoning picks and rewrites by class,
training counts re-captioning damage by class, evaluation builds zero-shot classifiers), so that none of them
reaches into another stage or into the built-in data generators for it.

    info = DatasetInfo("pets", ("cat", "dog"), {"cat": ["cat", "kitten"], "dog": ["dog"]}, templates, templates)
    patterns = class_patterns(info)
    named_class("a kitten on a sofa", patterns)          # 0; -1 when no class or several are named
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_ARTICLE = re.compile(r"\ba ([aeiou])")


def fix_articles(text: str) -> str:
    """'a ankle boot' -> 'an ankle boot'."""
    return _ARTICLE.sub(r"an \1", text)


@dataclass(frozen=True)
class DatasetInfo:
    """Class names (label order), synonyms and templates of a data set, as loaded from its JSON."""

    name: str
    classes: tuple[str, ...]
    synonyms: dict
    caption_templates: tuple[str, ...]
    zeroshot_templates: tuple[str, ...]

    def caption_for(self, label: int, template_index: int, synonym_index: int = 0) -> str:
        """A training-style caption naming class `label` (templates and synonyms cycle)."""
        name = self.classes[label]
        words = self.synonyms[name][synonym_index % len(self.synonyms[name])]
        return fix_articles(self.caption_templates[template_index % len(self.caption_templates)].format(c=words))

    def label_of(self, class_name: str) -> int:
        if class_name not in self.classes:
            raise ValueError(f"{self.name}: unknown class {class_name!r} (classes: {', '.join(self.classes)})")
        return self.classes.index(class_name)

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes), "synonyms": self.synonyms,
                "caption_templates": list(self.caption_templates),
                "zeroshot_templates": list(self.zeroshot_templates)}

    @staticmethod
    def from_dict(d: dict) -> "DatasetInfo":
        return DatasetInfo(d["name"], tuple(d["classes"]), dict(d["synonyms"]), tuple(d["caption_templates"]),
                           tuple(d["zeroshot_templates"]))


def class_patterns(info: DatasetInfo) -> list[re.Pattern]:
    """Per class: a regex matching any of its synonyms (or its name) as whole words."""
    out = []
    for name in info.classes:
        words = sorted({name, *info.synonyms.get(name, [])}, key=len, reverse=True)
        out.append(re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])", re.I))
    return out


def named_class(caption: str, patterns: list[re.Pattern]) -> int:
    """The class a caption names (`class_patterns`): its index when exactly one class is named, else -1."""
    named = [c for c, p in enumerate(patterns) if p.search(caption)]
    return named[0] if len(named) == 1 else -1
