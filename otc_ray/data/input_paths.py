"""Input paths checked before any work starts: a typo is named as a missing path in seconds, not minutes later as
a confusing read error from inside Ray.

    check_inputs({"--in": "data/shapes-trian", "eval.classes": ""}, s3_cfg)
    # ValueError: --in data/shapes-trian: no such file or folder (did you mean data/shapes-train?)

Local paths are checked with the file system (a glob must match something); `s3://` paths with one listing
request. An S3 endpoint that cannot be asked (credentials, network) is left to the read that follows, which says
what went wrong with its own retries and timeouts.
"""
from __future__ import annotations

import difflib
import glob
import os

from ..config import S3Config
from .storage import is_s3, resolve


def _local_problem(path: str) -> str | None:
    """Why a local path names nothing (None: it does)."""
    if any(c in path for c in "*?["):
        return None if glob.glob(path) else "no file matches this pattern"
    if os.path.exists(path):
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"no such file or folder (nor its folder {os.path.dirname(path) or '.'})"
    close = difflib.get_close_matches(os.path.basename(path.rstrip("/")), sorted(os.listdir(parent)), n=1, cutoff=0.7)
    hint = f" (did you mean {os.path.join(os.path.dirname(path), close[0])}?)" if close else ""
    return f"no such file or folder{hint}"


def _s3_problem(path: str, s3: S3Config) -> str | None:
    """Why an s3:// path names nothing (None: it does, or the store could not be asked)."""
    try:
        fs, root = resolve(path, s3)
        if any(c in root for c in "*?["):
            return None if fs.glob(root) else "no object matches this pattern"
        return None if fs.exists(root) else "no object or prefix there"
    except Exception:          # noqa: BLE001 - credentials, endpoint: the real read reports them properly
        return None


def check_inputs(paths: dict[str, str | None], s3: S3Config, shard_sets: tuple[str, ...] = ()) -> None:
    """ValueError naming the first input path that names nothing: `paths` maps how the user gave it (a flag such as
    "--in", or a config key such as "data.train") to the path; empty or None entries are not given and skipped.
    The paths labelled in `shard_sets` must also hold shards (one listing: `shards.list_shards`)."""
    for label, path in paths.items():
        if not path:
            continue
        problem = _s3_problem(path, s3) if is_s3(path) else _local_problem(path)
        if problem:
            raise ValueError(f"{label} {path}: {problem}")
        if label in shard_sets and not is_s3(path):
            from .shards import ShardSetError, list_shards

            try:
                list_shards(path, "auto", s3)
            except ShardSetError as e:
                raise ValueError(f"{label} {path} is not a shard set ({e})") from None
