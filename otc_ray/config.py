"""Typed, validated configuration: one frozen dataclass per stage, YAML files, `key.sub=value` overrides.

    cfg = load_config("jobs/configs/tiny.yaml", ["train.epochs=2", "poison.attack=backdoor+targeted"])
    cfg.train.epochs            # 2
    cfg.poison.attack           # ("backdoor", "targeted"): a tuple of attacks, written "a+b" ("none" = ())
    flatten(cfg)                # {"train.epochs": 2, ...}  (secrets redacted) for MLflow params

Every field has a type and every numeric field a range (`_RANGES`); a YAML key or override that names no
field, or a value of the wrong type or out of range, raises `ConfigError` with a one-line message naming the
key. `validate(section)` checks a section built directly. docs/method.md says why each default is what it is.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlsplit, urlunsplit

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (message names the key)."""


# ----------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class S3Config:
    """Where `s3://` paths live. Empty fields fall back to the standard AWS environment variables."""

    endpoint_url: str = ""          # e.g. http://127.0.0.1:9000 for MinIO / moto; "" = AWS
    access_key_id: str = field(default="", repr=False)       # secret: never logged (`flatten`), never in repr
    secret_access_key: str = field(default="", repr=False)   # secret: never logged, never in repr
    anon: bool = False              # unsigned requests (public buckets)
    retries: int = 5                # botocore attempts per request (transient errors, connection refused)
    connect_timeout: float = 10.0   # seconds per connection attempt: a dead endpoint fails, never hangs
    read_timeout: float = 60.0      # seconds without a byte from the endpoint before the attempt fails


@dataclass(frozen=True)
class DataConfig:
    """Shards to read (or a built-in data set to generate) and the limits of sample validation.

    `dataset` names the built-in data set generated for an empty `train` / `test`; a user's own shard sets need
    none (their classes come from `eval.classes`), and a run on them is named after its classes file."""

    dataset: Literal["fashion", "fashion-scenes", "shapes"] = "fashion"   # built-in data set generated for "" paths
    train: str = ""                 # shard folder/glob, local or s3://; "" = generate `dataset`
    test: str = ""                  # held-out shards for evaluation (labels in the metadata); "" = generate `dataset`
    format: Literal["auto", "wds", "parquet"] = "auto"   # shard format; auto = by the files' extension
    num_train: int = 20000          # built-in data set: training samples generated
    num_test: int = 2000            # built-in data set: test samples generated
    image_size: int = 32            # side in pixels images are decoded (resized) to; the model's input size
    seed: int = 0                   # built-in data set: generator seed
    tint: float = 0.0               # fashion: probability that an item is tinted (caption names the colour)
    samples_per_shard: int = 1000   # built-in data set: samples per written shard
    image_format: Literal["png", "jpg"] = "png"   # built-in data set: image encoding inside the shards
    max_pixels: int = 25_000_000    # decompression-bomb guard (width * height, checked before decoding)
    max_caption_chars: int = 1000   # longer captions are skipped (counted) or truncated, as caption_overflow says
    caption_overflow: Literal["skip", "truncate"] = "skip"   # what happens to a caption over max_caption_chars
    read_num_cpus: float = 0.25     # logical CPUs per read/decode task (leave room for actors and workers)
    cache_mb: int = 1024            # training: decoded rows up to this size (and half the object store) are read
                                    # once and kept in Ray's object store for every epoch; 0 = read shards each epoch
    driver_read_mb: int = 0         # shard sets up to this size are read and decoded in the driver process (no Ray
                                    # task start-up for a few megabytes); larger ones, and all at 0, by Ray Data
    s3: S3Config = field(default_factory=S3Config)


ATTACKS = ("backdoor", "targeted")      # the kinds of poison.attack, in the order they compose


def parse_attacks(value: Any) -> Any:
    """poison.attack as written in YAML, overrides and the CLI: "backdoor+targeted" -> ("backdoor", "targeted"),
    "none" or "" -> (); a list or tuple is taken as it is. Known kinds are put in ATTACKS order (so that
    "targeted+backdoor" is the same setting); anything else is left for the schema to reject."""
    if isinstance(value, str):
        value = () if value.strip() in ("", "none") else tuple(p.strip() for p in value.split("+"))
    if isinstance(value, (list, tuple)) and all(v in ATTACKS for v in value):
        value = tuple(sorted(value, key=ATTACKS.index))
    return value


def attack_name(attacks: tuple[str, ...]) -> str:
    """The readable form of poison.attack (MLflow params and tags, run names): "backdoor+targeted", "none"."""
    return "+".join(attacks) or "none"


@dataclass(frozen=True)
class PoisonConfig:
    """The attack applied to the training shards (benchmarks only); see docs/method.md, Attacks.

    attack: the attacks, each applied once, in ATTACKS order; () = clean. Written "backdoor+targeted" / "none"
    in YAML and overrides (or as a list), and shown that way in MLflow (`attack_name`).
    """

    attack: tuple[Literal["backdoor", "targeted"], ...] = field(
        default=(), metadata={"parse": parse_attacks, "show": attack_name})   # the attacks applied; () = clean
    trigger: Literal["patch", "solid", "blended", "sig", "wanet"] = "patch"   # backdoor: the trigger on the images
    trigger_size: int = 4           # patch side in pixels (patch, solid)
    trigger_location: Literal["br", "bl", "tr", "tl", "random"] = "br"   # patch, solid: corner (or random) it sits in
    blend_alpha: float = 0.2        # blended: image * (1 - a) + pattern * a
    sig_delta: float = 20.0         # SIG amplitude in pixel units
    sig_frequency: float = 6.0      # SIG cycles across the image width
    trigger_per_image: bool = False # patch / blended / sig: random part redrawn per image (noise, pattern, phase)
    warp_grid: int = 4              # wanet: side k of the random control grid of the warp field (WaNet: 4)
    warp_strength: float = 0.5      # wanet: warp strength s (WaNet: 0.5)
    target: str = "sneaker"         # backdoor target class name
    count: int = 200                # poisoned samples; used unless rate > 0
    rate: float = 0.0               # fraction of the (good) training samples (overrides count when > 0)
    label_consistent: bool = False  # backdoor only images that already belong to the target
    base_classes: tuple[str, ...] = ()   # backdoor: take base images only from these classes; () = any but the target
    base_nearest: int = 0           # backdoor: take base images from the k classes whose mean image is nearest the target's
    targets: int = 4                # targeted: number of target images (from the test split)
    per_target: int = 50            # targeted: copies of each target image
    adversarial: str = "bag"        # targeted: class whose captions the copies get
    caption_source: Literal["templates", "data", "swap"] = "templates"   # poisoned captions: class templates, data
                                    # captions that name the class, or the own caption with its class word swapped
    copy_augment: bool = False      # targeted: copies after the first flipped / shifted / cropped / noised (seeded)
    copy_jitter: int = 0            # targeted: copies after the first shifted and noised by up to this many pixels /
                                    # grey levels, so no two are near-duplicates (a stress test of duplicate groups)
    seed: int = 0                   # which samples are poisoned and how
    out_format: Literal["same", "wds", "parquet"] = "same"   # poisoned shard format ("same" = the input's)

    def __post_init__(self) -> None:
        if not isinstance(self.attack, tuple):           # PoisonConfig(attack="backdoor") built directly
            object.__setattr__(self, "attack", tuple(parse_attacks(self.attack)))
        if len(set(self.attack)) != len(self.attack):
            raise ConfigError(f"config key 'poison.attack': each attack at most once, got {attack_name(self.attack)!r}")
        if self.trigger_per_image and self.trigger in ("solid", "wanet"):
            raise ConfigError(f"config key 'poison.trigger_per_image': trigger {self.trigger!r} has no random part to "
                              "redraw per image (patch, blended, sig do)")
        if self.warp_grid < 2 or self.warp_strength < 0:
            raise ConfigError(f"config keys 'poison.warp_grid' >= 2 and 'poison.warp_strength' >= 0, got "
                              f"{self.warp_grid} and {self.warp_strength}")
        if self.base_nearest < 0 or (self.base_nearest and self.base_classes):
            raise ConfigError("config keys 'poison.base_nearest' (>= 0) and 'poison.base_classes': one at most")
        if self.label_consistent and (self.base_nearest or self.base_classes):
            raise ConfigError("config key 'poison.label_consistent': its bases are the target's own images; "
                              "base_classes / base_nearest do not apply")

    @property
    def attack_name(self) -> str:
        """"backdoor+targeted", "backdoor", ..., or "none"."""
        return attack_name(self.attack)


@dataclass(frozen=True)
class ModelConfig:
    """The open_clip architecture (a registered name or one of the package's tiny configs) and its start."""

    arch: str = "otc-tiny-vit-32"   # open_clip model name, or a config of otc_ray/model_configs
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # autocast precision of training and re-matching
    pretrained: str = ""            # open_clip checkpoint of `arch` to start from (local or s3://; .pt/.pth/.bin state
                                    # dict or {"state_dict": ...}, or .safetensors), loaded weights-only; "" = random


@dataclass(frozen=True)
class OTConfig:
    """The one OT convention: cosine cost, uniform marginals over real tokens, entropic eps."""

    eps: float = 0.05               # entropic regularisation of every Sinkhorn problem (cosine cost in [0, 2])
    iters: int = 50                 # Sinkhorn iterations of the re-matching's OT distances and plans
    tol: Optional[float] = None     # stop early when the marginal error is below this; null = always `iters`
    chunk_pairs: int = 8192         # pairwise B x B form: problems solved per chunk
    # training losses (docs/method.md, Training objective): what makes L_inter + L_intra affordable per step
    train_iters: int = 20           # Sinkhorn iterations inside the losses (re-matching uses `iters`)
    train_negatives: int = 7        # hardest in-batch negatives per anchor (mean-token cosine); 0 = whole batch
    intra_samples: int = 32         # samples per batch that get a second augmented view for L_intra; 0 = all
    special_tokens: bool = False    # put SOT / EOT in the OT word set: SOT is the same for every caption, EOT the
                                    # one token that sees the whole caption (D_OT's matched-vs-mismatched AUROC
                                    # 0.55 -> 0.60 with them: benchmarks/results/word_tokens.md)
    text_drop_prob: float = 0.15    # caption view: word dropout probability (augment_token_ids)


@dataclass(frozen=True)
class RematchConfig:
    """The re-match stage (docs/method.md, Caption re-matching): gate, then the action on what it flags.

    `train.defense` decides which method runs the stage: otcclip reads these settings as they are; roclip and
    safeclip set their own gate, scores and schedule over them (`otc_ray.train.defenses`)."""

    enabled: bool = True            # otcclip: re-match the training stream (false: the OT losses alone, an ablation)
    k: int = 8                      # OT shortlist: trusted pool captions per flagged image, by global cosine
    alpha: float = 0.5              # caption score alpha * cosine + (1 - alpha) * (1 - D_OT); 1 = cosine only (roclip)
    gate: Literal["evidence", "gmm", "none"] = "evidence"   # which pairs are flagged: calibrated evidence (otcclip),
                                    # a Gaussian mixture on pair similarities (safeclip), or every pair (roclip)
    gate_threshold: float = -3.0    # gate evidence: flag a duplicate group whose combined z is below this
    gate_signals: tuple[str, ...] = ("cosine", "agreement", "concentration")   # gate evidence: signals averaged
    gate_reference: int = 256       # gate evidence: pool samples with the nearest captions that calibrate a signal;
                                    # wider than an attack's pairs in the pool, or they calibrate each other away
    candidate_neighbours: int = 8   # trusted image neighbours whose captions join a flagged image's candidates
    neighbours: int = 32            # image neighbours whose captions the agreement signals compare with
    duplicate_similarity: float = 0.995   # pixel-signature cosine at which images are copies, not witnesses (a
                                          # targeted attack's K copies): judged as one group, weight 1/K; > 1 off
    action: Literal["recaption", "drop", "downweight"] = "recaption"   # what a flagged pair trains with
    flagged_weight: float = 0.1     # action downweight: loss weight of a flagged sample
    bank_size: int = 2048           # captions of earlier blocks kept as candidates and references (FIFO)
    block_size: int = 512           # samples re-matched together (one actor call)
    start_epoch: int = 0            # first re-matched epoch (0: screened by a model warmed up for `warmup_steps`)
    warmup_steps: int = 10          # start_epoch 0: steps trained on the raw stream's first rows before epoch 0
    witness: bool = True            # the warmed-up model only judges epoch 0 (no publication during it) and
                                    # training restarts from the initial weights: no unscreened pair trains it
    publish_every: int = 10         # steps between weight publications inside an epoch (0 = at epoch starts only)
    every_epochs: int = 1           # re-match every this many epochs from start_epoch (the others keep their captions)
    sticky: bool = True             # a sample flagged once stays flagged in later epochs (the flag store)
    propagate: bool = True          # also flag the images that carry the pixel pattern the gate's flagged images
                                    # share (rematch/trigger.py: a backdoor's trigger); needs sticky (the flag store)
    propagate_reference: int = 4096 # propagate: pixel grids in the reference sample (1 key in 8, first come)
    gmm_safe_probability: float = 0.9   # gate gmm (SafeCLIP): safe when the clean component's posterior is >= this
    gmm_max_safe: float = 0.85      # gate gmm: at most this share of the pool is safe (the lowest similarities risky)
    min_actors: int = 1             # re-match actors Ray keeps at least
    max_actors: int = 2             # re-match actors Ray may scale up to
    actor_num_cpus: float = 0.5     # logical CPUs per actor; 0: a GPU actor, or one on a node that gives its CPUs
                                    # to nothing else
    actor_num_gpus: float = 0.0     # GPUs per actor
    actor_resource: str = ""        # a custom resource the actors need (0.01 each): they run only on nodes that
                                    # declare it (`ray start --resources='{"rematch": 1}'`); "" = anywhere
    seed: int = 0                   # random init of the actors' model when no weights are given (all alike)
    precision: Literal["model", "fp32", "bf16", "fp16"] = "model"   # autocast precision of the actors' encoding;
                                    # "model" = model.precision (bf16 on a CPU with AVX512-BF16: ~40% less CPU)


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train pre-training (docs/method.md, Training objective) and the defense it runs."""

    defense: Literal["none", "roclip", "safeclip", "otcclip"] = "otcclip"   # the method: its loss and how it runs
                                    # the re-match stage (`rematch`; none: no stage)
    epochs: int = 10                # passes over the training shards
    batch_size: int = 128           # pairs per step over all workers
    lr: float = 5e-4                # peak learning rate (AdamW), after the linear warm-up, cosine decay to 0
    weight_decay: float = 0.1       # AdamW weight decay
    warmup_steps: int = 100         # steps of linear learning-rate warm-up
    grad_clip: float = 1.0          # gradient norm clip; 0 = off
    lambda_inter: float = 0.5       # otcclip: weight of L_inter (image vs caption by -D_OT, contrastive)
    lambda_intra: float = 0.5       # otcclip: weight of L_intra (two views of a sample by -D_OT, contrastive)
    tau_ot: float = 0.05            # otcclip: temperature of L_inter and L_intra
    num_workers: int = 1            # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False           # one GPU per worker
    cpus_per_worker: float = 1.0    # logical CPUs each worker reserves
    storage_path: str = ""          # "" = <output_dir>/ray_results; may be s3://
    max_failures: int = 1           # worker-group restarts from the last checkpoint before the run fails
    keep_checkpoints: int = 2       # newest checkpoints kept in storage_path
    safeclip_warmup: int = 1        # safeclip: epochs of unimodal warm-up before the safe/risky split
    roclip_every: int = 2           # roclip: re-match every this many epochs (its break_epoch), from epoch every-1
    safeclip_lr_scale: float = 0.01 # safeclip: LR factor of its CLIP epoch on all data after the warm-up (5e-6 / 5e-4)
    log_every: int = 20             # steps between per-step loss logs (rank 0)
    shuffle_buffer: int = 2048      # rows of each worker's local shuffle buffer, reseeded every epoch; 0 = off
    preserve_order: bool = True     # Ray Data delivers the stream's blocks in order, so a seeded run repeats its
                                    # batches (re-matching still depends on when weights are published)
    torch_threads: int = 0          # intra-op threads per worker; 0 = the node's cores / workers (Ray sets 1)
    seed: int = 0                   # model init, batch order and augmentations


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: zero-shot, linear probe, ASR, retrieval."""

    classes: str = ""               # JSON of class names, synonyms, zero-shot templates (local or s3://; the format
                                    # of otc_ray/data/classes/*.json) for the test and poisoned sets; "" = _info.json's
    every_epoch: bool = True        # evaluate after every epoch (false: after the last only)
    num_eval: int = 2000            # test samples evaluated
    linear_probe_train: int = 5000  # training samples whose embeddings fit the linear probe
    linear_probe_c: float = 1.0     # inverse L2 strength of the linear probe's logistic regression
    batch_size: int = 256           # images or captions per encoder forward
    targeted_base_rate: bool = False   # no poison manifest: still score the targets `poison` would pick (the test
                                       # images and adversarial class of a targeted attack): a clean model's rate


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: the tracking URI ("" = sqlite under output_dir, or $MLFLOW_TRACKING_URI) and names."""

    uri: str = ""                   # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite under output_dir
    experiment: str = "otc-ray"     # MLflow experiment name
    run_name: str = ""              # MLflow run name ("" = `name`); a run of that name is resumed
    flush_timeout_s: float = 600.0  # how long the end of a run waits for an unreachable server to come back


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray: an address (cluster / `ray job submit`) or a local in-process instance."""

    address: str = ""               # "" = $RAY_ADDRESS if set, else a local instance
    num_cpus: int = 4               # local instance only: logical CPUs (more than cores avoids deadlock)
    object_store_mb: int = 2048     # local instance only: object store size in MiB
    progress_bars: bool = True      # Ray Data's progress bars on the console
    worker_logs: bool = False       # stream Ray's worker/actor output to the console (off: progress lines only)


@dataclass(frozen=True)
class Config:
    """The whole experiment: one section per stage."""

    name: str = "otc-ray"           # the run's name (checkpoints, MLflow run)
    output_dir: str = "runs"        # local folder of runs, generated data and the default sqlite MLflow store
    data: DataConfig = field(default_factory=DataConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ot: OTConfig = field(default_factory=OTConfig)
    rematch: RematchConfig = field(default_factory=RematchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


SECRET_FIELDS = frozenset({"access_key_id", "secret_access_key"})
URI_FIELDS = frozenset({"uri"})                 # may carry user:password@ (shown redacted: redact_uri)
REDACTED = "***"


def redact_uri(uri: str) -> str:
    """`uri` with its password (or a lone user token) replaced by '***', for printing and logging."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, _ = userinfo.partition(":")
    shown = f"{user}:{REDACTED}" if sep else REDACTED
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


# ----------------------------------------------------------------------------------------- coercion
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert only where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a (partial) mapping, validating every key and value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}'{_did_you_mean(str(k), names, prefix)}")
        parse = fields[k].metadata.get("parse")          # a field's written form, e.g. poison.attack "a+b"
        try:
            kwargs[k] = _coerce(parse(v) if parse else v, hints[k], f"{prefix}{k}")
        except ConfigError:
            if k not in SECRET_FIELDS:
                raise
            raise ConfigError(f"config key '{prefix}{k}': expected a string (value not shown: secret)") from None
    obj = cls(**kwargs)
    _check_ranges(obj, prefix)
    return obj


def _did_you_mean(key: str, names: set[str], prefix: str) -> str:
    """' (did you mean 'train.epochs'?)' for a near miss, else the section's known keys."""
    import difflib

    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f" (known in this section: {', '.join(sorted(names))})"


# ----------------------------------------------------------------------------------------- ranges
# The range of every numeric field, by field name (a name means the same kind of value in every section).
# A numeric field must be listed here or in _UNBOUNDED (tests/test_config.py checks that none is forgotten).
_RULES = {
    ">= 1": (lambda v: v >= 1, "must be >= 1"),
    ">= 0": (lambda v: v >= 0, "must be >= 0"),
    "> 0": (lambda v: v > 0, "must be > 0"),
    "[0, 1]": (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
}
_RANGES = {
    **dict.fromkeys(("num_train", "num_test", "image_size", "samples_per_shard", "max_pixels", "max_caption_chars",
                     "iters", "k", "block_size", "bank_size", "epochs", "batch_size", "num_workers", "every_epochs",
                     "min_actors", "max_actors", "neighbours", "chunk_pairs", "trigger_size", "targets",
                     "per_target", "num_cpus", "object_store_mb", "num_eval", "train_iters", "log_every",
                     "keep_checkpoints", "gate_reference", "propagate_reference"), ">= 1"),
    **dict.fromkeys(("count", "lr", "weight_decay", "warmup_steps", "grad_clip", "lambda_inter", "lambda_intra",
                     "max_failures", "start_epoch", "actor_num_gpus", "retries", "seed", "linear_probe_train",
                     "train_negatives", "intra_samples", "torch_threads", "safeclip_warmup",
                     "sig_delta", "sig_frequency", "publish_every", "candidate_neighbours", "shuffle_buffer",
                     "copy_jitter", "actor_num_cpus", "cache_mb", "driver_read_mb"), ">= 0"),
    "roclip_every": ">= 1",
    **dict.fromkeys(("warp_strength", "base_nearest"), ">= 0"), "warp_grid": ">= 1",     # poison: literature attacks
    **dict.fromkeys(("eps", "tau_ot", "read_num_cpus", "cpus_per_worker", "linear_probe_c",
                     "connect_timeout", "read_timeout", "tol", "duplicate_similarity",
                     "flush_timeout_s"), "> 0"),
    **dict.fromkeys(("alpha", "rate", "tint", "blend_alpha", "text_drop_prob", "flagged_weight",
                     "gmm_safe_probability", "gmm_max_safe", "safeclip_lr_scale"), "[0, 1]"),
}
_UNBOUNDED = frozenset({"gate_threshold"})       # a z-score threshold: any real number
# Upper bounds of resource and size fields: a value past these is a typo or an attack (1e300 logical CPUs per read
# task hangs the scheduler; 1e20 samples per shard holds a shard in memory forever), refused before anything runs.
_MAX_CPUS, _MAX_ROWS, _MAX_COUNT = 1024.0, 10_000_000, 1_000_000_000
_UPPER = {
    **dict.fromkeys(("read_num_cpus", "actor_num_cpus", "cpus_per_worker", "num_cpus", "torch_threads"), _MAX_CPUS),
    **dict.fromkeys(("actor_num_gpus",), 64.0),
    **dict.fromkeys(("num_workers", "min_actors", "max_actors"), 4096),
    **dict.fromkeys(("samples_per_shard", "block_size", "batch_size", "shuffle_buffer", "chunk_pairs"), _MAX_ROWS),
    **dict.fromkeys(("k", "neighbours", "candidate_neighbours", "targets", "per_target"), 65_536),
    **dict.fromkeys(("bank_size", "gate_reference", "propagate_reference", "num_eval"), _MAX_ROWS),
    **dict.fromkeys(("num_train", "num_test", "count", "linear_probe_train", "warmup_steps"), _MAX_COUNT),
    **dict.fromkeys(("iters", "train_iters", "epochs", "start_epoch", "every_epochs", "log_every", "warp_grid",
                     "roclip_every", "publish_every", "keep_checkpoints", "safeclip_warmup", "intra_samples",
                     "train_negatives"), 10_000_000),
    "image_size": 8192, "trigger_size": 8192, "max_pixels": 1 << 31, "max_caption_chars": 10_000_000,
    "object_store_mb": 1 << 24, "cache_mb": 1 << 24, "driver_read_mb": 1 << 24, "retries": 100,
    "max_failures": 10_000,
    **dict.fromkeys(("connect_timeout", "read_timeout", "flush_timeout_s"), 86_400.0),
}
_NOTES = {"duplicate_similarity": " (> 1 counts copies as witnesses)", "tol": " (or null for a fixed iteration count)"}


def _check_ranges(obj: Any, prefix: str) -> None:
    """ConfigError naming the key for the first value of section `obj` outside its range (`_RANGES`)."""
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if not isinstance(v, (int, float)) or isinstance(v, bool) or f.name not in _RANGES:
            continue
        ok, text = _RULES[_RANGES[f.name]]
        if not ok(v):
            raise ConfigError(f"config key '{key}': {text}{_NOTES.get(f.name, '')}, got {v}")
        if f.name in _UPPER and not v <= _UPPER[f.name]:
            raise ConfigError(f"config key '{key}': must be <= {_UPPER[f.name]:g}, got {v:g}")
    for f in dataclasses.fields(obj):
        if f.name in _PATH_FIELDS and isinstance(getattr(obj, f.name), str):
            _check_climb(getattr(obj, f.name), f"{prefix}{f.name}")
    if isinstance(obj, RematchConfig) and obj.min_actors > obj.max_actors:
        raise ConfigError(f"config key '{prefix}min_actors': {obj.min_actors} exceeds max_actors {obj.max_actors}")
    if isinstance(obj, RematchConfig) and obj.propagate and not obj.sticky:
        raise ConfigError(f"config key '{prefix}propagate': needs {prefix}sticky (the flag store keeps the pattern); "
                          f"with sticky off, set {prefix}propagate=false too")
    if isinstance(obj, RematchConfig):
        known = ("cosine", "agreement", "concentration", "pixel_agreement")   # otc_ray.rematch.signals.SIGNALS
        bad = [s for s in obj.gate_signals if s not in known]
        if bad or not obj.gate_signals:
            raise ConfigError(f"config key '{prefix}gate_signals': must name some of {', '.join(known)}, "
                              f"got {list(obj.gate_signals)}")


_PATH_FIELDS = frozenset({"output_dir", "storage_path"})


def _check_climb(value: str, key: str) -> None:
    """ConfigError for a relative path whose `..` parts climb above where it starts (`a/../../x`): it would write
    outside the folder it seems to name. An absolute path, or one that stays below its start, is taken as given."""
    if not value or "://" in value or os.path.isabs(value):
        return
    parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            resolved = os.path.normpath(os.path.join(os.getcwd(), value))
            raise ConfigError(f"config key '{key}': {value!r} climbs out of the working folder with '..' "
                              f"(it resolves to {resolved}); give that absolute path if you mean it")


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000          # values in a config once its aliases (*name) are expanded


def _expanded_size(value: Any, memo: dict[int, int]) -> int:
    """How many values `value` holds with every shared (aliased) part counted each time it is used; each shared
    object is measured once (memo by id), so a "billion laughs" costs as many steps as it has lines."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) in memo:
        return memo[id(value)]
    memo[id(value)] = MAX_CONFIG_NODES + 1          # a cycle (a recursive alias) counts as too large
    items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += _expanded_size(item, memo)
        if total > MAX_CONFIG_NODES:
            break
    memo[id(value)] = total
    return total


def safe_yaml(text: str) -> Any:
    """`yaml.safe_load` bounded: at most MAX_CONFIG_BYTES characters and MAX_CONFIG_NODES values after alias
    expansion (a 500-byte alias bomb would otherwise keep the loader busy for minutes); yaml.YAMLError past them."""
    if len(text) > MAX_CONFIG_BYTES:
        raise yaml.YAMLError(f"{len(text)} characters: over the {MAX_CONFIG_BYTES} a config may hold")
    value = yaml.safe_load(text)
    if _expanded_size(value, {}) > MAX_CONFIG_NODES:
        raise yaml.YAMLError(f"over {MAX_CONFIG_NODES} values once its aliases (*name) are expanded (an alias bomb?)")
    return value


def _section_prefixes() -> dict[type, str]:
    """{section class: its dotted key prefix}: Config "", DataConfig "data.", S3Config "data.s3.", ..."""
    out: dict[type, str] = {Config: ""}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                out[tp] = f"{prefix}{f.name}."
                walk(tp, f"{prefix}{f.name}.")

    walk(Config, "")
    return out


def validate(cfg: Any) -> Any:
    """Range-check a config (or one section) however it was built, e.g. `RematchConfig(k=0)` directly or by
    `dataclasses.replace`; `load_config` and `replace` do this already. Returns cfg; ConfigError names the key."""
    prefix = _section_prefixes().get(type(cfg))
    if prefix is None:
        raise TypeError(f"validate takes a Config or one of its sections, got {type(cfg).__name__}")

    def walk(node: Any, at: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{at}{f.name}.")
        _check_ranges(node, at)

    walk(cfg, prefix)
    return cfg


# ----------------------------------------------------------------------------------------- public API
def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is a value, not a section")
    node[parts[-1]] = value


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-3' -> ('train.lr', 0.001). Values are parsed as YAML scalars ('true', '3', 'x')."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        shown = "(value not shown: secret)" if key.strip().rpartition(".")[2] in SECRET_FIELDS else repr(raw)
        raise ConfigError(f"config key '{key.strip()}': cannot parse value {shown} ({e.__class__.__name__})") from None
    if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value):
        value = float(value)            # YAML 1.1 reads '1e-6' as a string
    return key.strip(), value


def config_from_dict(values: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated `Config` from a nested mapping plus `key.sub=value` override strings."""
    tree: dict = _deep_copy(values or {})
    if not isinstance(tree, dict):
        raise ConfigError("config file must hold a mapping of sections at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return _build(Config, tree)


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"      # otc_ray/configs/*.yaml (package data)


def config_path(name: str | Path) -> Path:
    """The config file `name` names: a file path, or the name of a packaged config ("demo", "tiny" ->
    otc_ray/configs/tiny.yaml); ConfigError listing the packaged ones when neither exists."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = PACKAGED_CONFIGS / f"{p.name.removesuffix('.yaml')}.yaml"
    if p.parent == Path(".") and packaged.is_file():
        return packaged
    names = ", ".join(sorted(q.stem for q in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {p} (a YAML file, or a packaged config: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file (a path, or a packaged config's name: `config_path`; only defaults when `path` is
    None) and apply overrides. Errors in the file name it (and the line, for YAML syntax)."""
    values: dict = {}
    if path is not None:
        p = config_path(path)
        try:
            values = safe_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e) or type(e).__name__
            raise ConfigError(f"config file {p}{where}: not valid YAML ({problem})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections at the top level")
        try:
            config_from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"config file {p}: {e}") from None
    return config_from_dict(values, overrides)


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` that validates like loading does; nested keys as 'section.key'."""
    tree = to_dict(cfg)
    for k, v in changes.items():
        _set_path(tree, k.replace("__", "."), v)
    return _build(type(cfg), tree, prefix=_section_prefixes().get(type(cfg), ""))


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (YAML/JSON-serialisable) of a config dataclass."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, redact: bool = True) -> dict[str, Any]:
    """{'section.key': value} for MLflow params; secrets (and a URI's password) replaced by '***' unless
    redact=False; a field with a
    written form shows in it (poison.attack: "backdoor+targeted")."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            v, key = getattr(node, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(v):
                walk(v, key + ".")
            elif redact and f.name in SECRET_FIELDS and v:
                out[key] = REDACTED
            elif redact and f.name in URI_FIELDS and v:
                out[key] = redact_uri(v)
            else:
                out[key] = f.metadata["show"](v) if "show" in f.metadata else _deep_copy(v)

    walk(cfg, "")
    return out


def _deep_copy(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values


def content_digest(values: Any) -> str:
    """10 hex digits of the JSON of `values` (sorted keys): equal contents, equal digest."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
