"""otc-ray `none` against open_clip's own trainer (`open_clip_train`) on the same shards, model, batch and threads.

    python benchmarks/vs_open_clip.py            # 5,000 clean fashion pairs, batch 128, fp32, 2 threads, 2 epochs
    python benchmarks/vs_open_clip.py --quick    # 1 epoch each (< 10 minutes on 2 idle cores)

Both trainers read the same webdataset shards (the demo's 5,000 fashion pairs, unpoisoned, `<key>.png` +
`<key>.txt`) and train `otc-tiny-vit-32` (open_clip_train gets the model config registered with
`open_clip.add_model_config`, as otc_ray/model.py does), batch 128, fp32, 2 intra-op threads, one data-loading
worker process, a checkpoint per epoch. Each runs in a child process whose whole process tree is reaped here
(`proc_cpu.run_tree`): CPU seconds include Ray's daemons and workers for otc-ray and the DataLoader worker for
open_clip_train. otc-ray also evaluates on the held-out set every epoch and at the end (its demo config);
open_clip_train has no evaluation data. Time to first step: from starting the command to the end of the first
optimizer step (otc-ray: its `time/worker/first_step_unix_s`; open_clip_train: the timestamp of its first
"Train Epoch" log line, 1 s resolution). The open_clip_train package is imported from this interpreter (it is in
the project's environment); its data dependencies are installed under `--out` when missing (`open_clip_deps`);
`--python` picks another interpreter.
Results: benchmarks/results/vs_open_clip.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIG = ROOT / "otc_ray" / "configs" / "demo.yaml"
ARCH = "otc-tiny-vit-32"
THREADS = 2
BATCH = 128
_OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                   "from open_clip_train.main import main; main(sys.argv[2:])")
_FIRST_STEP = re.compile(r"^(\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d) \| INFO \| Train Epoch: 0 \[", re.M)


def prepare(out: str, samples: int) -> dict:
    """The demo's clean train / test shard sets, `samples` training pairs (built once, cached under `out`)."""
    from otc_ray.config import load_config
    from otc_ray.pipelines.prepare import prepare_data

    cfg = load_config(str(CONFIG), ["poison.attack=none", f"output_dir={out}", f"data.num_train={samples}"])
    data = prepare_data(cfg, progress=False)
    return {"train": data.train, "test": data.test}


def run_otc(args, env, data: dict) -> dict:
    from proc_cpu import run_tree

    path = Path(args.out) / "vs-otc.json"
    path.unlink(missing_ok=True)
    sets = ["poison.attack=none", f"data.train={data['train']}", f"data.test={data['test']}",
            f"train.batch_size={BATCH}", "model.precision=fp32", f"model.arch={ARCH}"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "time_breakdown.py"), "--child", "none", str(args.epochs),
           str(path), "--out", args.out, *sum((["--set", s] for s in sets), [])]
    t = run_tree(cmd, args.timeout, env=env)
    if t.returncode or not path.exists():
        raise SystemExit(f"otc-ray failed (rc {t.returncode}):\n{t.stdout[-3000:]}")
    run = json.loads(path.read_text())
    m = run["metrics"]
    return {"wall_s": t.wall_s, "cpu_s": t.cpu_s, "trained": m["train/batches"] * BATCH * args.epochs,
            "to_first_step_s": m["time/worker/first_step_unix_s"] - t.start_unix,
            "zeroshot_top1": m.get("final/zeroshot_top1")}


def open_clip_deps(args) -> str:
    """A folder holding open_clip_train's data dependencies when `--python` lacks them (the project's environment
    has open_clip_train but not braceexpand / webdataset): installed once with pip --target, without their
    dependencies, so nothing of the project's environment is shadowed. webdataset is pinned to 0.2.86: from 0.2.100
    on its samples lack the "fname" key open_clip_train's grouping reads. Returns "" when nothing is needed."""
    check = subprocess.run([args.python, "-c", "import braceexpand, webdataset"], capture_output=True)
    if check.returncode == 0:
        return ""
    target = Path(args.out) / "open_clip_deps"
    if not (target / "webdataset").exists():
        subprocess.run([args.python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        "braceexpand", "webdataset==0.2.86"], check=True)
    return str(target)


def run_open_clip(args, env, data: dict) -> dict:
    from proc_cpu import run_tree

    shards = sorted(p.name for p in Path(data["train"]).glob("*.tar"))
    first, last = shards[0][:-4], shards[-1][:-4]
    logs = Path(args.out) / "open_clip_logs"
    name = f"vs-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    cmd = [args.python, "-c", _OPEN_CLIP_MAIN, str(ROOT / "otc_ray" / "model_configs"),
           "--train-data", f"{data['train']}/{{{first}..{last}}}.tar", "--dataset-type", "webdataset",
           "--train-num-samples", str(args.samples), "--batch-size", str(BATCH), "--epochs", str(args.epochs),
           "--model", ARCH, "--precision", "fp32", "--workers", "1", "--device", "cpu", "--seed", "0",
           "--warmup", "40", "--log-every-n-steps", "1", "--logs", str(logs), "--name", name, "--report-to", ""]
    deps = open_clip_deps(args)
    path = os.pathsep.join(p for p in (deps, env.get("PYTHONPATH", "")) if p)
    t = run_tree(cmd, args.timeout, env={**env, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": path})
    if t.returncode:
        raise SystemExit(f"open_clip_train failed (rc {t.returncode}):\n{t.stdout[-3000:]}")
    batches = len(re.findall(r"Train Epoch: \d+ \[", t.stdout))
    steps_per_epoch = args.samples // BATCH       # its webdataset epochs: train-num-samples // batch full batches
    found = _FIRST_STEP.search(t.stdout)
    first_step = (datetime.strptime(found.group(1), "%Y-%m-%d,%H:%M:%S").timestamp() - t.start_unix
                  if found else float("nan"))
    return {"wall_s": t.wall_s, "cpu_s": t.cpu_s, "trained": steps_per_epoch * BATCH * args.epochs,
            "to_first_step_s": first_step, "log_lines": batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 epoch each")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-vs-open-clip"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--python", default=sys.executable, help="interpreter with open_clip_train installed")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    args.epochs = args.epochs or (1 if args.quick else 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = prepare(args.out, args.samples)
    res = {"open_clip_train": run_open_clip(args, env, data), "otc-ray none": run_otc(args, env, data)}
    for r in res.values():
        r["cpu_ms_per_sample"] = 1e3 * r["cpu_s"] / r["trained"]
        r["wall_ms_per_sample"] = 1e3 * r["wall_s"] / r["trained"]
    o, c = res["open_clip_train"], res["otc-ray none"]
    rows = [("trained samples", "trained", "{:.0f}"), ("process-tree CPU s", "cpu_s", "{:.1f}"),
            ("CPU ms per trained sample", "cpu_ms_per_sample", "{:.2f}"), ("wall s", "wall_s", "{:.1f}"),
            ("wall ms per trained sample", "wall_ms_per_sample", "{:.2f}"),
            ("time to first step s", "to_first_step_s", "{:.1f}")]
    lines = [f"# otc-ray vs open_clip_train ({args.epochs} epoch(s), {args.samples} fashion pairs, {ARCH}, batch "
             f"{BATCH}, fp32, {THREADS} threads)", "",
             f"Command: `python benchmarks/vs_open_clip.py{' --quick' if args.quick else ''}`; "
             f"{os.cpu_count()} logical CPUs. CPU: the whole process tree of each run.", "",
             "| | open_clip_train | otc-ray none | otc-ray / open_clip_train |", "|---|---:|---:|---:|"]
    for label, key, f in rows:
        lines.append(f"| {label} | {f.format(o[key])} | {f.format(c[key])} | {c[key] / o[key]:.2f} |")
    if c.get("zeroshot_top1") is not None:
        lines.append(f"\notc-ray's final zero-shot top-1: {c['zeroshot_top1']:.3f} (open_clip_train: no evaluation).")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = "vs_open_clip" + ("_quick" if args.quick else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
