"""Data preparation for a training run: the shard sets it reads, generated and poisoned once when not given.

    data = prepare_data(cfg)        # TrainData(train=..., test=..., manifest=...)

`data.train` / `data.test` shard sets are used as they are (a user's own: classes from `eval.classes`); otherwise the
built-in data set `data.dataset` is generated once under `<output_dir>/data/`. With `poison.attack` the training set
is poisoned, each attack of the tuple in turn, one transform each, also once: folders are named by a digest of their
settings and reused by later runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config, content_digest, replace, to_dict
from ..data.make import make_shards
from ..data.count import screen_outcomes
from ..data.shards import read_info
from ..poison.transform import poison_shards


@dataclass(frozen=True)
class TrainData:
    """Shard sets of one run: train (possibly poisoned), test, and the poison manifest folder (or None)."""

    train: str
    test: str
    manifest: str | None


def prepare_data(cfg: Config, progress: bool = True) -> TrainData:
    """Resolve (and generate / poison once, cached by content hash) the shard sets the run needs."""
    d, root = cfg.data, Path(cfg.output_dir).resolve() / "data"
    gen_key = {"dataset": d.dataset, "seed": d.seed, "image_size": d.image_size, "tint": d.tint,
               "per_shard": d.samples_per_shard, "format": d.image_format}

    def built_in(split: str, num: int) -> str:
        out = root / f"{d.dataset}-{split}-{num}-{content_digest(gen_key)}"
        if read_info(str(out), d.s3) is None:
            make_shards(d, split, num, str(out), "wds", progress=progress)
        return str(out)

    train = d.train or built_in("train", d.num_train)
    test = d.test or built_in("test", d.num_test)
    if not cfg.poison.attack:
        return TrainData(train, test, None)
    source = train
    for attack in cfg.poison.attack:                 # ("backdoor", "targeted") composes two transforms
        step = replace(cfg, poison__attack=(attack,)).poison
        # the folder digest spells the step's attack as one name, as the cache has always been keyed
        key = {"in": source, **to_dict(step), "attack": attack}
        if cfg.eval.classes:                          # a user's classes file decides which samples are eligible
            key["classes"] = cfg.eval.classes
        out = root / f"poisoned-{attack}-{content_digest(key)}"
        if read_info(str(out), d.s3) is None:
            poison_shards(source, str(out), step, d, target_source=test, progress=progress, classes=cfg.eval.classes)
        source = str(out)
    return TrainData(source, test, source)


def data_name(cfg: Config, classes_name: str) -> str:
    """What a run's data is called (MLflow tag `dataset`, compare's `data` column): the built-in data set when a
    split is generated from it, else the name of the classes (`eval.classes`' `name`, or its file's stem)."""
    return cfg.data.dataset if not (cfg.data.train and cfg.data.test) else classes_name


def shard_set_name(path: str) -> str:
    """A shard set's short name, its last two path parts: "s3://bkt/cc3m/train" -> "cc3m/train",
    "runs/data/fashion-test-1000-1a2b3c4d5e" -> "data/fashion-test-1000-1a2b3c4d5e"."""
    return "/".join(path.rstrip("/").split("/")[-2:]) or path


def count_usable(path: str, cfg: Config) -> dict[str, int]:
    """{"ok": good samples, reason: samples skipped for it} of a shard set, so that a corrupt or truncated shard
    shows up in the run's data/* metrics instead of vanishing silently: one read in the driver that screens
    metadata, captions and image headers without decoding pixels (`data.count.screen_outcomes`; the decode pass
    this replaced cost 30-80 s of a 5,000-pair run's start). A corrupt image body is found by the stream's
    decode and shows as rows missing from `data/epoch_rows`."""
    outcomes = screen_outcomes(path, cfg.data)
    if not outcomes.get("ok"):
        raise ValueError(f"no usable samples in {path}: {outcomes}")
    return outcomes
