"""Evaluation of a model on a held-out shard set: the driver-side reads that feed `evaluate.report`'s metrics.

    metrics = evaluate_model(encoder, "shards/test", cfg.data, cfg.poison, cfg.eval,
                             manifest_path="shards/train_bd", train_path="shards/train")
    print(format_metrics(metrics))                            # otc_ray.evaluate.report

The metrics (`otc_ray.evaluate`) take arrays; this module reads the shards and the poison manifest into them:
`load_eval_set` (good rows through Ray Data, the `limit` smallest keys, so the evaluated subset does not depend
on read order, labelled from each row's metadata against the classes), `shard_set_classes` (class names and
templates from `eval.classes` or `_info.json`) and `resolve_attack` (the trigger, target and target images the ASRs
are measured against).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from ..config import DataConfig, EvalConfig, PoisonConfig
from ..data import schema
from ..data.class_info import DatasetInfo
from ..data.class_file import meta_label, shard_set_classes
from ..data.decode import DecodeLimits, decode_image, decode_meta, good_rows
from ..data.ray_io import decoded_batches, load_samples, read_in_driver
from ..evaluate.encoder import Encoder
from ..evaluate.report import AttackTruth, EvalSet, evaluate_arrays
from ..poison.manifest import read_manifest
from ..poison.triggers import TriggerSpec

_COLUMNS = (schema.KEY, schema.IMAGE, schema.CAPTION, schema.META)


def _smallest_keys(parts: list[dict], limit: int) -> dict:
    """Concatenate column batches and keep the `limit` rows with the smallest keys, sorted by key."""
    cat = {c: np.concatenate([p[c] for p in parts]) for c in _COLUMNS}
    order = np.argsort(cat[schema.KEY].astype(str), kind="stable")[:limit]
    return {c: v[order] for c, v in cat.items()}


def _labels(path: str, metas: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """(N,) int64 class indices of rows from their JSON metadata (`meta_label`; -1 = none named)."""
    out = np.full(len(metas), -1, np.int64)
    for i, raw in enumerate(metas):
        try:
            out[i] = meta_label(decode_meta(raw)[0], classes)
        except ValueError as e:
            raise ValueError(f"{path}: a test sample's {e}; are these the classes (eval.classes) of this set?") \
                from None
    return out


def load_eval_set(path: str, data_cfg: DataConfig, limit: int, classes: tuple[str, ...]) -> EvalSet:
    """The `limit` good rows with the smallest keys of the shard set at `path` (one streaming pass: Ray Data's, or
    this process's for a small set, `data.driver_read_mb`; memory bounded by about 2 x limit decoded images),
    labelled from their metadata's `label` (an index or a name of `classes`) or `class` name; ValueError for a
    label the classes do not hold."""
    if read_in_driver(path, data_cfg):
        batches = (good_rows(b) for b in decoded_batches(path, data_cfg))
    else:
        ds = load_samples(path, data_cfg).map_batches(good_rows, batch_format="numpy").select_columns(list(_COLUMNS))
        batches = ds.iter_batches(batch_format="numpy", batch_size=1024)
    kept: list[dict] = []
    held = 0
    for batch in batches:
        kept.append({c: np.asarray(batch[c]) for c in _COLUMNS})
        held += len(batch[schema.KEY])
        if held > 2 * limit:
            kept = [_smallest_keys(kept, limit)]
            held = len(kept[0][schema.KEY])
    if not held:
        raise ValueError(f"{path} holds no good samples to evaluate on")
    rows = _smallest_keys(kept, limit)
    return EvalSet(rows[schema.KEY].astype(str), rows[schema.IMAGE].astype(np.uint8), [str(c) for c in rows[schema.CAPTION]],
                   _labels(path, rows[schema.META], classes))


def base_rate_targets(test_path: str, poison_cfg: PoisonConfig, data_cfg: DataConfig,
                      info: DatasetInfo) -> tuple[np.ndarray, tuple[str, ...]]:
    """The target images (T, S, S, 3) uint8 and adversarial classes (T,) that a targeted attack with `poison_cfg`
    would take from the test shards (`poison.select.pick_targets`, the same keyed choice), for a clean run."""
    from ..poison.select import pick_targets

    limits = DecodeLimits.from_config(data_cfg)
    chosen, _ = pick_targets(test_path, poison_cfg, data_cfg, info, limits)
    images = [decode_image(c["image"], limits)[0] for c in chosen]
    return np.stack(images), (poison_cfg.adversarial,) * len(images)


def resolve_attack(manifest_path: str | None, poison_cfg: PoisonConfig, data_cfg: DataConfig) -> AttackTruth:
    """The backdoor trigger and target from the manifest's backdoor rows (else the config), and the targeted
    attack's target images (decoded from the manifest's `image_bytes`, one per source key)."""
    spec, target, source = TriggerSpec.from_config(poison_cfg), poison_cfg.target, "config"
    if manifest_path is None:
        return AttackTruth(spec, target, source)
    rows = read_manifest(manifest_path, data_cfg.s3).to_pydict()
    backdoor = [i for i, a in enumerate(rows["attack"]) if a == "backdoor"]
    if backdoor:
        specs = {rows["trigger"][i] for i in backdoor}
        targets = {rows["target_class"][i] for i in backdoor}
        if len(specs) > 1 or len(targets) > 1:
            raise ValueError(f"manifest {manifest_path} mixes {len(specs)} triggers and {len(targets)} targets")
        spec = TriggerSpec.from_dict(json.loads(specs.pop()))
        target, source = targets.pop(), "manifest"
    limits = DecodeLimits.from_config(data_cfg)
    images, adversarial, seen = [], [], set()
    for i, attack in enumerate(rows["attack"]):
        if attack != "targeted" or rows["source_key"][i] in seen:
            continue
        seen.add(rows["source_key"][i])
        image, err = decode_image(rows["image_bytes"][i], limits)
        if err:
            raise ValueError(f"manifest {manifest_path}: target image {rows['source_key'][i]} does not decode ({err})")
        images.append(image)
        adversarial.append(rows["target_class"][i])
    return AttackTruth(spec, target, source, np.stack(images) if images else None, tuple(adversarial))


def eval_inputs(test_path: str, manifest_path: str | None, data_cfg: DataConfig, poison_cfg: PoisonConfig,
                eval_cfg: EvalConfig) -> tuple[EvalSet, DatasetInfo, AttackTruth]:
    """(test rows, classes, attack truth): everything `evaluate_arrays` needs besides the encoder (the cheap
    reads first, so a shard set without classes or a bad manifest fails before the Ray Data pass). The classes
    are `eval.classes`' when set, else the test set's `_info.json`'s."""
    info = shard_set_classes(test_path, eval_cfg.classes, data_cfg.s3)
    attack = resolve_attack(manifest_path, poison_cfg, data_cfg)
    if attack.target_images is None and eval_cfg.targeted_base_rate and poison_cfg.targets > 0:
        images, adversarial = base_rate_targets(test_path, poison_cfg, data_cfg, info)
        attack = dataclasses.replace(attack, target_images=images, adversarial=adversarial, source="base rate")
    return load_eval_set(test_path, data_cfg, eval_cfg.num_eval, info.classes), info, attack


def evaluate_model(encoder: Encoder, test_path: str, data_cfg: DataConfig, poison_cfg: PoisonConfig,
                   eval_cfg: EvalConfig, manifest_path: str | None = None,
                   train_path: str | None = None) -> dict[str, float]:
    """Every metric of `encoder` on the test shards at `test_path` (keys: see otc_ray.evaluate.report).

    manifest_path: a poisoned set's folder or `_poison_manifest.parquet` (trigger, target, target images);
    train_path: shards to fit the linear probe on (else half of the test set). Needs Ray for a set larger than
    `data.driver_read_mb` (Ray Data reads it).
    """
    test, info, attack = eval_inputs(test_path, manifest_path, data_cfg, poison_cfg, eval_cfg)
    train = None
    if train_path and eval_cfg.linear_probe_train > 0:
        train = load_eval_set(train_path, data_cfg, eval_cfg.linear_probe_train, info.classes)
        train = train.subset((train.labels >= 0) & (train.labels < len(info.classes)))
        if not len(train.keys):
            raise ValueError(f"linear probe: {train_path} holds no samples with a known class")
    return evaluate_arrays(encoder, test, info, attack, eval_cfg, linear_probe=True, train=train)
