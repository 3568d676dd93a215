"""What a safe sample key is: the one rule that readers (a counted `unsafe_path` skip) and the shard writers
(a `ValueError`) apply, so that everything read as a good sample can be written back unchanged.

A key is written as tar member names `{key}.{ext}` and read back by splitting the basename at its first dot,
so a safe key is a relative path of plain parts:
  - not empty, at most MAX_KEY_CHARS characters;
  - no leading `/`, no empty part (`a//b`), no part that starts with a dot (`.`, `..`, `.hidden`);
  - no dot in the last part (it would end the key early on reading: `a.b.png` is key `a`);
  - no backslash, no control character (C0, DEL, C1: NUL, newline, escape sequences in logs and names), no
    undecodable byte (a name that is not UTF-8: parquet cannot hold it).
"""
from __future__ import annotations

MAX_KEY_CHARS = 4000        # with ".ext", within a GNU long name (tar_format.MAX_LONG_NAME_BYTES)


def key_problem(key: str) -> str:
    """Why `key` is not a safe sample key ("" when it is)."""
    if not isinstance(key, str) or not key:
        return "empty key"
    if len(key) > MAX_KEY_CHARS:
        return f"key longer than {MAX_KEY_CHARS} characters"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in key):
        return "control character in key"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in key):
        return "undecodable bytes in key (not UTF-8)"
    if "\\" in key:
        return "backslash in key"
    if key.startswith("/"):
        return "absolute key (leading '/')"
    parts = key.split("/")
    if any(not p for p in parts):
        return "empty path part in key"
    if any(p.startswith(".") for p in parts):
        return "a key part starts with '.' ('.', '..' or hidden)"
    if "." in parts[-1]:
        return "dot in the key's last part (it would end the key early in a tar shard)"
    return ""


def is_safe_key(key: str) -> bool:
    """True when `key` passes `key_problem`."""
    return not key_problem(key)


def check_key(key: str) -> str:
    """`key` when it is safe; otherwise ValueError naming the problem and the key (repr, so control characters
    show escaped)."""
    problem = key_problem(key)
    if problem:
        shown = repr(key) if len(repr(key)) <= 120 else repr(key)[:117] + "..."
        raise ValueError(f"unsafe sample key {shown}: {problem}")
    return key
