"""Where a training run's time goes: `none` and `otcclip` at the demo's size, side by side, with the compute floor.

    python benchmarks/time_breakdown.py            # the demo config (5,000 fashion pairs, 5 epochs)
    python benchmarks/time_breakdown.py --quick    # 1 epoch each (< 10 minutes on 2 idle cores)
    python benchmarks/time_breakdown.py --quick --runs none,otcclip,otcclip:fast-otcclip   # + a variant's run

A run is a defense, or DEFENSE:VARIANT: the defense with the overrides of benchmarks/variants/VARIANT.yaml.

Each defense trains in a child process (`otc_ray.pipelines.train.run_training` on `otc_ray/configs/demo.yaml`,
2 torch threads) whose whole process tree (Ray's daemons and workers included) is reaped here, so its CPU
seconds are exact (`proc_cpu.run_tree`). The run's own phase timers give the breakdown: the driver's start-up
phases (`time/driver/*`: Ray, data preparation, counting rows, test-set decode, MLflow, streams), the Train
worker's (`time/worker/*`: set-up, waiting for data, batch to tensors, forward + loss, backward, optimizer,
publishing weights to the re-match stage, evaluation, checkpoint, logging, the witness warm-up) and the time to
the first optimizer step. Inside forward + loss, the share of the second view and of the OT losses is measured
in this process on one batch (`step_split`). Everything the trainer did not time itself (Ray Data decode and the
re-match stage in their own processes, Ray's daemons) is in the tree's CPU beyond the driver and the worker.

The compute floor: the model's FLOPs per trained sample (forward + backward of L_clip, counted with
torch.utils.flop_counter) against the fp32 matmul throughput of this machine at 2 threads; the bf16 floor beside it
is the same FLOPs against bf16 matmul (a run at `model.precision: bf16`, the variant `bf16`, autocasts to it).
Results: benchmarks/results/time_breakdown.md and .json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFENSES = ("none", "otcclip")      # the default runs; the ratios are each run's over `none`
CONFIG = ROOT / "otc_ray" / "configs" / "demo.yaml"
THREADS = 2


RUN_STAMP = time.strftime("%Y%m%d-%H%M%S")
EXTRA: list[str] = []       # --set key=value overrides (smoke tests at a smaller size)


def _variant_overrides(spec: str) -> list[str]:
    """DEFENSE or DEFENSE:VARIANT -> key=value overrides: the defense, and the variant file's settings."""
    defense, _, variant = spec.partition(":")
    if not variant:
        return [f"train.defense={defense}"]
    from defense_bench import load_variant

    return [f"train.defense={defense}"] + [f"{k}={v}" for k, v in load_variant(variant).items()]


def _overrides(spec: str, epochs: int, out: str) -> list[str]:
    name = spec.replace(":", "-")
    return EXTRA + _variant_overrides(spec) + [
        f"train.epochs={epochs}", f"output_dir={out}",
        f"name=breakdown-{name}-{RUN_STAMP}",   # a new run each time: the same name would resume the last one
        f"train.torch_threads={THREADS}", "tracking.experiment=time-breakdown"]


def child_run(defense: str, epochs: int, out: str, result_path: str) -> None:
    """In the child: one training run; writes its phase timers and metrics as JSON."""
    t0 = time.time()
    from otc_ray.config import load_config
    from otc_ray.pipelines.train import run_training
    imported = time.time()
    cfg = load_config(str(CONFIG), _overrides(defense, epochs, out))
    result = run_training(cfg, progress=False)
    import ray
    ray.shutdown()
    Path(result_path).write_text(json.dumps({
        "python_start_unix": t0, "imports_s": imported - t0, "seconds": result.seconds, "phases": result.phases,
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}))


def child_prepare(out: str) -> None:
    """In the child: generate and poison the demo's shard sets once (cached under `out`), so runs time no build."""
    from otc_ray.config import load_config
    from otc_ray.pipelines.prepare import prepare_data

    prepare_data(load_config(str(CONFIG), _overrides("none", 1, out)), progress=False)


# ----------------------------------------------------------------------------------------- in-process parts
def matmul_gflops(threads: int = THREADS, n: int = 1024, reps: int = 20, dtype: str = "fp32") -> dict[str, float]:
    """(n x n) @ (n x n) throughput in `dtype` (fp32 or bf16) at `threads` threads: per wall second (best of 3)
    and per CPU second."""
    import torch

    torch.set_num_threads(threads)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
    for _ in range(3):
        a @ b
    best_wall, best_cpu = math.inf, math.inf
    for _ in range(3):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b
        best_wall, best_cpu = min(best_wall, time.perf_counter() - w), min(best_cpu, time.process_time() - c)
    flops = 2 * n ** 3 * reps
    return {"gflops_per_wall_s": flops / best_wall / 1e9, "gflops_per_cpu_s": flops / best_cpu / 1e9}


def step_split(specs: tuple[str, ...] = DEFENSES, reps: int = 5) -> dict:
    """Per-sample FLOPs of a training step and, for each run (DEFENSE[:VARIANT]), the CPU seconds of one batch's
    parts (min over `reps` after a warm-up): forward, second view, L_clip, the OT losses, backward, optimizer."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from otc_ray import identity
    from otc_ray.config import load_config
    from otc_ray.losses import clip_loss, combine_losses, duplicate_pairs, ot_inter_loss, ot_intra_loss
    from otc_ray.model import FeatureModel, build_model, images_to_tensor
    from otc_ray.train.defenses import _view
    from otc_ray.train.loop import _optimizer

    torch.set_num_threads(THREADS)
    cfg = load_config(str(CONFIG), EXTRA)          # the runs' --set overrides
    configs = {spec: load_config(str(CONFIG), EXTRA + _variant_overrides(spec)) for spec in specs}
    bundle = build_model(cfg.model)
    model = bundle.model
    fm = FeatureModel(model, cfg.ot.special_tokens)
    opt = _optimizer(model, cfg)                    # the training loop's AdamW
    B, S = cfg.train.batch_size, bundle.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (B, S, S, 3), dtype=np.uint8)
    captions = [f"a photo of a {w} number {i}" for i, w in zip(range(B), ["sneaker", "bag", "shirt", "coat"] * B)]
    gen = torch.Generator().manual_seed(0)

    def one(spec: str, parts: dict) -> None:
        cfg = configs[spec]

        def timed(name, fn):
            c = time.process_time()
            out = fn()
            parts[name] = parts.get(name, 0.0) + time.process_time() - c
            return out
        px = timed("batch_to_tensors", lambda: images_to_tensor(images, S))
        ids = timed("batch_to_tensors", lambda: bundle.tokenizer(captions))
        content = timed("batch_to_tensors", lambda: torch.stack([identity.text_ids(captions),
                                                                  identity.image_ids(images)], 1))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.model.precision == "bf16")
        with autocast:      # the run's model.precision, as the training loop's `bundle.autocast`
            loss = forward_loss(cfg, px, ids, content, timed)
        opt.zero_grad()
        timed("backward", loss.backward)
        timed("optimizer", opt.step)

    def forward_loss(cfg, px, ids, content, timed):
        """The step's loss (terms timed into `timed`'s parts): forward, L_clip and, for otcclip, the OT losses."""
        defense, tc, oc = cfg.train.defense, cfg.train, cfg.ot
        f = timed("forward", lambda: fm(px, ids))
        terms = {"clip_loss": timed("clip_loss", lambda: clip_loss(f.image, f.text, f.logit_scale,
                                                                    content_ids=content))}
        if defense == "otcclip":
            rows = torch.randperm(B, generator=gen)[:min(oc.intra_samples or B, B)]
            view = timed("second_view", lambda: _view(model, px, ids, cfg, gen, rows))
            terms["inter_loss"] = timed("ot_inter", lambda: ot_inter_loss(
                f.patches, None, f.words, f.word_mask, tc.tau_ot, oc, None, duplicate_pairs(content)))
            sub = content[rows]
            terms["intra_loss"] = timed("ot_intra", lambda: (
                ot_intra_loss(f.patches[rows], None, view.patches, None, tc.tau_ot, oc, duplicate_pairs(sub[:, 1:]))
                + ot_intra_loss(f.words[rows], f.word_mask[rows], view.words, view.word_mask, tc.tau_ot, oc,
                                duplicate_pairs(sub[:, :1]))) / 2)
        return combine_losses(terms, {"inter_loss": tc.lambda_inter, "intra_loss": tc.lambda_intra})[0]

    out = {}
    for spec in specs:
        one(spec, {})
        runs = []
        for _ in range(reps):
            parts: dict = {}
            one(spec, parts)
            runs.append(parts)
        out[spec] = {k: min(r[k] for r in runs) / B for k in runs[0]}      # CPU s per sample
    px, ids = images_to_tensor(images, S), bundle.tokenizer(captions)
    with FlopCounterMode(display=False) as fwd:
        f = fm(px, ids)
    forward = fwd.get_total_flops()
    with FlopCounterMode(display=False) as full:
        f = fm(px, ids)
        clip_loss(f.image, f.text, f.logit_scale).backward()
    out["flops_per_sample"] = {"forward": forward / B, "train_step": full.get_total_flops() / B}
    return out


# ----------------------------------------------------------------------------------------- report
WORKER_PHASES = ("setup", "witness_total", "data_wait", "batch_to_tensors", "forward_loss", "backward", "optimizer",
                 "publish", "evaluate", "checkpoint", "logging")
DRIVER_PHASES = ("ray_init", "prepare_data", "count_rows", "eval_inputs", "mlflow_setup", "streams", "fit",
                 "final_report")


def _get(run: dict, prefix: str, phase: str, kind: str) -> float:
    src = run["phases"] if prefix == "time/driver" else run["metrics"]
    return float(src.get(f"{prefix}/{phase}_{kind}_s", 0.0))


def breakdown_rows(runs: dict) -> list[tuple[str, dict]]:
    """(label, {defense: (wall s, CPU s or None)}) rows of the breakdown table."""
    rows = []
    for d, run in runs.items():
        m = run["metrics"]
        run["derived"] = {
            "interpreter_and_imports": run["python_start_unix"] - run["start_unix"] + run["imports_s"],
            "to_first_step": m.get("time/worker/first_step_unix_s", math.nan) - run["start_unix"],
            "fit_before_worker": m.get("time/worker/start_unix_s", math.nan) - run["fit_start_unix"],
        }
    rows.append(("start-up: interpreter + imports", {d: (r["derived"]["interpreter_and_imports"], None)
                                                      for d, r in runs.items()}))
    for p in DRIVER_PHASES:
        if p == "fit":
            rows.append(("fit: Ray Train start before the worker runs",
                         {d: (r["derived"]["fit_before_worker"], None) for d, r in runs.items()}))
            for w in WORKER_PHASES:
                rows.append((f"  worker: {w}", {d: (_get(r, "time/worker", w, "wall"), _get(r, "time/worker", w, "cpu"))
                                                for d, r in runs.items()}))
            continue
        rows.append((f"driver: {p}", {d: (_get(r, "time/driver", p, "wall"), _get(r, "time/driver", p, "cpu"))
                                      for d, r in runs.items()}))
    rows.append(("time to first step", {d: (r["derived"]["to_first_step"], None) for d, r in runs.items()}))
    rows.append(("whole run (process tree)", {d: (r["wall_s"], r["cpu_s"]) for d, r in runs.items()}))
    return rows


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def report(runs: dict, split: dict, mm: dict, args) -> str:
    lines = [f"# Where a training run's time goes ({'--quick, ' if args.quick else ''}{args.epochs} epoch(s), "
             f"demo config, {THREADS} torch threads)", "",
             f"Command: `python benchmarks/time_breakdown.py{' --quick' if args.quick else ''}"
             f"{'' if args.runs == ','.join(DEFENSES) else ' --runs ' + args.runs}`; "
             f"{os.cpu_count()} logical CPUs. Wall and CPU seconds; CPU of a phase is its process's "
             "(all threads); the whole run's CPU is the process tree's (Ray's daemons and workers included).", "",
             "| phase | " + " | ".join(f"{d} wall s | {d} CPU s" for d in runs) + " |",
             "|---|" + "---:|---:|" * len(runs)]
    for label, vals in breakdown_rows(runs):
        lines.append(f"| {label} | " + " | ".join(f"{_fmt(vals[d][0])} | {_fmt(vals[d][1])}" for d in runs) + " |")
    # what the driver and worker did not time: Ray Data decode, the re-match stage, Ray's daemons
    lines += ["", "| process-tree CPU s | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    resid = {}
    for d, r in runs.items():
        driver = sum(_get(r, "time/driver", p, "cpu") for p in DRIVER_PHASES if p != "fit")
        worker = sum(_get(r, "time/worker", p, "cpu") for p in ("setup", "epochs_total", "witness_total",
                                                               "evaluate", "checkpoint"))
        resid[d] = (driver, worker, r["cpu_s"] - driver - worker)
    for i, label in enumerate(("driver (timed phases)", "train worker (timed)",
                               "rest: Ray daemons, Ray Data decode, re-match actors, imports")):
        lines.append(f"| {label} | " + " | ".join(f"{resid[d][i]:.1f}" for d in runs) + " |")
    for d in runs:
        if d != "none" and "none" in resid:
            lines.append(f"\nThe re-match stage's CPU, estimated as the {d} run's rest minus none's: "
                         f"{resid[d][2] - resid['none'][2]:.1f} s.")
    # per-epoch figures
    others = [d for d in runs if d != "none"]
    lines += ["", "| per trained sample | " + " | ".join(runs) + "".join(f" | {d} / none" for d in others) + " |",
              "|---|" + "---:|" * (len(runs) + len(others))]
    per = {}
    for d, r in runs.items():
        m = r["metrics"]
        n = m.get("train/batches", 0) * args.batch * args.epochs       # trained samples (full batches)
        per[d] = {"epoch wall s (worker, re-match included)": _get(r, "time/worker", "epochs_total", "wall") / args.epochs,
                  "worker CPU ms / sample (epochs)": 1e3 * _get(r, "time/worker", "epochs_total", "cpu") / n,
                  "process-tree CPU ms / trained sample": 1e3 * r["cpu_s"] / n,
                  "samples/s in epochs (worker)": m.get("train/samples_per_s_worker", math.nan)}
    for k in per[next(iter(per))]:
        vals = [per[d][k] for d in runs]
        ratios = [per[d][k] / per["none"][k] if "none" in per and per["none"][k] else math.nan for d in others]
        lines.append(f"| {k} | " + " | ".join(f"{v:.2f}" for v in vals + ratios) + " |")
    # step parts and floor
    fl = split["flops_per_sample"]
    lines += ["", "One batch in this process (CPU ms per sample, min of 5):", "",
              "| part | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    keys = list(dict.fromkeys(k for d in runs for k in split[d]))
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(1e3 * split[d][k]) if k in split[d] else "-" for d in runs)
                     + " |")
    lines.append("| total | " + " | ".join(f"{1e3 * sum(split[d].values()):.2f}" for d in runs) + " |")
    lines += ["", "Compute floor:", "",
              f"- model FLOPs per trained sample (forward + backward, L_clip): {fl['train_step'] / 1e9:.3f} GFLOP "
              f"(forward {fl['forward'] / 1e9:.3f})"]
    floors = {}
    for dtype, m in (("fp32", mm), ("bf16", mm.get("bf16"))):
        if m:
            floors[dtype] = (1e3 * fl["train_step"] / (m["gflops_per_cpu_s"] * 1e9),     # CPU ms / sample
                             m["gflops_per_wall_s"] * 1e9 / fl["train_step"])           # samples / wall s
            lines += [f"- {dtype} matmul at {THREADS} threads: {m['gflops_per_wall_s']:.0f} GFLOP per wall s, "
                      f"{m['gflops_per_cpu_s']:.0f} per CPU s; {dtype} floor: {floors[dtype][1]:.0f} samples/s, "
                      f"{floors[dtype][0]:.2f} CPU ms per sample"]
    lines += ["", "| run | one batch in process, CPU ms / sample | % of fp32 floor (batch, CPU) | "
              "worker CPU ms / sample in epochs | % of fp32 floor (run, CPU) | % of fp32 floor (run, wall samples/s) "
              "| % of bf16 floor (run, wall) |", "|---|---:|---:|---:|---:|---:|---:|"]
    fp32_cpu, fp32_rate = floors["fp32"]
    for d in runs:
        step = 1e3 * sum(split[d].values())
        run_cpu, rate = per[d]["worker CPU ms / sample (epochs)"], per[d]["samples/s in epochs (worker)"]
        bf16 = f"{100 * rate / floors['bf16'][1]:.0f}" if "bf16" in floors else "-"
        lines.append(f"| {d} | {step:.2f} | {100 * fp32_cpu / step:.0f} | {run_cpu:.2f} "
                     f"| {100 * fp32_cpu / run_cpu:.0f} "
                     f"| {100 * rate / fp32_rate:.0f} | {bf16} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 epoch per defense")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--runs", default=",".join(DEFENSES), help="comma list of DEFENSE or DEFENSE:VARIANT "
                    "(benchmarks/variants/VARIANT.yaml); include none: the ratios are over it")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-breakdown"), help="runs folder (data cached)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", nargs=3, metavar=("DEFENSE", "EPOCHS", "JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help="config override for every run (key=value)")
    args = ap.parse_args()
    EXTRA.extend(args.set)
    if args.prepare:
        return child_prepare(args.out)
    if args.child:
        return child_run(args.child[0], int(args.child[1]), args.out, args.child[2])
    from proc_cpu import run_tree

    args.epochs = args.epochs or (1 if args.quick else 5)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    prep = run_tree([sys.executable, __file__, "--prepare", "--out", args.out, *sum((["--set", o] for o in args.set), [])], args.timeout, env=env)
    if prep.returncode:
        raise SystemExit(f"data preparation failed:\n{prep.stdout[-3000:]}")
    runs = {}
    for d in args.runs.split(","):
        path = Path(args.out) / f"breakdown-{d.replace(':', '-')}.json"
        path.unlink(missing_ok=True)
        t = run_tree([sys.executable, __file__, "--child", d, str(args.epochs), str(path), "--out", args.out,
                      *sum((["--set", o] for o in args.set), [])],
                     args.timeout, env=env)
        if t.returncode or not path.exists():
            raise SystemExit(f"{d} run failed (rc {t.returncode}):\n{t.stdout[-3000:]}")
        run = json.loads(path.read_text())
        run.update(wall_s=t.wall_s, cpu_s=t.cpu_s, start_unix=t.start_unix)
        run["fit_start_unix"] = run["phases"]["time/driver/fit_start_unix_s"]
        runs[d] = run
        print(f"{d}: {t.wall_s:.0f} s wall, {t.cpu_s:.0f} CPU s", flush=True)
    from otc_ray.config import load_config
    args.batch = load_config(str(CONFIG), EXTRA).train.batch_size
    mm = matmul_gflops() | {"bf16": matmul_gflops(dtype="bf16")}
    split = step_split(tuple(runs))
    text = report(runs, split, mm, args)
    print(text)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    stem = "time_breakdown" + ("_quick" if args.quick else "") + (
        "" if args.runs == ",".join(DEFENSES) else "_" + args.runs.replace(",", "_").replace(":", "-"))
    (res / f"{stem}.md").write_text(text)
    (res / f"{stem}.json").write_text(json.dumps({"runs": runs, "step_split": split, "matmul": mm,
                                                  "epochs": args.epochs}, indent=1, default=str))


if __name__ == "__main__":
    main()
