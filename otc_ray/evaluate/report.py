"""One evaluation of a model on a held-out shard set: every metric of METHOD.md, as one flat dict.

    metrics = evaluate_model(encoder, "shards/test", cfg.data, cfg.poison, cfg.eval,
                             manifest_path="shards/train_bd", train_path="shards/train")
    print(format_metrics(metrics))

Keys (rates in [0, 1], NaN when undefined; `*_count` are sample counts):
    zeroshot_top1, zeroshot_top5            labeled test rows, the set's classes and zero-shot templates
    linear_probe_acc, linear_probe_train_acc, linear_probe_train_count
                                            probe fitted on `train_path` rows (up to eval.linear_probe_train)
    linear_probe_split_acc, linear_probe_split_train_acc, linear_probe_split_train_count
                                            no `train_path`: fitted on half of the test rows (by key hash),
                                            scored on the other half
    backdoor_asr, backdoor_asr_count        the trigger of the manifest (else of the config) on non-target rows
    targeted_asr, targeted_asr_count        the manifest's target images (targeted attacks only)
    retrieval_{i2t,t2i}_r{1,5}              image <-> caption on all good test rows (identical captions grouped)
    eval_count, eval_labeled_count          good test rows used (up to eval.num_eval), with a known class
Rows are loaded through Ray Data (`load_samples`), bad rows dropped, and the `num_eval` rows with the
smallest keys kept, so the evaluated subset does not depend on read order.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DataConfig, EvalConfig, PoisonConfig
from ..data import schema as S
from ..data.builtin import DatasetInfo
from ..data.decode import DecodeLimits, decode_image, good_rows
from ..data.ray_io import load_samples
from ..data.shards import read_info
from ..poison.manifest import read_manifest
from ..poison.transform import keyed_hash
from ..poison.triggers import TriggerSpec
from .asr import evaluate_backdoor, evaluate_targeted
from .encoder import Encoder, encode_images, encode_texts
from .linear_probe import linear_probe_metrics
from .retrieval import retrieval_metrics
from .zeroshot import build_zeroshot_classifier, zeroshot_metrics


# ----------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class EvalSet:
    """Good rows of a shard set, sorted by key. keys (N,) str; images (N, S, S, 3) uint8; captions N str;
    labels (N,) int64 (-1 unknown)."""

    keys: np.ndarray
    images: np.ndarray
    captions: list[str]
    labels: np.ndarray

    def subset(self, mask: np.ndarray) -> "EvalSet":
        return EvalSet(self.keys[mask], self.images[mask], [c for c, m in zip(self.captions, mask) if m],
                       self.labels[mask])


_COLUMNS = (S.KEY, S.IMAGE, S.CAPTION, S.LABEL)


def _smallest_keys(parts: list[dict], limit: int) -> dict:
    """Concatenate column batches and keep the `limit` rows with the smallest keys, sorted by key."""
    cat = {c: np.concatenate([p[c] for p in parts]) for c in _COLUMNS}
    order = np.argsort(cat[S.KEY].astype(str), kind="stable")[:limit]
    return {c: v[order] for c, v in cat.items()}


def load_eval_set(path: str, data_cfg: DataConfig, limit: int) -> EvalSet:
    """The `limit` good rows with the smallest keys of the shard set at `path` (one streaming Ray Data pass;
    memory bounded by about 2 x limit decoded images)."""
    ds = load_samples(path, data_cfg).map_batches(good_rows, batch_format="numpy").select_columns(list(_COLUMNS))
    kept: list[dict] = []
    held = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=1024):
        kept.append({c: np.asarray(batch[c]) for c in _COLUMNS})
        held += len(batch[S.KEY])
        if held > 2 * limit:
            kept = [_smallest_keys(kept, limit)]
            held = len(kept[0][S.KEY])
    if not held:
        raise ValueError(f"{path} holds no good samples to evaluate on")
    rows = _smallest_keys(kept, limit)
    return EvalSet(rows[S.KEY].astype(str), rows[S.IMAGE].astype(np.uint8), [str(c) for c in rows[S.CAPTION]],
                   rows[S.LABEL].astype(np.int64))


def shard_set_classes(path: str, data_cfg: DataConfig) -> DatasetInfo:
    """Class names and templates of a shard set, from its `_info.json`."""
    info = read_info(path, data_cfg.s3)
    if not info or "dataset" not in info:
        raise ValueError(f"{path} has no _info.json with a 'dataset' section; evaluation needs its class names")
    return DatasetInfo.from_dict(info["dataset"])


# ----------------------------------------------------------------------------------------- attack
@dataclass(frozen=True)
class AttackTruth:
    """What the ASRs are measured against. spec/target: the backdoor trigger and target class name;
    source: "manifest" or "config"; target_images (T, S, S, 3) uint8 and adversarial class names (T,) of a
    targeted manifest (None otherwise)."""

    spec: TriggerSpec
    target: str
    source: str
    target_images: np.ndarray | None = None
    adversarial: tuple[str, ...] = ()


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
        d = json.loads(specs.pop())
        spec = TriggerSpec(**{**d, "color": tuple(d.get("color", (255, 255, 0)))})
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


# ----------------------------------------------------------------------------------------- metrics
def _split_mask(keys: np.ndarray) -> np.ndarray:
    """bool (N,): the probe-training half of a test set (keyed hash of each key, seed 0)."""
    return np.fromiter((keyed_hash(str(k), 0, b"probe-split") % 2 == 0 for k in keys), dtype=bool, count=len(keys))


def _linear_probe(encoder: Encoder, test_emb, test: EvalSet, num_classes: int, eval_cfg: EvalConfig,
                  train: EvalSet | None) -> dict[str, float]:
    if eval_cfg.linear_probe_train == 0:
        return {}
    if train is not None:
        out = linear_probe_metrics(encode_images(encoder, train.images, eval_cfg.batch_size), train.labels,
                                   test_emb, test.labels, num_classes, eval_cfg.linear_probe_c)
        return {**out, "linear_probe_train_count": float(len(train.keys))}
    fit = _split_mask(test.keys)
    if fit.all() or not fit.any():
        return {}
    mask = torch.from_numpy(fit)
    out = linear_probe_metrics(test_emb[mask], test.labels[fit], test_emb[~mask], test.labels[~fit], num_classes,
                               eval_cfg.linear_probe_c)
    return {"linear_probe_split_acc": out["linear_probe_acc"],
            "linear_probe_split_train_acc": out["linear_probe_train_acc"],
            "linear_probe_split_train_count": float(fit.sum())}


def evaluate_arrays(encoder: Encoder, test: EvalSet, info: DatasetInfo, attack: AttackTruth, eval_cfg: EvalConfig,
                    linear_probe: bool = True, train: EvalSet | None = None) -> dict[str, float]:
    """Every metric of `encoder` on an in-memory test set (keys as in the module docstring).

    linear_probe: fit the probe (on `train` when given, else on half of the test rows); the trainer's
    per-epoch evaluation skips it and runs it once on the final model.
    """
    bs, num_classes = eval_cfg.batch_size, len(info.classes)
    image_emb = encode_images(encoder, test.images, bs)
    metrics: dict[str, float] = {"eval_count": float(len(test.keys))}
    metrics.update(retrieval_metrics(image_emb, encode_texts(encoder, test.captions, bs), groups=test.captions))
    labeled = (test.labels >= 0) & (test.labels < num_classes)
    metrics["eval_labeled_count"] = float(labeled.sum())
    if not labeled.any():
        return metrics
    lab, lab_emb = test.subset(labeled), image_emb[torch.from_numpy(labeled)]
    weights = build_zeroshot_classifier(encoder, info.classes, info.zeroshot_templates, bs)
    metrics.update(zeroshot_metrics(lab_emb, lab.labels, weights))
    if linear_probe:
        metrics.update(_linear_probe(encoder, lab_emb, lab, num_classes, eval_cfg, train))
    seeds = np.array([keyed_hash(str(k), 0, b"eval-trigger") >> 1 for k in lab.keys], dtype=np.int64)
    metrics.update(evaluate_backdoor(encoder, lab.images, lab.labels, weights, info.label_of(attack.target),
                                     attack.spec, rng_seed=seeds, batch_size=bs))
    if attack.target_images is not None:
        adversarial = np.array([info.label_of(a) for a in attack.adversarial], dtype=np.int64)
        metrics.update(evaluate_targeted(encoder, attack.target_images, adversarial, weights, bs))
    return metrics


def evaluate_model(encoder: Encoder, test_path: str, data_cfg: DataConfig, poison_cfg: PoisonConfig,
                   eval_cfg: EvalConfig, manifest_path: str | None = None,
                   train_path: str | None = None) -> dict[str, float]:
    """Every metric of `encoder` on the test shards at `test_path` (see the module docstring for the keys).

    manifest_path: a poisoned set's folder or `_poison_manifest.parquet` (trigger, target, target images);
    train_path: shards to fit the linear probe on (else half of the test set). Needs Ray (Ray Data reads).
    """
    info = shard_set_classes(test_path, data_cfg)
    attack = resolve_attack(manifest_path, poison_cfg, data_cfg)
    test = load_eval_set(test_path, data_cfg, eval_cfg.num_eval)
    train = None
    if train_path and eval_cfg.linear_probe_train > 0:
        train = load_eval_set(train_path, data_cfg, eval_cfg.linear_probe_train)
        train = train.subset((train.labels >= 0) & (train.labels < len(info.classes)))
        if not len(train.keys):
            raise ValueError(f"linear probe: {train_path} holds no samples with a known class")
    return evaluate_arrays(encoder, test, info, attack, eval_cfg, linear_probe=True, train=train)


def format_metrics(metrics: dict[str, float]) -> str:
    """Two aligned columns, one metric a line: counts as integers, rates with 4 decimals, NaN as 'nan'."""
    width = max((len(k) for k in metrics), default=0)

    def fmt(k: str, v: float) -> str:
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        return f"{int(v)}" if k.endswith("_count") else f"{v:.4f}"

    return "\n".join(f"{k:<{width}}  {fmt(k, v):>10}" for k, v in metrics.items())
