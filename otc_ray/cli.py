"""One CLI: `otc-ray data make|inspect`, `poison`, `train`, `clean`, `eval`, `compare`, `demo`.

Every command takes `--config FILE` and trailing `key.sub=value` overrides (see otc_ray.config); flags
of a command are shorthands for config keys. Errors in input or config print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config
from .credentials import move_secrets_to_env, redact_uri
from .data.builtin import BUILTIN_DATASETS, DatasetMissingError
from .data.shards import ShardSetError
from .track import metric_names as N


def _config(args: argparse.Namespace, **flag_overrides) -> Config:
    """Config file + flag shorthands + trailing overrides (the trailing ones win), its secrets moved to the
    environment before anything starts Ray (`credentials.move_secrets_to_env`)."""
    flags = [f"{k}={v}" for k, v in flag_overrides.items() if v is not None]
    return move_secrets_to_env(load_config(args.config, flags + list(args.overrides)))


# ----------------------------------------------------------------------------------------- data
def cmd_data_make(args: argparse.Namespace) -> int:
    from .data.make import make_shards

    cfg = _config(args, **{"data.dataset": args.dataset, "data.seed": args.seed, "data.image_size": args.image_size,
                           "data.samples_per_shard": args.shard_size, "data.tint": args.tint,
                           "data.image_format": args.image_format})
    report = make_shards(cfg.data, args.split, args.num, args.out, args.format, progress=not args.quiet)
    print(f"wrote {report.num_samples} samples in {report.num_shards} shards to {report.out} "
          f"({report.images_per_second:.0f} images/s)")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from .data.inspect import inspect_shards
    from .pipelines.runtime import init_ray

    cfg = _config(args, **{"data.image_size": args.image_size})
    init_ray(cfg.ray)
    sheet = args.sheet or str(Path(cfg.output_dir) / "inspect" / f"{Path(args.path.rstrip('/')).name}_sheet.png")
    report = inspect_shards(args.path, cfg.data, sheet_path=None if args.no_sheet else sheet,
                            poisoned_first=args.poisoned_first)
    print("\n".join(report.lines()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Pre-train with the configured defense; prints the final metrics and where the run lives."""
    from .pipelines.train import run_training

    cfg = _config(args)
    result = run_training(cfg, progress=not args.quiet)
    for key in sorted(k for k in result.metrics if k.startswith((N.FINAL, N.EVAL))):
        print(f"{key:<36} {result.metrics[key]:.4f}")
    print(f"mlflow run {result.run_id} at {redact_uri(result.tracking_uri)}; checkpoint {result.checkpoint}; "
          f"{result.seconds:.0f} s")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Side-by-side table of an experiment's runs (mean ± std over seeds) and comparison plots."""
    from .track.compare import compare
    from .track.mlflow_logger import tracking_uri

    cfg = _config(args, **{"tracking.experiment": args.experiment})
    plots = None if args.no_plots else Path(args.plots or Path(cfg.output_dir) / "compare")
    names = set(args.runs.split(",")) if args.runs else None
    table, paths = compare(tracking_uri(cfg), cfg.tracking.experiment, args.format, plots, run_names=names)
    print(table)
    for p in paths:
        print(f"plot: {p}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: poisoned built-in data, three defenses trained and compared (otc_ray/configs/demo.yaml)."""
    from .pipelines.demo import DEMO_CONFIG, DEFENSES, run_demo
    from .pipelines.runtime import init_ray

    cfg = move_secrets_to_env(load_config(args.config or DEMO_CONFIG, list(args.overrides)))
    init_ray(cfg.ray)
    run_demo(cfg, tuple(args.defenses.split(",")) if args.defenses else DEFENSES)
    return 0


# ----------------------------------------------------------------------------------------- poison / eval
def cmd_poison(args: argparse.Namespace) -> int:
    from .poison.manifest import manifest_summary, read_manifest
    from .poison.transform import poison_shards

    cfg = _config(args, **{"poison.attack": args.attack, "poison.trigger": args.trigger,
                           "poison.trigger_size": args.trigger_size, "poison.trigger_location": args.trigger_location,
                           "poison.target": args.target, "poison.count": args.count,
                           "poison.rate": 0.0 if args.count is not None else args.rate, "poison.seed": args.seed,
                           "poison.label_consistent": True if args.label_consistent else None,
                           "poison.targets": args.targets, "poison.per_target": args.per_target,
                           "poison.adversarial": args.adversarial, "poison.caption_source": args.caption_source,
                           "poison.out_format": args.format, "eval.classes": args.classes})
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

    from .evaluate.model_encoder import ModelEncoder
    from .model import check_image_size
    from .model_checkpoint import load_checkpoint_model
    from .evaluate.report import format_metrics
    from .pipelines.evaluate import evaluate_model, resolve_attack
    from .pipelines.runtime import init_ray

    cfg = _config(args, **{"model.arch": args.arch, "eval.num_eval": args.num_eval,
                           "data.image_size": args.image_size, "eval.classes": args.classes})
    check_image_size(cfg.model.arch, cfg.data.image_size)
    checkpoint = args.checkpoint or cfg.model.pretrained
    if not checkpoint:
        raise ValueError("eval needs --checkpoint (or model.pretrained=PATH): the weights to evaluate")
    bundle = load_checkpoint_model(checkpoint, cfg.model, cfg.data.s3)
    attack = resolve_attack(args.attack_manifest, cfg.poison, cfg.data)
    init_ray(cfg.ray)
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
    from .pipelines.clean import run_clean_job
    from .pipelines.runtime import init_ray
    from .track.mlflow_logger import tracking_uri

    cfg = _config(args, **{"model.arch": args.arch, "rematch.method": args.method, "rematch.gate": args.gate,
                           "rematch.action": args.action})
    init_ray(cfg.ray)
    summary, run_id = run_clean_job(args.in_path, args.out, cfg, checkpoint=args.checkpoint, manifest=args.manifest)
    print("\n".join(summary.lines()))
    print(f"mlflow run {run_id} at {redact_uri(tracking_uri(cfg))}")
    return 0


# ----------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otc-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make and inspect shard sets").add_subparsers(dest="data_command", required=True)
    make = data.add_parser("make", help="write a built-in data set as webdataset or parquet shards")
    make.add_argument("--dataset", choices=BUILTIN_DATASETS, default="fashion")
    make.add_argument("--split", choices=("train", "test"), default="train")
    make.add_argument("--num", type=int, default=1000)
    make.add_argument("--seed", type=int)
    make.add_argument("--image-size", type=int, choices=(32, 64))
    make.add_argument("--format", choices=("wds", "parquet"), default="wds")
    make.add_argument("--shard-size", type=int, help="samples per shard")
    make.add_argument("--tint", type=float, help="fashion: probability that an item is tinted")
    make.add_argument("--image-format", choices=("png", "jpg"))
    make.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(make)
    make.set_defaults(func=cmd_data_make)

    insp = data.add_parser("inspect", help="count samples and skips, caption stats, contact sheet")
    insp.add_argument("path", help="shard folder, file, glob or s3:// prefix")
    insp.add_argument("--image-size", type=int, help="decode size for the contact sheet")
    insp.add_argument("--sheet", help="contact sheet PNG path (default: <output_dir>/inspect/<name>_sheet.png)")
    insp.add_argument("--no-sheet", action="store_true")
    insp.add_argument("--poisoned-first", action="store_true", help="contact sheet: poisoned samples first")
    _common(insp)
    insp.set_defaults(func=cmd_data_inspect)

    poison = sub.add_parser("poison", help="poison a shard set (backdoor / targeted) and write its manifest")
    poison.add_argument("--in", dest="in_path", required=True, help="clean shard set (folder or s3:// prefix)")
    poison.add_argument("--out", required=True, help="empty folder or s3:// prefix for the poisoned set")
    poison.add_argument("--attack", choices=("backdoor", "targeted"))
    poison.add_argument("--trigger", choices=("patch", "solid", "blended", "sig"))
    poison.add_argument("--trigger-size", type=int, help="patch side in pixels")
    poison.add_argument("--trigger-location", choices=("br", "bl", "tr", "tl", "random"))
    poison.add_argument("--target", help="backdoor target class name")
    amount = poison.add_mutually_exclusive_group()
    amount.add_argument("--count", type=int, help="backdoor: samples to poison")
    amount.add_argument("--rate", type=float, help="backdoor: fraction of the eligible samples to poison")
    poison.add_argument("--label-consistent", action="store_true", help="backdoor: trigger target-class images only")
    poison.add_argument("--targets", type=int, help="targeted: number of target images")
    poison.add_argument("--per-target", type=int, help="targeted: copies of each target image")
    poison.add_argument("--adversarial", help="targeted: class whose captions the copies get")
    poison.add_argument("--caption-source", choices=("templates", "data"))
    poison.add_argument("--target-source", help="targeted: test shards to take the target images from")
    poison.add_argument("--classes", help="classes file (JSON: classes, synonyms, templates) of a set without "
                        "_info.json (eval.classes)")
    poison.add_argument("--seed", type=int)
    poison.add_argument("--format", choices=("same", "wds", "parquet"), help="output shard format")
    poison.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(poison)
    poison.set_defaults(func=cmd_poison)

    ev = sub.add_parser("eval", help="evaluate a checkpoint: zero-shot, linear probe, ASR, retrieval")
    ev.add_argument("--checkpoint", help="state dict (torch.save(model.state_dict())) or .safetensors, local or "
                    "s3:// (default: model.pretrained)")
    ev.add_argument("--data", required=True, help="held-out test shards (labels in their metadata)")
    ev.add_argument("--classes", help="classes file (JSON: classes, synonyms, zero-shot templates; eval.classes)")
    ev.add_argument("--attack-manifest", help="poisoned set folder or its _poison_manifest.parquet")
    ev.add_argument("--train", help="shards for the linear probe (default: half of the test set)")
    ev.add_argument("--arch", help="model.arch of the checkpoint")
    ev.add_argument("--num-eval", type=int, help="test samples to use")
    ev.add_argument("--image-size", type=int, help="decode size of the test images")
    ev.add_argument("--device", default="cpu")
    _common(ev)
    ev.set_defaults(func=cmd_eval)

    train = sub.add_parser("train", help="pre-train a CLIP with a defense (Ray Train), tracked in MLflow")
    train.add_argument("--quiet", action="store_true", help="no progress bars for data generation")
    _common(train)
    train.set_defaults(func=cmd_train)

    clean = sub.add_parser("clean", help="re-match captions with a checkpoint: cleaned shards, report, summary")
    clean.add_argument("--in", dest="in_path", required=True, help="shard set to clean (folder or s3:// prefix)")
    clean.add_argument("--out", required=True, help="folder or s3:// prefix for the cleaned shards")
    clean.add_argument("--checkpoint", help="state dict saved with torch.save(model.state_dict()) or .safetensors "
                       "(default: model.pretrained, else random init)")
    clean.add_argument("--manifest", help="poison manifest (folder or file): report detection precision / recall")
    clean.add_argument("--arch", help="model.arch of the checkpoint")
    clean.add_argument("--method", choices=("otcclip", "roclip", "none"))
    clean.add_argument("--gate", choices=("none", "margin", "zscore", "neighbour"))
    clean.add_argument("--action", choices=("recaption", "drop", "downweight"))
    _common(clean)
    clean.set_defaults(func=cmd_clean)

    cmp_ = sub.add_parser("compare", help="compare the runs of an MLflow experiment (mean ± std over seeds)")
    cmp_.add_argument("--experiment", help="MLflow experiment (default tracking.experiment)")
    cmp_.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    cmp_.add_argument("--plots", help="folder for the PNG plots (default <output_dir>/compare)")
    cmp_.add_argument("--no-plots", action="store_true")
    cmp_.add_argument("--runs", help="only these runs: comma-separated run names (e.g. the seeds of one setting)")
    _common(cmp_)
    cmp_.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="the main job: poisoned built-in data, none/roclip/otcclip trained and compared")
    demo.add_argument("--defenses", help="comma-separated subset, e.g. none,otcclip")
    _common(demo)
    demo.set_defaults(func=cmd_demo)
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
    except (ConfigError, DatasetMissingError, ShardSetError, ValueError) as e:
        print(f"otc-ray: error: {e}", file=sys.stderr)
        return 2


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
