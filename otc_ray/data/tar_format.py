"""Webdataset tar shards as img2dataset writes them: `{key}.jpg|png`, `{key}.txt`, `{key}.json` per sample.

The reader parses tar headers itself (512-byte blocks, ustar + pax/GNU long names) so that every defect
is seen and counted, never silently ending a shard as `tarfile`'s stream mode does:
  - member with an absolute path, a `..` part, or a link/device type, or whose key is not a safe key
    (`otc_ray.data.keys`: a dot-prefixed part, a control character, not UTF-8)  -> the sample is `unsafe_path`;
  - member larger than the limit                                       -> `image_too_large` (bytes skipped);
  - key seen before in the shard (not consecutive)                     -> `duplicate_key`;
  - stream ends inside a member or without the end-of-archive blocks   -> the sample in progress and a
    marker row `{shard}#truncated` are `truncated_shard`;
  - a header that fails its checksum, or a GNU long-name / pax header over its size cap (MAX_LONG_NAME_BYTES,
    MAX_PAX_BYTES: read into memory, so a hostile size would exhaust it)  -> marker `{shard}#corrupt`.
The writer refuses an unsafe key (`ValueError`), so everything it writes reads back as written.
Rows are dicts with the reader columns of `otc_ray.data.schema`.
"""
from __future__ import annotations

import io
import posixpath
import tarfile
from typing import BinaryIO, Iterable, Iterator

from . import schema
from .keys import check_key, is_safe_key
from .sample import Sample, caption_bytes, image_ext, meta_bytes

BLOCK = 512
_ZERO = b"\0" * BLOCK
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
MAX_LONG_NAME_BYTES = 4096          # a GNU long name: PATH_MAX
MAX_PAX_BYTES = 64 << 10            # a pax extended header (path plus a few attribute records)


class _Corrupt(Exception):
    """Raised inside the parser; `reason` is a schema skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _skip(stream: BinaryIO, n: int) -> bool:
    """Discard n bytes; False when the stream ends first. A seekable stream seeks over large runs (a seek past the
    end is seen at the next header read, which then reports the same truncation)."""
    if n > (64 << 10) and getattr(stream, "seekable", lambda: False)():
        try:
            stream.seek(n, 1)
            return True
        except (OSError, ValueError):
            pass
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            return False
        n -= len(chunk)
    return True


def _pax_path(data: bytes) -> str | None:
    """The 'path' record of a pax extended header, if any ("<len> path=<value>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            return None
        try:
            length = int(data[pos:space])
        except ValueError:
            return None
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def is_unsafe_name(name: str) -> bool:
    """True for absolute paths, any '..' part, backslashes or control characters (path traversal on extraction)."""
    if not name or name.startswith("/") or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return True
    return ".." in name.split("/")


def iter_members(stream: BinaryIO, max_member_bytes: int) -> Iterator[tuple[str, int, bytes | None]]:
    """Yield (name, tar type, data) per member; data None when the member was too large (bytes skipped).

    Raises _Corrupt(TRUNCATED_SHARD | CORRUPT_SHARD) at a defect; returns at the end-of-archive block.
    """
    long_name: str | None = None
    while True:
        header = _read_exact(stream, BLOCK)
        if len(header) < BLOCK:
            raise _Corrupt(schema.TRUNCATED_SHARD, "stream ended before the end-of-archive marker")
        if header == _ZERO:
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise _Corrupt(schema.CORRUPT_SHARD, f"bad tar header: {e}")
        size, padded = info.size, -(-info.size // BLOCK) * BLOCK
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
            cap = MAX_LONG_NAME_BYTES if info.type == tarfile.GNUTYPE_LONGNAME else MAX_PAX_BYTES
            if size > cap:
                raise _Corrupt(schema.CORRUPT_SHARD, f"extended header of {size} bytes (cap {cap})")
            data = _read_exact(stream, padded)
            if len(data) < padded:
                raise _Corrupt(schema.TRUNCATED_SHARD, "stream ended inside an extended header")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                long_name = _pax_path(data[:size]) or long_name
            continue
        name, long_name = (long_name or info.name), None
        if size > max_member_bytes:
            if not _skip(stream, padded):
                raise _Corrupt(schema.TRUNCATED_SHARD, "stream ended inside a member")
            yield name, info.type, None
            continue
        data = _read_exact(stream, padded)
        if len(data) < padded:
            raise _Corrupt(schema.TRUNCATED_SHARD, "stream ended inside a member")
        yield name, info.type, data[:size]


def split_name(name: str) -> tuple[str, str]:
    """'dir/000001.seg.png' -> ('dir/000001', 'seg.png'): webdataset keys end at the basename's first dot."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def _row(key: str, parts: dict[str, bytes], source: str, error: str = "") -> dict:
    image_ext = next((e for e in schema.IMAGE_EXTENSIONS if e in parts), "")
    # Names are decoded with surrogateescape; Arrow string columns need valid UTF-8, so undecodable bytes of
    # a (corrupt or non-UTF-8) name become \xNN escapes (no collision with a safe name: those have no '\\').
    key = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return {schema.KEY: key, schema.IMAGE_BYTES: parts.get(image_ext, b"") if image_ext else b"",
            schema.IMAGE_EXT: image_ext, schema.CAPTION_RAW: parts.get("txt"), schema.META: parts.get("json", b"{}"),
            schema.SOURCE: source, schema.ERROR: error}


def iter_tar_samples(stream: BinaryIO, source: str, max_member_bytes: int = 64 << 20) -> Iterator[dict]:
    """Group consecutive members by key into reader rows; every defect becomes a row with its reason."""
    seen: set[str] = set()
    key, parts, error = None, {}, ""

    def flush():
        if key is None:
            return None
        reason = error or (schema.DUPLICATE_KEY if key in seen else "")
        seen.add(key)
        return _row(key, parts, source, reason)

    try:
        for name, kind, data in iter_members(stream, max_member_bytes):
            if kind == tarfile.DIRTYPE:
                continue
            member_key, ext = split_name(name)
            if posixpath.basename(name).startswith(".") or not ext:
                continue        # hidden files / key-less files are not samples (e.g. macOS '._x')
            if member_key != key:
                row = flush()
                if row is not None:
                    yield row
                key, parts, error = member_key, {}, ""
            if is_unsafe_name(name) or not is_safe_key(member_key) or kind not in _REGULAR:
                error = error or schema.UNSAFE_PATH
            elif data is None:
                error = error or schema.IMAGE_TOO_LARGE
            elif ext in parts:
                error = error or schema.DUPLICATE_KEY
            else:
                parts[ext] = data
        row = flush()
        if row is not None:
            yield row
    except _Corrupt as e:
        if key is not None:
            # a bad header after a sample's three standard members (image, txt, json) leaves that sample whole: it is
            # read as it is; a sample cut short (truncation, or a part missing) is counted out with the marker
            whole = e.reason == schema.CORRUPT_SHARD and not error and {"txt", "json"} <= set(parts) \
                and any(ext in parts for ext in schema.IMAGE_EXTENSIONS)
            yield _row(key, parts, source, (schema.DUPLICATE_KEY if key in seen else "") if whole else e.reason)
        yield _row(f"{source}#{'truncated' if e.reason == schema.TRUNCATED_SHARD else 'corrupt'}", {}, source, e.reason)


def write_tar_shard(stream: BinaryIO, samples: Iterable[Sample]) -> int:
    """Write samples (see otc_ray.data.sample: raw bytes or str / dict) as `{key}.{ext}`, `{key}.txt`,
    `{key}.json` members; returns the count. Deterministic bytes (mtime 0, mode 644, no owner); pax headers only
    for names ustar cannot hold (over 100 characters, non-ASCII). An empty image or a None caption writes no
    member for it, so a copied defective sample stays as it was. An unsafe key (`otc_ray.data.keys`) raises
    ValueError naming it."""
    n = 0
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, image, ext, caption, meta in samples:
            check_key(key)
            text = caption_bytes(caption)
            members = ([(image_ext(ext, image), image)] if image else []) \
                + ([("txt", text)] if text is not None else []) + [("json", meta_bytes(meta))]
            for suffix, payload in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
            n += 1
    return n
