"""One CLI: `otc-ray data make|inspect`, `otc-ray demo` (more stages register here as they land).

Every command takes `--config FILE` and trailing `key.sub=value` overrides (see otc_ray.config); flags
of a command are shorthands for config keys. Errors in input or config print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config
from .data.builtin import BUILTIN_DATASETS, DatasetMissingError
from .data.shards import ShardSetError


def _config(args: argparse.Namespace, **flag_overrides) -> Config:
    """Config file + flag shorthands + trailing overrides (the trailing ones win)."""
    flags = [f"{k}={v}" for k, v in flag_overrides.items() if v is not None]
    return load_config(args.config, flags + list(args.overrides))


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
    from .runtime import init_ray

    cfg = _config(args, **{"data.image_size": args.image_size})
    init_ray(cfg.ray)
    sheet = args.sheet or str(Path(cfg.output_dir) / "inspect" / f"{Path(args.path.rstrip('/')).name}_sheet.png")
    report = inspect_shards(args.path, cfg.data, sheet_path=None if args.no_sheet else sheet)
    print("\n".join(report.lines()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job as it stands: build a built-in data set as shards, then inspect it through Ray Data."""
    from .data.inspect import inspect_shards
    from .data.make import make_shards
    from .runtime import init_ray

    cfg = _config(args)
    out = Path(cfg.output_dir) / "demo"
    made = make_shards(cfg.data, "train", cfg.data.num_train, str(out / "train"), "wds")
    print(f"wrote {made.num_samples} {cfg.data.dataset} samples to {made.out} ({made.images_per_second:.0f} images/s)")
    init_ray(cfg.ray)
    report = inspect_shards(str(out / "train"), cfg.data, sheet_path=str(out / "train_sheet.png"))
    print("\n".join(report.lines()))
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
    _common(insp)
    insp.set_defaults(func=cmd_data_inspect)

    demo = sub.add_parser("demo", help="the main job on built-in data with local Ray")
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


if __name__ == "__main__":
    sys.exit(main())
