"""`otc-ray data make`: write a built-in data set as a shard set (local or s3://), with `_info.json`.

    prepare_output("data/train", s3, overwrite=False)   # ValueError when the folder already holds anything
    make_shards(cfg, "train", 1000, "data/train", "wds")
"""
from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass

from tqdm import tqdm

from ..config import DataConfig
from .builtin import dataset_info, generate
from .shards import ShardWriter, encode_image
from .storage import display, resolve

# what a shard set written by this package consists of: numbered or cleaned shards, side files, unfinished temps
_SHARD_SET_FILE = re.compile(r"^(\d{5}|clean-[0-9a-f]{16})\.(tar|parquet)(\.tmp-[0-9a-f]{8})?$|^_[a-z_]+\.(json|parquet)$")


def prepare_output(out: str, s3, overwrite: bool = False) -> None:
    """Make sure `out` (local or s3://) can take a new shard set: absent or empty is fine; a shard set there is
    removed with `overwrite` (its shards and side files only); anything else is refused. ValueError says why.

    Writing over an old set would mix the two (its extra shards stay and are read, `_info.json` counts the new)."""
    fs, root = resolve(out, s3)
    if not fs.exists(root):
        return
    if fs.isfile(root):
        raise ValueError(f"--out {out} is a file; give a folder (or s3:// prefix) for the shard set")
    files = [f for f in fs.find(root) if f != root]
    if not files:
        return
    if not overwrite:
        raise ValueError(f"--out {out} is not empty ({len(files)} files, e.g. {display(fs, files[0])}): choose a new "
                         "folder, or pass --overwrite to replace the shard set there")
    foreign = [f for f in files if posixpath.dirname(f) != root or not _SHARD_SET_FILE.match(posixpath.basename(f))]
    if foreign:
        raise ValueError(f"--overwrite replaces only a shard set, and {out} also holds other files (e.g. "
                         f"{display(fs, foreign[0])}); nothing was removed: choose a new folder")
    for f in files:
        fs.rm_file(f)


@dataclass(frozen=True)
class MakeReport:
    out: str
    num_samples: int
    num_shards: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_samples / max(self.seconds, 1e-9)


def make_shards(cfg: DataConfig, split: str, num: int, out: str, fmt: str, progress: bool = True) -> MakeReport:
    """Generate `num` samples of `cfg.dataset`/`split` (seed, image size, tint from cfg) into shards at `out`."""
    if fmt not in ("wds", "parquet"):
        raise ValueError(f"format must be wds or parquet, got {fmt!r}")
    info = dataset_info(cfg.dataset, cfg.image_size)
    start = time.perf_counter()
    bar = tqdm(total=num, desc=f"{cfg.dataset}/{split}", unit="img", disable=not progress)
    with ShardWriter(out, fmt, cfg.samples_per_shard, cfg.s3) as writer:
        for chunk in generate(cfg.dataset, split, num, seed=cfg.seed, image_size=cfg.image_size, tint=cfg.tint):
            for key, image, caption, meta in zip(chunk["keys"], chunk["images"], chunk["captions"], chunk["metas"]):
                writer.add(key, encode_image(image, cfg.image_format), cfg.image_format, caption, meta)
            bar.update(len(chunk["keys"]))
        writer.close()
        writer.write_info({"dataset": info.to_dict(), "split": split, "num_samples": writer.written,
                           "seed": cfg.seed, "image_size": cfg.image_size, "format": fmt, "tint": cfg.tint})
    bar.close()
    return MakeReport(out, writer.written, len(writer.paths), time.perf_counter() - start)
