"""Re-matching speed and memory: the Ray Data stage for methods none / roclip / otcclip at block sizes 512 and 2048
(k = 8, tiny model, built-in shapes data made on the fly), the otcclip/roclip throughput ratio, and peak memory
as the number of input shards grows 8x (a streaming stage must stay flat).

    .venv/bin/python benchmarks/rematch_bench.py --quick       # ~5 min on 2 cores
    .venv/bin/python benchmarks/rematch_bench.py               # larger runs (~20 min)

Measured:
  * stage samples/s: read -> decode -> re-matching actor pool -> rows consumed by the driver, on a fixed pool of
    2 actors of 1 CPU and 1 torch thread each, local Ray with 4 logical CPUs. "end-to-end" is rows / wall time,
    actor start-up (process, torch import, model build) included; "pool" is rows / (the actors' summed remote
    wall time in the stage, from Ray Data's stats, / 2 actors): the pool's rate while busy. "first s" is the time
    to the first batch at the driver. Defaults otherwise: gate evidence, bank 2048, OT eps 0.05 / 50 iters.
  * matcher samples/s: `Matcher.match` alone in this process on one torch thread (no Ray), after a warm-up
    block: what one actor does per second once started. The machine is shared: the load average is printed.
  * memory: a sampler thread reads, every 0.2 s, the RSS (/proc/<pid>/status VmRSS) of every process descended
    from this driver whose title is the re-matching actor's (`ray::MapWorker(MapBatches(RematchActor))`), summed,
    and the object store's bytes in use (Ray's `ray_object_store_memory` system metric, shared memory plus its disk
    fallback, read from the node's Prometheus endpoint and reported every 0.2 s here); the table gives
    the peak of each, of the largest single actor and of actors + store. Each run starts once the previous run's
    actors have exited.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_metrics_report_interval_ms", "200")     # store metrics as fresh as the sampler reads them

import numpy as np  # noqa: E402
import torch  # noqa: E402

from otc_ray.config import DataConfig, ModelConfig, OTConfig, RayConfig, RematchConfig  # noqa: E402
from otc_ray.data.make import make_shards  # noqa: E402
from otc_ray.data.ray_io import load_samples  # noqa: E402
from otc_ray.pipelines.runtime import init_ray  # noqa: E402

# each method's re-match settings over the base: off, RoCLIP's (cosine only, every image), OTCCLIP's (the default)
METHODS = {"none": {"enabled": False}, "roclip": {"alpha": 1.0, "gate": "none"}, "otcclip": {}}
BLOCKS = (512, 2048)
ACTOR_TITLE = "ray::MapWorker(MapBatches(RematchActor"


# ----------------------------------------------------------------------------------------- memory
def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            out.append(c)
            todo.append(c)
    return out


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _actor_pids() -> list[int]:
    """Live re-matching actor processes descended from this driver."""
    out = []
    for pid in _descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith(ACTOR_TITLE):
            out.append(pid)
    return out


def _actor_rss() -> list[int]:
    """RSS in bytes of each live re-matching actor process descended from this driver."""
    return [_rss_bytes(pid) for pid in _actor_pids()]


def _wait_for_actors_to_exit(timeout: float = 60.0) -> None:
    """The previous run's actors exit lazily: wait, so that one run's peak never counts another's actors."""
    deadline = time.monotonic() + timeout
    while _actor_pids() and time.monotonic() < deadline:
        time.sleep(0.5)


def _metrics_url() -> str:
    """The Prometheus endpoint of the node this driver runs on (public `ray.nodes()` fields)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == here)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _store_bytes(url: str) -> int:
    """Bytes held by the node's object store (locations MMAP_SHM and MMAP_DISK of `ray_object_store_memory`) as
    of the raylet's last metrics report."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_object_store_memory{")
                   and ('Location="MMAP_SHM"' in line or 'Location="MMAP_DISK"' in line)))


class MemorySampler:
    """Peaks of the summed actor RSS, the largest single actor RSS, object store bytes and actors + store,
    sampled every `period` s in a thread."""

    def __init__(self, period: float = 0.2):
        self.period, self.actors, self.one_actor, self.store, self.total = period, 0, 0, 0, 0
        self.url = _metrics_url()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, s = _actor_rss(), _store_bytes(self.url)
            a = sum(rss)
            self.actors, self.store, self.total = max(self.actors, a), max(self.store, s), max(self.total, a + s)
            self.one_actor = max([self.one_actor, *rss])
            self._stop.wait(self.period)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------- runs
def run_stage(path: str, data: DataConfig, cfg: RematchConfig) -> dict:
    """One pass of the stage over the shard set at `path`: rows, seconds, samples/s and memory peaks."""
    from otc_ray.rematch.stage import add_rematch_stage

    _wait_for_actors_to_exit()
    start = time.perf_counter()
    first_at, rows = None, 0
    with MemorySampler() as mem:
        ds = add_rematch_stage(load_samples(path, data), cfg, ModelConfig(), OTConfig())
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows += len(batch["key"])
            first_at = first_at or time.perf_counter()
    end = time.perf_counter()
    busy = _actor_busy_seconds(ds)
    pool = rows * cfg.max_actors / busy if busy else float("nan")
    return {"rows": rows, "seconds": end - start, "rate": rows / (end - start), "pool": pool,
            "first": (first_at or end) - start, "actors_mb": mem.actors / 2**20, "one_mb": mem.one_actor / 2**20,
            "store_mb": mem.store / 2**20, "total_mb": mem.total / 2**20}


def _actor_busy_seconds(ds) -> float:
    """Summed remote wall time of the re-matching operator's tasks (Ray Data's stats summary; 0 if absent)."""
    todo, total = [ds._get_stats_summary()], 0.0
    while todo:
        summary = todo.pop()
        todo.extend(summary.parents)
        for op in summary.operators_stats:
            if "RematchActor" in op.operator_name and op.wall_time is not None:
                total += op.wall_time.sum
    return total


def run_matcher(images: np.ndarray, captions: list[str], keys: list[str], cfg: RematchConfig) -> float:
    """Samples/s of Matcher.match in this process (1 torch thread) over whole blocks, after a 64-sample warm-up."""
    from otc_ray.model import build_model
    from otc_ray.rematch.matcher import Matcher

    torch.manual_seed(0)
    m = Matcher(build_model(ModelConfig()), cfg, OTConfig())
    m.match(images[:64], captions[:64], [f"warm{k}" for k in keys[:64]])
    B = cfg.block_size
    start, done = time.perf_counter(), 0
    for s in range(0, len(captions) - B + 1, B):
        m.match(images[s:s + B], captions[s:s + B], keys[s:s + B])
        done += B
    return done / (time.perf_counter() - start)


def _block_of(n: int):
    from otc_ray.data.builtin import generate

    imgs, caps, keys = [], [], []
    for chunk in generate("shapes", "train", n, seed=1, image_size=32):
        imgs.append(np.stack(chunk["images"]))
        caps += list(chunk["captions"])
        keys += list(chunk["keys"])
    return np.concatenate(imgs), caps, keys


def throughput(args, num: int, shard: int, work: str, data: DataConfig, base: RematchConfig) -> None:
    make_shards(data, "train", num, f"{work}/tp", "wds", progress=False)
    print(f"\n## stage throughput ({num} samples, {-(-num // shard)} shards, 2 actors)")
    print(f"{'method':<8} {'block':>6} {'end-to-end/s':>13} {'first s':>8} {'pool/s':>7} {'matcher/s':>10} "
          f"{'actors MB':>10} {'store MB':>9}")
    stage, kernel = {}, {}
    images, captions, keys = _block_of(2048 if args.quick else 8192)
    for block in BLOCKS:
        for method in METHODS:
            cfg = dataclasses.replace(base, **METHODS[method], block_size=block)
            r = run_stage(f"{work}/tp", data, cfg)
            if r["rows"] != num:
                raise RuntimeError(f"{method}/{block}: the stage returned {r['rows']} rows, expected {num}")
            stage[(method, block)] = r
            kernel[(method, block)] = run_matcher(images, captions, keys, cfg) if method != "none" else float("nan")
            km = "-" if method == "none" else f"{kernel[(method, block)]:.0f}"
            print(f"{method:<8} {block:>6} {r['rate']:>13.0f} {r['first']:>8.1f} {r['pool']:>7.0f} {km:>10} "
                  f"{r['actors_mb']:>10.0f} {r['store_mb']:>9.0f}", flush=True)
    for block in BLOCKS:
        e = stage[("otcclip", block)]["rate"] / stage[("roclip", block)]["rate"]
        p = stage[("otcclip", block)]["pool"] / stage[("roclip", block)]["pool"]
        k = kernel[("otcclip", block)] / kernel[("roclip", block)]
        verdict = "meets" if min(p, k) >= 0.5 else "MISSES"
        print(f"otcclip/roclip at block {block}: end-to-end {e:.2f}, pool {p:.2f}, matcher {k:.2f}  "
              f"({verdict} the >= 0.5 target on pool and matcher)")


def memory(args, work: str, data: DataConfig, base: RematchConfig) -> None:
    mem_shards = 8
    mem_block = 256 if args.quick else 512
    mem_data = dataclasses.replace(data, samples_per_shard=128 if args.quick else 1000)
    print(f"\n## peak memory as input shards grow 8x (otcclip, block {mem_block}, bank {args.mem_bank}, "
          f"{mem_data.samples_per_shard} samples per shard, 2 actors)")
    print(f"{'shards':>7} {'samples':>8} {'samples/s':>10} {'actors MB':>10} {'1 actor MB':>11} {'store MB':>9} "
          f"{'actors+store MB':>16}")
    peaks = []
    for n_shards in (mem_shards, 8 * mem_shards):
        path = f"{work}/mem{n_shards}"
        make_shards(mem_data, "train", n_shards * mem_data.samples_per_shard, path, "wds", progress=False)
        r = run_stage(path, mem_data, dataclasses.replace(base, block_size=mem_block,
                                                          bank_size=args.mem_bank))
        peaks.append(r)
        print(f"{n_shards:>7} {r['rows']:>8} {r['rate']:>10.0f} {r['actors_mb']:>10.0f} {r['one_mb']:>11.0f} "
              f"{r['store_mb']:>9.0f} {r['total_mb']:>16.0f}", flush=True)
    growth = peaks[1]["total_mb"] / peaks[0]["total_mb"] - 1
    one = peaks[1]["one_mb"] / peaks[0]["one_mb"] - 1
    print(f"peak memory growth for 8x the shards: actors+store {growth:+.1%}, largest actor {one:+.1%}  "
          f"({'meets' if growth <= 0.15 else 'MISSES'} the <= 15% target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a few minutes on 2 cores)")
    parser.add_argument("--num", type=int, help="samples per throughput run (default 16384, quick 4096)")
    parser.add_argument("--only", choices=("throughput", "memory"), help="run one of the two parts")
    parser.add_argument("--mem-bank", type=int, default=RematchConfig().bank_size,
                        help="bank size of the memory runs (the FIFO bank fills during the first bank_size samples "
                             "an actor sees: a bounded warm-up, not growth)")
    args = parser.parse_args()
    num = args.num or (4096 if args.quick else 16384)
    shard = 256 if args.quick else 1000
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="otc-rematch-bench-")
    data = DataConfig(dataset="shapes", samples_per_shard=shard)
    base = RematchConfig(k=8, min_actors=2, max_actors=2, actor_num_cpus=1.0)

    print(f"# re-matching benchmark: shapes 32 px, tiny model otc-tiny-vit-32, k = 8, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    init_ray(RayConfig(num_cpus=4, object_store_mb=2048, progress_bars=False))

    if args.only != "memory":
        throughput(args, num, shard, work, data, base)
    if args.only != "throughput":
        memory(args, work, data, base)


if __name__ == "__main__":
    main()
