"""`ray job submit` entry point of the cleaning job (see otc_ray/pipelines/clean.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/clean.py --in s3://bkt/train --out s3://bkt/train_clean --checkpoint s3://bkt/ckpt/model.pt \\
        --config jobs/configs/X.yaml rematch.gate=neighbour

Inside a submitted job `init_ray` joins the cluster (RAY_ADDRESS is set); run directly, it starts a local Ray.
Exit code 0 on success, 2 for a bad request (config, paths, checkpoint), 1 for a failure while cleaning.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the package from --working-dir, uninstalled

from otc_ray.config import ConfigError, load_config  # noqa: E402
from otc_ray.data.shards import ShardSetError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="otc-ray cleaning job")
    parser.add_argument("--in", dest="in_path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--manifest")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from otc_ray.pipelines.clean import clean_shards
        from otc_ray.pipelines.runtime import init_ray

        init_ray(cfg.ray)
        summary = clean_shards(args.in_path, args.out, cfg, checkpoint=args.checkpoint, manifest=args.manifest)
    except (ConfigError, ShardSetError, ValueError) as e:
        print(f"clean: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
