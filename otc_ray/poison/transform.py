"""The poisoning transform: clean shards in, poisoned shards plus a ground-truth manifest out.

    report = poison_shards("shards/train", "shards/train_bd", cfg.poison, cfg.data)                  # backdoor
    report = poison_shards("shards/train", "shards/train_tg", tcfg, cfg.data, target_source="shards/test")
    print("\\n".join(report.lines()))

One attack per call (`poison.attack` holds exactly one of backdoor, targeted); attacks compose by poisoning a
poisoned set again with the other kind (`otc_ray.pipelines.prepare` does so for `poison.attack` =
("backdoor", "targeted")), and the one manifest then holds every poisoned key.

Two streaming passes over the input, shard by shard, in this process (local or s3://; no Ray):
  1. scan (select.py): validate every sample (JSON meta, caption, image; classes.py) and keep a 64-bit keyed
     hash of each one eligible for the attack; targeted: pick the target images from the test shards and,
     with `caption_source=data`, real captions of the adversarial class from the training shards.
  2. rewrite (rewrite.py): input shard i becomes output shard i with the same samples in the same order.
     Chosen samples are rewritten; every other sample is copied as raw bytes (image, caption and JSON
     byte-identical, defective samples included); targeted copies are appended to shards chosen by hash.
Classes come from a classes file (`classes`, the CLI's `--classes`, `eval.classes` in a run) or else the input's
`_info.json` (`dataset` section); the output's `_info.json` carries them either way.
"""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field

from ..config import DataConfig, PoisonConfig
from ..data.class_info import DatasetInfo
from ..data.class_file import shard_set_classes
from ..data.decode import DecodeLimits
from ..data.shards import INFO_FILE, ShardSetError, commit_file, list_shards, read_info
from ..data.storage import display, resolve
from .manifest import MANIFEST_FILE, read_manifest, write_manifest
from .rewrite import rewrite, targeted_inserts
from .select import pick_targets, scan, scan_bases, select_backdoor
from .triggers import TriggerSpec, trigger_region_mask

__all__ = ["PoisonReport", "poison_shards", "prior_attacks"]


@dataclass
class PoisonReport:
    """What `poison_shards` did. Every reader row of the input is in exactly one of: passed (clean),
    passed_bad (defective but copied unchanged, by reason), poisoned, skipped (not written, by reason)."""

    out: str
    attack: str
    read: int = 0
    passed: int = 0
    poisoned: int = 0
    inserted: int = 0
    eligible: int = 0
    requested: int = 0
    passed_bad: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    num_shards: int = 0
    written: int = 0
    seconds: float = 0.0
    manifest: str = ""
    trigger: dict | None = None
    target: str = ""

    @property
    def samples_per_second(self) -> float:
        """Input samples processed per second, both passes included."""
        return self.read / max(self.seconds, 1e-9)

    def lines(self) -> list[str]:
        out = [f"poisoned set   {self.out} ({self.num_shards} shards, {self.written} samples)",
               f"attack         {self.attack} -> {self.target}"
               + (f"  trigger {json.dumps(self.trigger, sort_keys=True)}" if self.trigger else ""),
               f"read           {self.read}",
               f"passed         {self.passed} clean, {sum(self.passed_bad.values())} defective copied unchanged",
               f"poisoned       {self.poisoned} of {self.eligible} eligible (requested {self.requested})"
               if self.attack == "backdoor" else
               f"inserted       {self.inserted} (requested {self.requested}; targets from {self.eligible} eligible "
               "test images)"]
        out += [f"  passed bad   {k:<18} {v}" for k, v in sorted(self.passed_bad.items())]
        out += [f"  skipped      {k:<18} {v}" for k, v in sorted(self.skipped.items())]
        out += [f"manifest       {self.manifest}", f"throughput     {self.samples_per_second:.0f} samples/s"]
        return out


def _load_info(in_path: str, data_cfg: DataConfig, classes: str) -> tuple[dict, DatasetInfo]:
    """(the input's `_info.json` with its `dataset` section set to the classes used, the classes)."""
    info = shard_set_classes(in_path, classes, data_cfg.s3)
    return {**(read_info(in_path, data_cfg.s3) or {}), "dataset": info.to_dict()}, info


def prior_attacks(info: dict) -> list[dict]:
    """The attacks already applied to a shard set (its `_info.json` `poison` section and `poison_history`)."""
    return list(info.get("poison_history", [])) + ([info["poison"]] if "poison" in info else [])


def _one_attack(cfg: PoisonConfig) -> str:
    """The attack of this call: `poison.attack` must hold exactly one."""
    if not cfg.attack:
        raise ValueError("poison.attack is 'none'; choose backdoor or targeted")
    if len(cfg.attack) > 1:
        raise ValueError(f"poison.attack is {cfg.attack_name!r}: poisoning applies one attack at a time; poison the "
                         "poisoned set again with the other kind to compose them")
    return cfg.attack[0]


def _check_args(in_path: str, out_path: str, kind: str, cfg: PoisonConfig, data_cfg: DataConfig, info: DatasetInfo,
                target_source: str | None) -> None:
    done = [p.get("attack") for p in prior_attacks(read_info(in_path, data_cfg.s3) or {})]
    if kind in done:
        raise ValueError(f"{in_path} already carries a {kind} attack; attacks compose only across kinds "
                         "(one backdoor and one targeted), each recorded in the one manifest")
    in_root, out_root = resolve(in_path, data_cfg.s3)[1], resolve(out_path, data_cfg.s3)[1]
    if out_root == in_root or out_root.startswith(in_root.rstrip("/") + "/"):
        raise ValueError(f"output {out_path} is the input shard set {in_path} or inside it")
    info.label_of(cfg.target if kind == "backdoor" else cfg.adversarial)
    if kind == "backdoor":
        trigger_region_mask(TriggerSpec.from_config(cfg), data_cfg.image_size, data_cfg.image_size)
    elif not target_source:
        raise ValueError("the targeted attack needs target_source: the test shards to take target images from")
    elif cfg.targets > 1000 or cfg.per_target > 10000:
        raise ValueError(f"targeted keys tgtTTT-KKKK allow up to 1000 targets x 10000 copies, got "
                         f"{cfg.targets} x {cfg.per_target}")
    try:
        list_shards(out_path, "auto", data_cfg.s3)
    except ShardSetError:
        return
    raise ValueError(f"output {out_path} already holds shards; choose an empty folder or prefix")


def poison_shards(in_path: str, out_path: str, cfg: PoisonConfig, data_cfg: DataConfig,
                  target_source: str | None = None, progress: bool = True, classes: str = "") -> PoisonReport:
    """Poison the shard set at `in_path` into `out_path` (local or s3://; see the module docstring).

    classes: a classes file (local or s3://; otc_ray.data.class_file) for a set without a built-in `_info.json`.

    Writes `out_path/NNNNN.tar|.parquet` (one per input shard), `_poison_manifest.parquet` and `_info.json`
    (the input's plus a `poison` section). Raises ValueError for a bad request (no or two attacks, unknown
    class, too few eligible samples, non-empty output, ...) before writing anything.
    """
    start = time.perf_counter()
    kind = _one_attack(cfg)
    in_info, info = _load_info(in_path, data_cfg, classes)
    _check_args(in_path, out_path, kind, cfg, data_cfg, info, target_source)
    fs, files, fmt = list_shards(in_path, data_cfg.format, data_cfg.s3)
    out_fmt = fmt if cfg.out_format == "same" else cfg.out_format
    limits = DecodeLimits.from_config(data_cfg)
    spec = TriggerSpec.from_config(cfg) if kind == "backdoor" else None

    found = scan(files, fs, fmt, kind, cfg, info, limits, progress)
    inserts: list[dict] = []
    bases = None
    if kind == "backdoor":
        bases = scan_bases(found, cfg, info)
        ranked, requested, eligible = select_backdoor(found, cfg, bases)
        selected = {h: rank for rank, h in enumerate(ranked)}          # keyed hash -> place in the attack's order
    else:
        targets, eligible = pick_targets(target_source, cfg, data_cfg, info, limits)
        inserts = targeted_inserts(cfg, info, targets, found.data_captions, len(files), limits)
        clash = found.reserved & {i["key"] for i in inserts}
        if clash:
            raise ValueError(f"the input already holds keys of the form tgtTTT-KKKK ({sorted(clash)[:3]}); "
                             "targeted copies would collide")
        selected, requested = {}, cfg.targets * cfg.per_target

    report = PoisonReport(out=out_path, attack=kind, read=found.read, eligible=eligible, requested=requested,
                          num_shards=len(files), trigger=spec.to_dict() if spec else None,
                          target=cfg.target if kind == "backdoor" else cfg.adversarial)
    done = rewrite(files, fs, fmt, out_path, out_fmt, kind, cfg, data_cfg, info, spec, limits, selected, inserts,
                   report.read, progress, bases=bases, pool=found.data_captions)
    report.poisoned, report.inserted, report.written = done.poisoned, done.inserted, done.written
    report.skipped = dict(done.skipped)
    report.passed_bad = {r: n - done.not_copied[r] for r, n in found.decode_bad.items() if n > done.not_copied[r]}
    report.passed = (report.read - report.poisoned - sum(report.skipped.values())
                     - sum(report.passed_bad.values()))
    manifest = done.manifest
    out_fs, out_root = resolve(out_path, data_cfg.s3)
    if prior_attacks(in_info):                       # composed attacks: one manifest holds every poisoned key
        ext = {"wds": ".tar", "parquet": ".parquet"}[out_fmt]
        prior = [{**r, "shard": posixpath.splitext(r["shard"])[0] + ext}
                 for r in read_manifest(in_path, data_cfg.s3).to_pylist()]
        manifest = prior + manifest
    write_manifest(out_fs, posixpath.join(out_root, MANIFEST_FILE), manifest)
    report.manifest = display(out_fs, posixpath.join(out_root, MANIFEST_FILE))
    _write_info(out_fs, out_root, in_info, in_path, kind, cfg, report, target_source, out_fmt,
                sorted(info.classes[b] for b in bases) if bases is not None else None)
    report.seconds = time.perf_counter() - start
    return report


def _write_info(fs, root: str, in_info: dict, in_path: str, kind: str, cfg: PoisonConfig, report: PoisonReport,
                target_source: str | None, out_fmt: str, bases: list[str] | None = None) -> None:
    """The input's `_info.json` with num_samples / format updated and a `poison` section added (`bases`: the
    backdoor's base classes, None = any but the target)."""
    count = report.poisoned + report.inserted
    poison = {"attack": kind, "source": in_path, "manifest": MANIFEST_FILE, "seed": cfg.seed,
              "count": count, "requested_count": report.requested, "rate": cfg.rate, "eligible": report.eligible,
              "poison_fraction": count / max(report.written, 1), "target": report.target,
              "target_label": DatasetInfo.from_dict(in_info["dataset"]).label_of(report.target)}
    if kind == "backdoor":
        poison.update(trigger=report.trigger, label_consistent=cfg.label_consistent, caption_source=cfg.caption_source,
                      base_classes=bases)
    else:
        poison.update(targets=cfg.targets, per_target=cfg.per_target, caption_source=cfg.caption_source,
                      target_source=target_source, copy_augment=cfg.copy_augment)
    info = {**in_info, "num_samples": report.written, "format": out_fmt, "poison": poison}
    if "poison" in in_info:
        info["poison_history"] = prior_attacks(in_info)
    commit_file(fs, posixpath.join(root, INFO_FILE), json.dumps(info, indent=2, sort_keys=True).encode())
