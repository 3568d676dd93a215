"""One CLI: `otc-ray data make|inspect`, `poison`, `train`, `eval`, `clean`, `compare`, `demo`, `config`.

Every command takes `--config FILE` (or a packaged config's name: `demo`, `tiny`) and trailing `key.sub=value`
overrides (see otc_ray.config; `otc-ray config` lists every key with its meaning); flags of a command are
shorthands for config keys. Input paths are checked before anything heavy starts. Errors in input or config print
one line and exit 2; a tracking server that stays away past `tracking.flush_timeout_s` one line and exit 3 (what was
computed is kept). Results go to stdout, status lines (Ray starting, the MLflow run) to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

from .config import Config, load_config, replace
from .credentials import move_secrets_to_env, redact_uri

LATEST_CHECKPOINT = "latest-checkpoint"      # <output_dir>/latest-checkpoint -> the newest finished run's checkpoint


def say(text: str) -> None:
    """A status line on stderr, at once (stdout holds the results)."""
    print(text, file=sys.stderr, flush=True)


def _config(args: argparse.Namespace, **flag_overrides) -> Config:
    """Config file + flag shorthands + trailing overrides (the trailing ones win), its secrets moved to the
    environment before anything starts Ray (`credentials.move_secrets_to_env`)."""
    flags = [f"{k}={v}" for k, v in flag_overrides.items() if v is not None]
    return move_secrets_to_env(load_config(args.config, flags + list(args.overrides)))


SHARD_SET_INPUTS = ("data.train", "data.test", "--in", "--data", "--train", "--target-source", "shard set")


def _check_inputs(cfg: Config, paths: dict[str, str | None]) -> None:
    """ValueError for the first input path that names nothing, or a shard set input without shards (before Ray or
    a model is loaded)."""
    from .data.input_paths import check_inputs

    check_inputs(paths, cfg.data.s3, shard_sets=SHARD_SET_INPUTS)


# ----------------------------------------------------------------------------------------- data
def cmd_data_make(args: argparse.Namespace) -> int:
    from .data.make import make_shards, prepare_output

    cfg = _config(args, **{"data.dataset": args.dataset, "data.seed": args.seed, "data.image_size": args.image_size,
                           "data.samples_per_shard": args.shard_size, "data.tint": args.tint,
                           "data.image_format": args.image_format})
    prepare_output(args.out, cfg.data.s3, overwrite=args.overwrite)
    report = make_shards(cfg.data, args.split, args.num, args.out, args.format, progress=not args.quiet)
    print(f"wrote {report.num_samples} samples in {report.num_shards} shards to {report.out} "
          f"({report.images_per_second:.0f} images/s)")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    cfg = _config(args, **{"data.image_size": args.image_size})
    _check_inputs(cfg, {"shard set": args.path})
    say("starting Ray ...")
    from .data.inspect import inspect_shards
    from .pipelines.runtime import init_ray

    init_ray(cfg.ray)
    sheet = args.sheet or str(Path(cfg.output_dir) / "inspect" / f"{Path(args.path.rstrip('/')).name}_sheet.png")
    report = inspect_shards(args.path, cfg.data, sheet_path=None if args.no_sheet else sheet,
                            poisoned_first=args.poisoned_first)
    print("\n".join(report.lines()))
    return 0


def _run_name(cfg: Config, resume: str | bool | None) -> Config:
    """cfg named for this run: with `resume`, the run to continue (True: the config's own name, else the name given),
    which must exist; otherwise a new name, the config's name plus the start time (`tiny-20261207-053012`), so
    that a rerun never continues an earlier run by accident."""
    from .train.trainer import run_folder

    current = cfg.tracking.run_name or cfg.name
    if resume:
        name = current if resume is True else str(resume)
        named = replace(cfg, name=name, tracking__run_name="")
        folder = run_folder(named)
        if "://" not in folder and not Path(folder).is_dir():
            earlier = sorted(p.name for p in Path(folder).parent.glob("*") if p.is_dir())
            raise ValueError(f"--resume {name}: no run of that name under {Path(folder).parent}"
                             + (f" (runs there: {', '.join(earlier[-5:])})" if earlier else ""))
        return named
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    named = replace(cfg, name=f"{current}-{stamp}", tracking__run_name="")
    while "://" not in run_folder(named) and Path(run_folder(named)).exists():     # two runs in one second
        n += 1
        named = replace(cfg, name=f"{current}-{stamp}-{n}", tracking__run_name="")
    return named


def _link_latest(cfg: Config, checkpoint: str | None) -> str | None:
    """Point <output_dir>/latest-checkpoint at a local final checkpoint (a predictable path for `eval`)."""
    if not checkpoint or "://" in checkpoint:
        return None
    link = Path(cfg.output_dir) / LATEST_CHECKPOINT
    tmp = link.with_name(f".{LATEST_CHECKPOINT}-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(checkpoint).resolve(), target_is_directory=True)
    os.replace(tmp, link)
    return str(link)


def final_table(metrics: dict[str, float]) -> str:
    """The run's headline figures as two columns (what `compare` shows for it), one metric a line."""
    from .track.compare import METRICS

    rows = [(label, metrics[key]) for label, key in METRICS if key in metrics]
    width = max((len(label) for label, _ in rows), default=0)

    def shown(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"

    return "\n".join(f"{label:<{width}}  {shown(value)}" for label, value in rows)


def cmd_train(args: argparse.Namespace) -> int:
    """Pre-train with the configured defense; prints the final metrics and where the run and checkpoint live."""
    cfg = _config(args)
    _check_inputs(cfg, {"data.train": cfg.data.train, "data.test": cfg.data.test,
                        "model.pretrained": cfg.model.pretrained, "eval.classes": cfg.eval.classes})
    say(f"otc-ray train: defense {cfg.train.defense}, {cfg.train.epochs} epochs, data "
        f"{cfg.data.train or 'built-in ' + cfg.data.dataset}; loading torch and Ray ...")
    cfg = _run_name(cfg, args.resume)
    say(f"run {cfg.name}" + (" (resumed)" if args.resume else f" (new; continue it later with --resume {cfg.name})"))
    from .pipelines.train import run_training

    result = run_training(cfg, progress=not args.quiet)
    print(final_table(result.metrics))
    latest = _link_latest(cfg, result.checkpoint)
    print(f"checkpoint  {result.checkpoint}" + (f"  (also {latest})" if latest else ""))
    print(f"mlflow run  {cfg.name} ({result.run_id}) at {redact_uri(result.tracking_uri)}; {result.seconds:.0f} s")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Side-by-side table of an experiment's runs (mean ± std over seeds) and comparison plots."""
    from .track.compare import compare
    from .track.mlflow_logger import tracking_uri

    cfg = _config(args, **{"tracking.experiment": args.experiment})
    say(f"reading experiment {cfg.tracking.experiment} ...")
    plots = None if args.no_plots else Path(args.plots or Path(cfg.output_dir) / "compare")
    names = set(args.runs.split(",")) if args.runs else None
    table, paths = compare(tracking_uri(cfg), cfg.tracking.experiment, args.format, plots, run_names=names)
    print(table)
    for p in paths:
        print(f"plot: {p}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: poisoned built-in data, three defenses trained and compared (otc_ray/configs/demo.yaml)."""
    say("otc-ray demo: loading torch and Ray ...")
    from .pipelines.demo import DEMO_CONFIG, DEFENSES, run_demo
    from .pipelines.runtime import init_ray

    cfg = move_secrets_to_env(load_config(args.config or DEMO_CONFIG, list(args.overrides)))
    say("starting Ray ...")
    init_ray(cfg.ray)
    run_demo(cfg, tuple(args.defenses.split(",")) if args.defenses else DEFENSES)
    return 0


# ----------------------------------------------------------------------------------------- poison / eval
def cmd_poison(args: argparse.Namespace) -> int:
    cfg = _config(args, **{"poison.attack": args.attack, "poison.trigger": args.trigger,
                           "poison.trigger_size": args.trigger_size, "poison.trigger_location": args.trigger_location,
                           "poison.target": args.target, "poison.count": args.count,
                           "poison.rate": 0.0 if args.count is not None else args.rate, "poison.seed": args.seed,
                           "poison.label_consistent": True if args.label_consistent else None,
                           "poison.targets": args.targets, "poison.per_target": args.per_target,
                           "poison.adversarial": args.adversarial, "poison.caption_source": args.caption_source,
                           "poison.trigger_per_image": True if args.per_image else None,
                           "poison.blend_alpha": args.blend_alpha, "poison.sig_delta": args.sig_delta,
                           "poison.sig_frequency": args.sig_frequency, "poison.warp_grid": args.warp_grid,
                           "poison.warp_strength": args.warp_strength,
                           "poison.base_classes": json.dumps(args.base_classes) if args.base_classes else None,
                           "poison.base_nearest": args.base_nearest,
                           "poison.copy_augment": True if args.copy_augment else None,
                           "poison.out_format": args.format, "eval.classes": args.classes})
    _check_inputs(cfg, {"--in": args.in_path, "--target-source": args.target_source, "--classes": cfg.eval.classes})
    say(f"poisoning {args.in_path} -> {args.out} ...")
    from .poison.manifest import manifest_summary, read_manifest
    from .poison.transform import poison_shards

    report = poison_shards(args.in_path, args.out, cfg.poison, cfg.data, target_source=args.target_source,
                           progress=not args.quiet, classes=cfg.eval.classes)
    print("\n".join(report.lines()))
    summary = manifest_summary(read_manifest(args.out, cfg.data.s3))
    print(f"manifest rows  {summary['rows']} ({summary['distinct_sources']} distinct source images, "
          f"{summary['lossy']} lossy)")
    for pair, n in summary["by_pair"].items():
        print(f"  {pair:<40} {n}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    cfg = _config(args, **{"model.arch": args.arch, "eval.num_eval": args.num_eval,
                           "data.image_size": args.image_size, "eval.classes": args.classes})
    checkpoint = args.checkpoint or cfg.model.pretrained
    if not checkpoint:
        raise ValueError("eval needs --checkpoint (or model.pretrained=PATH): the weights to evaluate")
    _check_inputs(cfg, {"--checkpoint": checkpoint, "--data": args.data, "--classes": cfg.eval.classes,
                        "--attack-manifest": args.attack_manifest, "--train": args.train})
    say(f"evaluating {checkpoint}: loading torch and Ray ...")
    from .data.ray_io import read_in_driver
    from .evaluate.model_encoder import ModelEncoder
    from .evaluate.report import format_metrics
    from .model import check_image_size
    from .model_checkpoint import load_checkpoint_model
    from .pipelines.evaluate import evaluate_model, resolve_attack
    from .pipelines.runtime import init_ray

    check_image_size(cfg.model.arch, cfg.data.image_size)
    bundle = load_checkpoint_model(checkpoint, cfg.model, cfg.data.s3)
    attack = resolve_attack(args.attack_manifest, cfg.poison, cfg.data)
    if not all(read_in_driver(p, cfg.data) for p in (args.data, args.train) if p):
        init_ray(cfg.ray)               # a set too large to read in this process: Ray Data reads it
    encoder = ModelEncoder(bundle, device=args.device, batch_size=cfg.eval.batch_size)
    metrics = evaluate_model(encoder, args.data, cfg.data, cfg.poison, cfg.eval, manifest_path=args.attack_manifest,
                             train_path=args.train)
    print(f"checkpoint  {checkpoint} ({cfg.model.arch}) on {args.data}")
    if "backdoor_asr" in metrics:
        print(f"backdoor    target {attack.target!r}, trigger {json.dumps(attack.spec.to_dict(), sort_keys=True)} "
              f"(from the {attack.source})")
    print(format_metrics(metrics))
    return 0


# ----------------------------------------------------------------------------------------- clean
def cmd_clean(args: argparse.Namespace) -> int:
    """Re-match every caption of a shard set with a checkpoint; cleaned shards + report + summary."""
    cfg = _config(args, **{"model.arch": args.arch, "rematch.gate": args.gate, "rematch.action": args.action})
    _check_inputs(cfg, {"--in": args.in_path, "--checkpoint": args.checkpoint or cfg.model.pretrained,
                        "--manifest": args.manifest, "eval.classes": cfg.eval.classes})
    say("loading torch and Ray ...")
    from .pipelines.clean import run_clean_job
    from .pipelines.runtime import init_ray
    from .track.mlflow_logger import tracking_uri

    init_ray(cfg.ray)
    summary, run_id = run_clean_job(args.in_path, args.out, cfg, checkpoint=args.checkpoint, manifest=args.manifest)
    print("\n".join(summary.lines()))
    print(f"mlflow run {run_id} at {redact_uri(tracking_uri(cfg))}")
    return 0


# ----------------------------------------------------------------------------------------- config
def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective config (file + overrides): every key, its value and its meaning."""
    from .config_help import describe

    print(describe(_config(args)))
    return 0


# ----------------------------------------------------------------------------------------- parser
def _field(key: str):
    """(annotation, default) of config key `key` ("rematch.gate")."""
    node, cls = Config(), Config
    *sections, name = key.split(".")
    for part in sections:
        node = getattr(node, part)
        cls = type(node)
    return typing.get_type_hints(cls)[name], getattr(node, name)


def _choices(key: str) -> tuple:
    """The values config key `key` allows (its Literal), so that a flag accepts exactly what the key does."""
    tp, _ = _field(key)
    if typing.get_origin(tp) is tuple:              # poison.attack: a tuple of one Literal
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp)


def _key_help(text: str, key: str) -> str:
    """Flag help that names the config key it sets and that key's default."""
    _, default = _field(key)
    shown = "+".join(default) if isinstance(default, tuple) else default
    return f"{text} (config {key}; default {shown if shown not in ('', ()) else 'none'})"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file, or a packaged config's name: demo, tiny (default: none, the "
                   "built-in defaults; `otc-ray config --config X` shows every key)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.epochs=2 (`otc-ray config` lists the keys)")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("otc-ray")
    except Exception:          # noqa: BLE001 - run from a source tree without an install
        from . import __version__

        return __version__


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows a flag's own default (e.g. `--num 1000`) unless the text already says it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and \
                action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="otc-ray", description=__doc__.splitlines()[0], formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"otc-ray {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, text: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=text, description=text, formatter_class=fmt)

    data = command(sub, "data", "make and inspect shard sets").add_subparsers(dest="data_command", required=True,
                                                                               metavar="COMMAND")
    make = command(data, "make", "write a built-in data set as webdataset or parquet shards")
    make.add_argument("--dataset", choices=_choices("data.dataset"), default="fashion", help="built-in data set")
    make.add_argument("--split", choices=("train", "test"), default="train", help="which split to generate")
    make.add_argument("--num", type=int, default=1000, help="samples to write")
    make.add_argument("--seed", type=int, help=_key_help("generator seed", "data.seed"))
    make.add_argument("--image-size", type=int, choices=(32, 64), help=_key_help("image side", "data.image_size"))
    make.add_argument("--format", choices=("wds", "parquet"), default="wds", help="shard format")
    make.add_argument("--shard-size", type=int, help=_key_help("samples per shard", "data.samples_per_shard"))
    make.add_argument("--tint", type=float, help=_key_help("fashion: probability that an item is tinted", "data.tint"))
    make.add_argument("--image-format", choices=_choices("data.image_format"),
                      help=_key_help("image encoding", "data.image_format"))
    make.add_argument("--out", required=True, help="new (or empty) folder or s3://bucket/prefix")
    make.add_argument("--overwrite", action="store_true", help="replace the shard set already at --out (its shards "
                      "and side files only; a folder holding anything else is refused)")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(make)
    make.set_defaults(func=cmd_data_make)

    insp = command(data, "inspect", "count samples and skips, caption stats, contact sheet")
    insp.add_argument("path", help="shard folder, file, glob or s3:// prefix")
    insp.add_argument("--image-size", type=int, help=_key_help("decode size for the contact sheet", "data.image_size"))
    insp.add_argument("--sheet", help="contact sheet PNG path (default: <output_dir>/inspect/<name>_sheet.png)")
    insp.add_argument("--no-sheet", action="store_true", help="no contact sheet")
    insp.add_argument("--poisoned-first", action="store_true", help="contact sheet: poisoned samples first")
    _common(insp)
    insp.set_defaults(func=cmd_data_inspect)

    poison = command(sub, "poison", "poison a shard set (backdoor / targeted) and write its manifest")
    poison.add_argument("--in", dest="in_path", required=True, help="clean shard set (folder or s3:// prefix)")
    poison.add_argument("--out", required=True, help="empty folder or s3:// prefix for the poisoned set")
    poison.add_argument("--attack", choices=_choices("poison.attack"), help=_key_help("the attack", "poison.attack"))
    poison.add_argument("--trigger", choices=_choices("poison.trigger"),
                        help=_key_help("backdoor trigger", "poison.trigger"))
    poison.add_argument("--trigger-size", type=int, help=_key_help("patch side in pixels", "poison.trigger_size"))
    poison.add_argument("--trigger-location", choices=_choices("poison.trigger_location"),
                        help=_key_help("patch corner", "poison.trigger_location"))
    poison.add_argument("--target", help=_key_help("backdoor target class name", "poison.target"))
    amount = poison.add_mutually_exclusive_group()
    amount.add_argument("--count", type=int, help=_key_help("backdoor: samples to poison", "poison.count"))
    amount.add_argument("--rate", type=float,
                        help=_key_help("backdoor: fraction of the eligible samples to poison", "poison.rate"))
    poison.add_argument("--label-consistent", action="store_true",
                        help="backdoor: trigger target-class images only (config poison.label_consistent)")
    poison.add_argument("--targets", type=int, help=_key_help("targeted: number of target images", "poison.targets"))
    poison.add_argument("--per-target", type=int, help=_key_help("targeted: copies of each target image",
                                                                 "poison.per_target"))
    poison.add_argument("--adversarial", help=_key_help("targeted: class whose captions the copies get",
                                                        "poison.adversarial"))
    poison.add_argument("--caption-source", choices=_choices("poison.caption_source"),
                        help=_key_help("poison captions: templates, data (real captions naming the class) or swap (the image's own caption, its class word replaced)", "poison.caption_source"))
    poison.add_argument("--per-image", action="store_true",
                        help="redraw the trigger's random part per image, seeded by the sample's key: patch = fresh "
                             "noise (CleanCLIP's BadNet, with --trigger-location random), blended = a fresh noise "
                             "pattern, sig = a random phase (config poison.trigger_per_image)")
    poison.add_argument("--blend-alpha", type=float, help=_key_help("blended: weight of the noise pattern",
                                                                    "poison.blend_alpha"))
    poison.add_argument("--sig-delta", type=float, help=_key_help("sig: amplitude in grey levels", "poison.sig_delta"))
    poison.add_argument("--sig-frequency", type=float, help=_key_help("sig: cycles across the image width",
                                                                      "poison.sig_frequency"))
    poison.add_argument("--warp-grid", type=int, help=_key_help("wanet: control grid side k", "poison.warp_grid"))
    poison.add_argument("--warp-strength", type=float, help=_key_help("wanet: warp strength s", "poison.warp_strength"))
    poison.add_argument("--base-classes", nargs="+", metavar="CLASS",
                        help=_key_help("backdoor: take the images to poison only from these classes",
                                       "poison.base_classes"))
    poison.add_argument("--base-nearest", type=int, metavar="K",
                        help=_key_help("backdoor: take the images to poison from the K classes whose mean image is "
                                       "nearest the target's", "poison.base_nearest"))
    poison.add_argument("--copy-augment", action="store_true",
                        help="targeted: every copy after the first flipped / cropped / shifted / noised, seeded "
                             "(config poison.copy_augment)")
    poison.add_argument("--target-source", help="targeted: test shards to take the target images from")
    poison.add_argument("--classes", help=_key_help("classes file (JSON: classes, synonyms, templates) of a set "
                                                    "without _info.json", "eval.classes"))
    poison.add_argument("--seed", type=int, help=_key_help("which samples and targets are picked", "poison.seed"))
    poison.add_argument("--format", choices=_choices("poison.out_format"),
                        help=_key_help("output shard format", "poison.out_format"))
    poison.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(poison)
    poison.set_defaults(func=cmd_poison)

    train = command(sub, "train", "pre-train a CLIP with a defense (Ray Train), tracked in MLflow")
    train.add_argument("--resume", nargs="?", const=True, metavar="NAME",
                       help="continue an earlier run (its newest checkpoint and MLflow run): NAME as `train` printed "
                       "it, or without NAME the config's `name` as it is; without --resume every run gets a new "
                       "name, `name` plus its start time")
    train.add_argument("--quiet", action="store_true", help="no progress lines")
    _common(train)
    train.set_defaults(func=cmd_train)

    ev = command(sub, "eval", "evaluate a checkpoint: zero-shot, linear probe, ASR, retrieval")
    ev.add_argument("--checkpoint", help="what `train` printed (a checkpoint folder, or <output_dir>/"
                    f"{LATEST_CHECKPOINT}), a Ray Train run folder (its newest checkpoint), or a state dict file "
                    "(.pt / .safetensors), local or s3:// (default: model.pretrained)")
    ev.add_argument("--data", required=True, help="held-out test shards (labels in their metadata)")
    ev.add_argument("--classes", help=_key_help("classes file (JSON: classes, synonyms, zero-shot templates)",
                                                "eval.classes"))
    ev.add_argument("--attack-manifest", help="poisoned set folder or its _poison_manifest.parquet (the ASR's "
                    "trigger, target and target images)")
    ev.add_argument("--train", help="shards for the linear probe (default: half of the test set)")
    ev.add_argument("--arch", help=_key_help("architecture of the checkpoint", "model.arch"))
    ev.add_argument("--num-eval", type=int, help=_key_help("test samples to use", "eval.num_eval"))
    ev.add_argument("--image-size", type=int, help=_key_help("decode size of the test images", "data.image_size"))
    ev.add_argument("--device", default="cpu", help="torch device for the model")
    _common(ev)
    ev.set_defaults(func=cmd_eval)

    clean = command(sub, "clean", "re-match captions with a checkpoint: cleaned shards, report, summary")
    clean.add_argument("--in", dest="in_path", required=True, help="shard set to clean (folder or s3:// prefix)")
    clean.add_argument("--out", required=True, help="folder or s3:// prefix for the cleaned shards")
    clean.add_argument("--checkpoint", help="checkpoint folder or state dict file (.pt / .safetensors) (default: "
                       "model.pretrained, else random init)")
    clean.add_argument("--manifest", help="poison manifest (folder or file): report detection precision / recall")
    clean.add_argument("--arch", help=_key_help("architecture of the checkpoint", "model.arch"))
    clean.add_argument("--gate", choices=_choices("rematch.gate"), help=_key_help("which pairs are flagged",
                                                                                   "rematch.gate"))
    clean.add_argument("--action", choices=_choices("rematch.action"),
                       help=_key_help("what happens to a flagged pair", "rematch.action"))
    _common(clean)
    clean.set_defaults(func=cmd_clean)

    cmp_ = command(sub, "compare", "compare the runs of an MLflow experiment (mean ± std over seeds)")
    cmp_.add_argument("--experiment", help=_key_help("MLflow experiment", "tracking.experiment"))
    cmp_.add_argument("--format", choices=("text", "markdown", "csv"), default="text", help="table format")
    cmp_.add_argument("--plots", help="folder for the PNG plots (default <output_dir>/compare)")
    cmp_.add_argument("--no-plots", action="store_true", help="no plots")
    cmp_.add_argument("--runs", help="only these runs: comma-separated run names (e.g. the seeds of one setting)")
    _common(cmp_)
    cmp_.set_defaults(func=cmd_compare)

    demo = command(sub, "demo", "the main job: poisoned built-in data, none/roclip/otcclip trained and compared")
    demo.add_argument("--defenses", help="comma-separated subset, e.g. none,otcclip (default: none,roclip,otcclip)")
    _common(demo)
    demo.set_defaults(func=cmd_demo)

    conf = command(sub, "config", "print the effective config: every key, its value and its meaning")
    _common(conf)
    conf.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)     # overrides may follow flags: collect the leftovers
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    try:
        return args.func(args)
    except Exception as e:
        status = _error_status(e)
        if status is None:
            raise
        print(f"otc-ray: error: {e}", file=sys.stderr)
        return status


TRACKING_STATUS = 3         # the tracking server did not take a run's record (what was computed is kept)


def _error_status(e: Exception) -> int | None:
    """The exit status of an error shown as one line: 2 for bad input or config, TRACKING_STATUS when the tracking
    server stayed away past tracking.flush_timeout_s (and nothing else went wrong first); None for a traceback."""
    tracking = sys.modules.get("otc_ray.track.mlflow_logger")
    if tracking is not None and isinstance(e, tracking.TrackingUnavailable) and e.__context__ is None:
        return TRACKING_STATUS
    return 2 if isinstance(e, _user_errors()) else None


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input or config (one line, exit 2), not a bug (a traceback): ValueError (ConfigError
    among them) and the shard and data set lookups' FileNotFoundErrors, from the modules a command has loaded."""
    errors: list[type[BaseException]] = [ValueError]
    for module, name in (("otc_ray.data.shards", "ShardSetError"), ("otc_ray.data.builtin.fashion",
                                                                     "DatasetMissingError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def entry(argv: list[str] | None = None) -> None:
    """The console script, `python -m otc_ray` and the `jobs/` entry points: `main(argv)`, then an ordered shutdown
    and exit with its status (`otc_ray.process_exit`: a command that succeeded exits 0, not 134 from a native
    pool's teardown)."""
    from .process_exit import exit_process, raise_on_sigterm, stopped_by_signal

    raise_on_sigterm()
    status = 1
    try:
        status = main(argv)
    except SystemExit as e:                         # argparse's usage errors (2), --help (0), SIGTERM (143)
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)          # sys.exit("message"): Python shows it, status 1
    except BaseException:                           # noqa: BLE001 - shown, then the same ordered exit
        if not stopped_by_signal():                 # Ctrl-C: status 130 and the line below, no traceback
            import traceback

            traceback.print_exc()
    if stopped_by_signal():
        print("otc-ray: stopped by a signal (Ctrl-C or SIGTERM); an interrupted clean or train resumes when rerun "
              "with the same settings", file=sys.stderr)
    exit_process(status)


if __name__ == "__main__":
    entry()
