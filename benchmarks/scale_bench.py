"""Cost as the data grows: the clean job and the training stream over shard sets of growing size (synthetic shapes),
samples/s, CPU per sample and peak memory (RSS) of every process that takes part, one table.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/scale_bench.py --sizes 5000,50000          # ~15 min on 2 cores
    PYTHONPATH=$PWD .venv/bin/python benchmarks/scale_bench.py --sizes 500000 --jobs stream --json runs/scale.jsonl

For each size N a shapes shard set (32 px, `data make`, 1000 per shard) is made once under --data-dir (the time is
printed: generation is part of what scales), then:
  clean   `clean_shards` (otc_ray/pipelines/clean.py) with a seeded random-init model (no checkpoint), the config's
          re-match defaults (evidence gate, sticky flags, trigger propagation, bank pool): read -> decode -> the
          re-matching actor -> a write task per shard -> the report, collected by the driver.
  stream  what a training run consumes: read -> decode -> the re-match stage with a published (active) weight
          store and a journalled flag store -> `iter_batches(128)` in the driver (no model step: the stream alone).
A sampler thread reads, every 0.5 s, every process descended from this driver (/proc: title, VmHWM = peak RSS,
utime + stime), sorted into roles by title: the flag store (which also holds the reference sample of pixel grids and
writes the journal), the weight store, the re-matching actor (its model, the caption bank and the duplicate test's
pixel signatures of the bank), read / decode / write tasks, Ray's own processes, and the driver. Per role: the
largest peak RSS of one process, and the CPU seconds per 1,000 samples summed over its processes. The flag journal's
bytes and the store's key count are read at the end. Wall-clock samples/s on a shared machine are noisy; CPU per
sample is the steady figure.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
ROLES = (("flag store", "FlagStore"), ("weight store", "WeightStore"), ("re-match actor", "RematchActor"),
         ("write tasks", "write_batch"), ("decode tasks", "decode_batch"), ("read tasks", "ReadShard"),
         ("ray: raylet/gcs", "raylet"), ("ray: raylet/gcs", "gcs_server"))


def role_of(title: str, pid: int) -> str:
    """The role of a process from its title (Ray sets `ray::<actor or task>`)."""
    if pid == os.getpid():
        return "driver"
    for role, needle in ROLES:
        if needle in title:
            return role
    return "ray: other workers" if title.startswith("ray::") or "default_worker" in title else "ray: other"


def descendants(root: int) -> list[int]:
    """Pids of every live process below `root` (from /proc/*/stat parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def proc_sample(pid: int) -> tuple[str, int, float] | None:
    """(title, peak RSS bytes (VmHWM), CPU seconds (utime + stime)) of a live process, None when it is gone."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        hwm = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return title, hwm, (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, StopIteration, IndexError, ValueError):
        return None


class ProcessSampler:
    """Every `period` s: peak RSS and CPU seconds of each process of this driver's tree (the driver included),
    kept per pid (the last reading of a process that exits counts). `by_role()` sums them up per role."""

    def __init__(self, period: float = 0.5):
        self.period = period
        self.seen: dict[int, tuple[str, int, float]] = {}
        self.base: dict[int, float] = {}           # CPU seconds of processes already alive at start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        for pid in [os.getpid(), *descendants(os.getpid())]:
            s = proc_sample(pid)
            if s is not None:
                self.seen[pid] = s

    def _run(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.period)

    def __enter__(self) -> "ProcessSampler":
        self._read()
        self.base = {pid: cpu for pid, (_, _, cpu) in self.seen.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    def by_role(self) -> dict[str, tuple[int, float]]:
        """role -> (largest peak RSS of one process (bytes), CPU seconds used during the run, summed)."""
        out: dict[str, tuple[int, float]] = {}
        for pid, (title, hwm, cpu) in self.seen.items():
            role = role_of(title, pid)
            peak, used = out.get(role, (0, 0.0))
            out[role] = (max(peak, hwm), used + cpu - self.base.get(pid, 0.0))
        return out


def make_set(n: int, root: Path) -> tuple[str, float]:
    """A shapes shard set of n pairs under root (made once); (path, seconds it took, 0 when reused)."""
    from otc_ray.config import DataConfig
    from otc_ray.data.make import make_shards

    path = root / f"shapes-{n}"
    info = path / "_info.json"
    if info.is_file() and json.loads(info.read_text()).get("num_samples") == n:
        return str(path), 0.0
    t0 = time.perf_counter()
    make_shards(DataConfig(dataset="shapes", samples_per_shard=1000), "train", n, str(path), "wds", progress=False)
    return str(path), time.perf_counter() - t0


def run_clean(path: str, cfg, out: Path) -> dict[str, float]:
    """The clean job over the shard set at `path` into `out`; {"rows", "flagged"}."""
    from otc_ray.pipelines.clean import clean_shards

    s = clean_shards(path, str(out), cfg)
    return {"rows": s.total, "flagged": s.flagged}


def run_stream(path: str, cfg, out: Path) -> dict[str, float]:
    """The training stream over `path`, consumed in batches of 128 by this driver; {"rows", "flagged",
    "store_keys", "journal_bytes"} (journal and weight store under / named after `out`)."""
    import ray
    import torch

    from otc_ray.data.ray_io import load_samples
    from otc_ray.model import build_model
    from otc_ray.rematch.flags import flag_store
    from otc_ray.rematch.stage import add_rematch_stage
    from otc_ray.rematch.trigger import PropagateConfig
    from otc_ray.rematch.weights import publish, weight_store

    torch.manual_seed(cfg.rematch.seed)
    store = weight_store(f"scale-{out.name}")
    publish(store, build_model(cfg.model).model.state_dict(), active=True)
    journal = out / "flags.txt"
    flags = flag_store(journal=str(journal), reference=cfg.rematch.propagate_reference,
                       propagate=PropagateConfig())
    ds = add_rematch_stage(load_samples(path, cfg.data), cfg.rematch, cfg.model, cfg.ot, weights=store, flags=flags)
    rows = flagged = 0
    for batch in ds.iter_batches(batch_size=128, batch_format="numpy"):
        rows += len(batch["key"])
        flagged += int(batch["flagged"].sum())
    keys = ray.get(flags.size.remote())
    ray.kill(store)
    ray.kill(flags)
    return {"rows": rows, "flagged": flagged, "store_keys": keys, "journal_bytes": journal.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--jobs", default="clean,stream")
    parser.add_argument("--data-dir", default=str(ROOT / "runs" / "scale-bench"))
    parser.add_argument("--arch", default="otc-tiny-vit-32")
    parser.add_argument("--json", help="append one JSON line per (size, job) to this file; the table then covers "
                                       "every line of it (sizes measured in separate invocations)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rematch.max_actors=1")
    args = parser.parse_args(argv)

    import ray

    from otc_ray.config import load_config
    from otc_ray.pipelines.runtime import init_ray

    cfg = load_config(None, ["data.dataset=shapes", "data.samples_per_shard=1000", f"model.arch={args.arch}",
                             "ray.progress_bars=false", "ray.worker_logs=false", *args.overrides])
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        path, made_s = make_set(n, data_dir)
        print(f"N={n}: shard set {path} ({'made in %.0f s, %.0f pairs/s' % (made_s, n / made_s) if made_s else 'reused'})",
              flush=True)
        for job in args.jobs.split(","):
            with tempfile.TemporaryDirectory(dir=data_dir, prefix=f"{job}-{n}-") as tmp:
                t0 = time.perf_counter()
                with ProcessSampler() as sampler:
                    extra = (run_clean if job == "clean" else run_stream)(path, cfg, Path(tmp) / "out")
                wall = time.perf_counter() - t0
            roles = sampler.by_role()
            cpu = sum(c for _, c in roles.values())
            row = {"n": n, "job": job, "wall_s": wall, "samples_per_s": extra["rows"] / wall,
                   "cpu_ms_per_sample": cpu / extra["rows"] * 1e3, **extra,
                   "roles": {r: {"peak_rss_mb": p / 2**20, "cpu_s_per_1k": c / extra["rows"] * 1e3}
                             for r, (p, c) in sorted(roles.items())}}
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    ray.shutdown()
    if args.json:       # every run recorded there (earlier sizes too): one table over all of them
        results = [json.loads(line) for line in Path(args.json).read_text().splitlines() if line.strip()]
    print_table(sorted(results, key=lambda r: r["n"]))


def print_table(results: list[dict]) -> None:
    """Per job: one column per size; rows: samples/s, CPU ms/sample, then per role peak RSS MB (CPU s / 1k)."""
    for job in dict.fromkeys(r["job"] for r in results):
        rs = [r for r in results if r["job"] == job]
        sizes = [r["n"] for r in rs]
        print(f"\n{job}: " + ", ".join(f"N={n}" for n in sizes))
        head = f"{'':<22}" + "".join(f"{n:>22}" for n in sizes)
        print(head)
        print(f"{'samples/s (wall)':<22}" + "".join(f"{r['samples_per_s']:>22.0f}" for r in rs))
        print(f"{'CPU ms / sample':<22}" + "".join(f"{r['cpu_ms_per_sample']:>22.2f}" for r in rs))
        print(f"{'flagged':<22}" + "".join(f"{r['flagged']:>22}" for r in rs))
        if "journal_bytes" in rs[0]:
            print(f"{'journal bytes':<22}" + "".join(f"{r['journal_bytes']:>22}" for r in rs))
        roles = sorted({k for r in rs for k in r["roles"]})
        print("peak RSS MB (CPU s per 1k samples)")
        for role in roles:
            cells = []
            for r in rs:
                v = r["roles"].get(role)
                cells.append(f"{v['peak_rss_mb']:.0f} ({v['cpu_s_per_1k']:.2f})" if v else "-")
            print(f"  {role:<20}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
