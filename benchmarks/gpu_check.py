"""GPU check: OTCCLIP trains on one GPU in bf16, the re-match stage runs on a GPU actor, and the OT kernel's time
per pair on the GPU against the CPU; one table. `benchmarks/gpu_check.sh` sets up the environment and calls this.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py            # on a machine with one CUDA GPU (< 5 min)
    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py --cpu      # the same parts on the CPU (a dry run)

Parts, each timed (wall) and marked ok / FAILED (a failed part does not stop the others; the exit status is 1 when
any failed):
  1. train   `run_training` of the demo's config (otc_ray/configs/demo.yaml) on the built-in synthetic shapes
             (no data set to fetch: the GPU machine may be offline), cut to --train-pairs pairs,
             one epoch, defense otcclip (witness warm-up, re-matching, OT losses), `train.use_gpu=true`,
             `model.precision=bf16` (torch.autocast on the worker's device); the re-match actors of training stay
             on the CPU (the one GPU is the Train worker's).
  2. rematch `clean_shards` of the same poisoned set with the trained checkpoint, `rematch.actor_num_gpus=1`
             (the stage's actor on the GPU, once training has released it), with detection against the manifest.
  3. ot      `otc_ray.ot.ot_distance` on --ot-pairs token-set pairs (M=64 patches, L=32 words, d=128, 50
             Sinkhorn iterations, the config's eps): microseconds per pair on the CPU and on the GPU (CUDA
             synchronised; best of --reps after a warm-up), and the ratio.
With --cpu: no GPU is asked for (use_gpu false, actor_num_gpus 0; still bf16 autocast, on the CPU) and the sizes
shrink, so every code path but the device runs here in a few minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "otc_ray" / "configs" / "demo.yaml"


def ot_problems(P: int, M: int, L: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (P, M, d) patch-like and y (P, L, d) caption-like unit token sets, y_mask (P, L) with 4..L real tokens."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(P, 1, d, generator=g)
    x = F.normalize(centre + 1.5 * torch.randn(P, M, d, generator=g), dim=-1)
    y = F.normalize(centre + 1.5 * torch.randn(P, L, d, generator=g), dim=-1)
    mask = torch.arange(L) < torch.randint(4, L + 1, (P, 1), generator=g)
    return x, y, mask


def ot_us_per_pair(device: str, P: int, eps: float, iters: int, reps: int) -> float:
    """Best-of-`reps` wall microseconds per pair of `ot_distance` on `device` (after one warm-up call)."""
    from otc_ray.ot import ot_distance

    x, y, my = (t.to(device) for t in ot_problems(P, 64, 32, 128))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for i in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            ot_distance(x, y, None, my, eps=eps, iters=iters)
        sync()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best / P * 1e6


def part(rows: list[tuple[str, str, str, str]], name: str, fn: Callable[[], tuple[str, str]]) -> None:
    """Run one part; append (name, ok / FAILED, seconds, detail) to rows."""
    t0 = time.perf_counter()
    try:
        status, detail = "ok", " ".join(fn())
    except Exception as e:      # a failed part is reported in the table, the others still run
        traceback.print_exc()
        status, detail = "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    rows.append((name, status, f"{time.perf_counter() - t0:.1f}", detail))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (no GPU asked for, small sizes)")
    parser.add_argument("--train-pairs", type=int, help="training pairs (default 2048; --cpu 640)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16",
                        help="model.precision (torch.autocast on the worker's and the actor's device; CPU autocast "
                             "runs bf16 too, so --cpu checks the same path)")
    parser.add_argument("--ot-pairs", type=int, help="OT problems timed (default 8192; --cpu 256)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out-dir", help="runs and data (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    train_pairs = args.train_pairs or (640 if args.cpu else 2048)
    ot_pairs = args.ot_pairs or (256 if args.cpu else 8192)
    precision = args.precision
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "use --cpu for a dry run", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.path.insert(0, str(ROOT))

    import ray

    from otc_ray.config import load_config, replace
    from otc_ray.pipelines.clean import clean_shards
    from otc_ray.pipelines.prepare import prepare_data
    from otc_ray.pipelines.runtime import init_ray
    from otc_ray.pipelines.train import run_training
    from otc_ray.track import metric_names

    tmp = tempfile.TemporaryDirectory(prefix="otc-gpu-check-") if not args.out_dir else None
    out = Path(args.out_dir or tmp.name)
    batch = 128
    steps = max(2, train_pairs // batch)
    cfg = load_config(DEMO, [
        "name=gpu-check", f"output_dir={out}", "tracking.experiment=otc-ray-gpu-check",
        "data.dataset=shapes", "poison.target=circle", "poison.adversarial=square", f"data.num_train={train_pairs}", "data.num_test=256", "data.samples_per_shard=256",
        "poison.count=32", "poison.targets=2", "poison.per_target=8",
        "train.defense=otcclip", "train.epochs=1", f"train.batch_size={batch}", "train.warmup_steps=2",
        f"train.use_gpu={str(gpu).lower()}", f"model.precision={precision}",
        f"rematch.warmup_steps={min(4, steps)}", "rematch.publish_every=2", "rematch.block_size=256",
        "rematch.bank_size=512", "eval.num_eval=256", "eval.linear_probe_train=128",
        "ray.progress_bars=false", "ray.worker_logs=false",
    ])
    device = torch.cuda.get_device_name(0) if gpu else "cpu (--cpu dry run)"
    print(f"gpu_check: device {device}; torch {torch.__version__}; {train_pairs} pairs, precision {precision}",
          flush=True)
    init_ray(cfg.ray)
    if gpu and ray.cluster_resources().get("GPU", 0) < 1:
        print(f"gpu_check: Ray sees no GPU ({ray.cluster_resources()}); Train would wait forever", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str, str]] = []
    trained: dict[str, str] = {}

    def train() -> tuple[str, ...]:
        res = run_training(cfg, progress=False)
        if not res.checkpoint:
            raise RuntimeError("training finished without a checkpoint")
        trained["model"] = str(Path(res.checkpoint) / "model.pt")
        m = res.metrics
        return (f"use_gpu={gpu} {precision}, {steps} steps + witness:",
                f"{m.get(metric_names.TRAIN_SAMPLES_PER_S_WORKER, float('nan')):.0f} samples/s,",
                f"zero-shot {m.get(metric_names.FINAL_ZEROSHOT_TOP1, float('nan')):.3f},",
                f"re-matched {m.get(metric_names.REMATCH_FLAG_RATE, float('nan')):.3f} flag rate")

    def rematch() -> tuple[str, ...]:
        if "model" not in trained:
            raise RuntimeError("no trained checkpoint (part train failed)")
        data = prepare_data(cfg, progress=False)      # cached by content hash: the set training used
        clean_cfg = replace(cfg, rematch__actor_num_gpus=1.0 if gpu else 0.0, rematch__max_actors=1)
        s = clean_shards(data.train, str(out / "cleaned"), clean_cfg, checkpoint=trained["model"],
                         manifest=data.manifest)
        det = s.detection or {}
        return (f"actor_num_gpus={clean_cfg.rematch.actor_num_gpus:g}: {s.total} pairs,",
                f"{s.total / max(s.seconds, 1e-9):.0f} pairs/s, flagged {s.flagged},",
                f"recall {det.get('detect_recall', float('nan')):.2f}")

    ot_us: dict[str, float] = {}

    def ot() -> tuple[str, ...]:
        ot_us["cpu"] = ot_us_per_pair("cpu", ot_pairs, cfg.ot.eps, cfg.ot.iters, args.reps)
        if not gpu:
            return (f"{ot_pairs} pairs, M=64 L=32 d=128, {cfg.ot.iters} iters: cpu {ot_us['cpu']:.1f} us/pair,",
                    "gpu not run (--cpu)")
        ot_us["gpu"] = ot_us_per_pair("cuda", ot_pairs, cfg.ot.eps, cfg.ot.iters, args.reps)
        return (f"{ot_pairs} pairs, M=64 L=32 d=128, {cfg.ot.iters} iters: cpu {ot_us['cpu']:.1f} us/pair,",
                f"gpu {ot_us['gpu']:.2f} us/pair, {ot_us['cpu'] / ot_us['gpu']:.0f}x")

    try:
        part(rows, "train", train)
        part(rows, "rematch", rematch)
        part(rows, "ot", ot)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    print(f"\ngpu_check on {device}")
    print(f"{'part':<9}{'status':<8}{'seconds':>8}  detail")
    for name, status, secs, detail in rows:
        print(f"{name:<9}{status:<8}{secs:>8}  {detail}")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
