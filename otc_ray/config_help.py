"""`otc-ray config`: the effective config, every key with its value and its meaning.

    print(describe(load_config("tiny", ["train.epochs=3"])))
    # train.epochs = 3                  # ...
    meanings()["poison.count"]          # "poisoned samples; used unless rate > 0"

The meanings are the trailing `# comments` of the fields in otc_ray/config.py (with the comment lines continued
below them), read from the module's source with `ast` and `tokenize`: config.py stays the one place where a key
is explained. A field without a comment shows its key and value only.
"""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from . import config as config_module
from .config import Config, _section_prefixes, flatten


def _comments(source: str) -> dict[int, tuple[int, str, bool]]:
    """{line: (column, comment text, whether the line holds only the comment)} of a module's `#` comments."""
    out: dict[int, tuple[int, str, bool]] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip(), False)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return {line: (col, text, line not in code_lines) for line, (col, text, _) in out.items()}


def meanings(source: str | None = None) -> dict[str, str]:
    """{dotted key: meaning} from the trailing comments of the config dataclasses' fields in `source` (default:
    otc_ray/config.py). A comment continues on the following comment-only lines indented past the field."""
    source = source if source is not None else Path(config_module.__file__).read_text()
    comments = _comments(source)
    prefixes = {cls.__name__: prefix for cls, prefix in _section_prefixes().items()}
    out: dict[str, str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef) or node.name not in prefixes:
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            found = [comments[n] for n in range(item.lineno, item.end_lineno + 1)
                     if n in comments and not comments[n][2]]
            if not found:
                continue
            parts, line = [found[-1][1]], item.end_lineno + 1
            while line in comments and comments[line][2] and comments[line][0] > item.col_offset:
                parts.append(comments[line][1])
                line += 1
            out[prefixes[node.name] + item.target.id] = " ".join(p for p in parts if p)
    return out


def describe(cfg: Config) -> str:
    """Every key of `cfg` as `key = value  # meaning`, grouped by section (secrets shown as ***)."""
    flat, notes = flatten(cfg), meanings()
    width = max(len(f"{k} = {v}") for k, v in flat.items()) if flat else 0
    width = min(width, 44)
    lines: list[str] = []
    section = None
    for key, value in flat.items():
        head = key.rpartition(".")[0]
        if head != section:
            section = head
            doc = _section_doc(head)
            if lines:
                lines.append("")
            lines.append(f"# --- {head or 'top level'}" + (f": {doc}" if doc else ""))
        shown = f"{key} = {value}"
        lines.append(f"{shown:<{width}}  # {notes[key]}" if key in notes else shown)
    return "\n".join(lines)


def _section_doc(prefix: str) -> str:
    """The first line of a section's docstring ("" for the top level)."""
    for cls, p in _section_prefixes().items():
        if p == (f"{prefix}." if prefix else "") and cls is not Config:
            return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    return ""



