"""Test helper: the samples of a tar shard set as the tests inspect them."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def tar_members(shard: Path) -> dict[str, bytes]:
    """member name -> bytes of one tar shard."""
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def tar_samples(folder: Path) -> dict[str, dict]:
    """key -> {image (H, W, 3) uint8, image_bytes, caption, meta} of a tar shard set, in shard order."""
    out: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        for name, data in tar_members(shard).items():
            key, ext = name.split(".", 1)
            sample = out.setdefault(key, {})
            if ext == "txt":
                sample["caption"] = data.decode()
            elif ext == "json":
                sample["meta"] = json.loads(data)
            else:
                sample["image_bytes"], sample["image"] = data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return out
