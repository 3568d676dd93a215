"""Data preparation for a training run: the shard sets it reads, generated and poisoned once when not given.

    data = prepare_data(cfg)        # TrainData(train=..., test=..., manifest=...)

`data.train` / `data.test` shard sets are used as they are (a user's own: classes from `eval.classes`); otherwise the
built-in data set `data.dataset` is generated once under `<output_dir>/data/`. With `poison.attack` the training set
is poisoned, each attack of the tuple in turn, one transform each, also once: folders are named by a digest of their
settings and reused by later runs. A `data.train` that `otc-ray poison` wrote carries its attacks already: its
`_info.json` poison history decides the run's `poison.*` (`carried_poison`), and its manifest the detection truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config, content_digest, replace, to_dict
from ..data.make import make_shards
from ..data.count import screen_outcomes
from ..data.shards import read_info
from ..poison.transform import poison_shards, prior_attacks


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
    if d.train and prior_attacks(read_info(d.train, d.s3) or {}):
        return TrainData(train, test, train)         # poisoned by the user: `carried_poison` made cfg.poison match
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


def _recorded_poison(record: dict) -> dict:
    """`poison.*` values of one attack as `otc-ray poison` recorded it in `_info.json` (its `poison` section)."""
    out = {"seed": record.get("seed", 0)}
    if record.get("attack") == "backdoor":
        trigger = record.get("trigger") or {}
        out |= {"target": record.get("target", ""), "count": record.get("count", 0), "rate": record.get("rate", 0.0),
                "label_consistent": bool(record.get("label_consistent", False))}
        out |= {k: trigger[t] for k, t in (("trigger", "kind"), ("trigger_size", "size"),
                                           ("trigger_location", "location"), ("blend_alpha", "alpha"),
                                           ("sig_delta", "delta"), ("sig_frequency", "frequency")) if t in trigger}
    elif record.get("attack") == "targeted":
        out |= {k: record[k] for k in ("targets", "per_target", "caption_source") if k in record}
        out["adversarial"] = record.get("target", "")
    return out


def carried_poison(cfg: Config) -> tuple[Config, list[str]]:
    """(cfg, notes): when `data.train` is a set poisoned by `otc-ray poison`, cfg with `poison.*` set from the set's
    poison history (the attacks it carries, their target, count and trigger), so that the run's tags, parameters,
    compare row and detection metrics describe the data it trains on; the config's own `poison.*` would describe
    an attack that is not there (and poisoning the set again fails: it already carries the attack). The notes say
    what was taken over, for the console. A clean or a built-in training set leaves cfg as it is."""
    if not cfg.data.train:
        return cfg, []
    history = prior_attacks(read_info(cfg.data.train, cfg.data.s3) or {})
    if not history:
        return cfg, []
    values: dict = {}
    for record in history:                            # a composed set: one record per attack (seeds alike)
        values |= _recorded_poison(record)
    attacks = tuple(r.get("attack") for r in history)
    carried = replace(cfg, poison__attack=attacks, **{f"poison__{k}": v for k, v in values.items()})
    notes = [] if cfg.poison == carried.poison else \
        [f"data.train carries {carried.poison.attack_name} (its _info.json): poison.* set from it"]
    return carried, notes


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
