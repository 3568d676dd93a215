"""`otc-ray data make`: write a built-in data set as a shard set (local or s3://), with `_info.json`."""
from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from ..config import DataConfig
from .builtin import dataset_info, generate
from .shards import ShardWriter, encode_image


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
