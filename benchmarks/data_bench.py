"""Data-plane speed: generation (images/s) per built-in data set, and Ray Data read throughput (samples/s)
of the same shards from local disk and from an S3 API on loopback (moto's server).

    .venv/bin/python benchmarks/data_bench.py                 # 20k samples per measurement
    .venv/bin/python benchmarks/data_bench.py --num 2000      # quick

Reads go through the project's own path (read_shards -> decode) and are timed to the last row with
`count_outcomes`; each read is run twice and the second (warm workers) is reported.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")

from otc_ray.config import DataConfig, RayConfig, S3Config  # noqa: E402
from otc_ray.data.make import make_shards  # noqa: E402
from otc_ray.data.ray_io import count_outcomes, load_samples  # noqa: E402
from otc_ray.data.storage import s3_filesystem  # noqa: E402
from otc_ray.pipelines.runtime import init_ray  # noqa: E402

GENERATION = [("shapes", 32), ("shapes", 64), ("fashion", 32), ("fashion", 64), ("fashion-scenes", 64)]


def timed_read(path: str, cfg: DataConfig, expected: int) -> float:
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        counts = count_outcomes(load_samples(path, cfg))
        elapsed = time.perf_counter() - start
        if counts.get("ok") != expected:
            raise RuntimeError(f"read {counts} from {path}, expected {expected} ok")
        best = expected / elapsed
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=20000)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="otc-data-bench-")

    print(f"## generation + shard writing ({args.num} samples, webdataset, png)")
    print(f"{'data set':<16} {'px':>4} {'images/s':>10}")
    for name, size in GENERATION:
        cfg = DataConfig(dataset=name, image_size=size, samples_per_shard=args.shard_size, tint=0.5)
        report = make_shards(cfg, "train", args.num, f"{work}/{name}-{size}", "wds", progress=False)
        print(f"{name:<16} {size:>4} {report.images_per_second:>10.0f}")

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # no per-request lines from the S3 server
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Config(endpoint_url=f"http://{host}:{port}", access_key_id="bench", secret_access_key="bench")
    s3_filesystem(s3).mkdir("bench-bucket")
    init_ray(RayConfig(num_cpus=4, progress_bars=False))

    print(f"\n## Ray Data read + decode, fashion 32 px ({args.num} samples, {args.shard_size} per shard)")
    print(f"{'format':<8} {'storage':<16} {'samples/s':>10}")
    results = {}
    for fmt in ("wds", "parquet"):
        cfg = DataConfig(dataset="fashion", samples_per_shard=args.shard_size, s3=s3)
        local, remote = f"{work}/read-{fmt}", f"s3://bench-bucket/read-{fmt}"
        make_shards(cfg, "train", args.num, local, fmt, progress=False)
        make_shards(cfg, "train", args.num, remote, fmt, progress=False)
        for where, path in (("local", local), ("s3 (loopback)", remote)):
            results[(fmt, where)] = timed_read(path, cfg, args.num)
            print(f"{fmt:<8} {where:<16} {results[(fmt, where)]:>10.0f}")
    for fmt in ("wds", "parquet"):
        print(f"ratio s3/local {fmt}: {results[(fmt, 's3 (loopback)')] / results[(fmt, 'local')]:.2f}")
    server.stop()


if __name__ == "__main__":
    main()
