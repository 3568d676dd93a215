"""`otc-ray demo`: the attacks are real and the defense holds, in one command on one machine.

Trains each defense of `DEFENSES` on the same poisoned built-in data (otc_ray/configs/demo.yaml, package data
that a plain `pip install .` installs beside the code), one MLflow run each in the experiment
`tracking.experiment`, grouped under one parent run `<name>-<digest>`, then prints the comparison table of these
runs and how to open the MLflow UI on the results. Runs are named `<name>-<defense>-<digest of the settings>`: a
rerun with the same settings reuses (or resumes) the finished runs, other overrides train new ones.

An attack is sized for the demo only where it was measured (docs/results.md, attack sizing): another trigger,
corner, target or seed may not be learnt at all at this size. So after `none` trains, the demo says which of its
attacks `none` did not learn (`unlearnt_attacks`): the defenses' ASRs of those measure nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..config import Config, content_digest, replace
from ..credentials import redact_uri
from ..track import metric_names
from ..track.compare import compare
from ..track.mlflow_logger import TrackingUnavailable, tracking_uri, training_digest
from ..track.run_context import finish_parent_run, mark_model_development, start_parent_run, ui_link

DEFENSES = ("none", "roclip", "otcclip")
LEARNT_BACKDOOR_ASR = 0.9       # `none` learnt the backdoor: its ASR at least this
LEARNT_TARGETED_ASR = 1 / 16    # `none` learnt the targeted attack: its ASR above this (the defense's target)
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"      # otc_ray/configs/ (package data)


def run_demo(cfg: Config, defenses: tuple[str, ...] = DEFENSES) -> str:
    """Train every defense in turn, grouped under one parent run (progress and ETA on stdout; the parent ends
    FINISHED, FAILED, or KILLED on Ctrl-C / SIGTERM); returns the comparison table."""
    start, times, run_ids = time.perf_counter(), [], []
    parent_name = f"{cfg.name}-{content_digest([training_digest(cfg), defenses])}"
    parent = start_parent_run(cfg, parent_name, "demo")
    try:
        for i, defense in enumerate(defenses):
            run_ids.append(_train_one(cfg, defense, i, len(defenses), times, parent))
    except BaseException as e:
        if not isinstance(e, TrackingUnavailable):     # a server that is gone takes no status either
            finish_parent_run(cfg, parent, "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    finish_parent_run(cfg, parent)
    uri = tracking_uri(cfg)
    table, plots = compare(uri, cfg.tracking.experiment, "text", Path(cfg.output_dir) / "compare", run_ids=run_ids)
    print(f"\n{table}\n")
    for p in plots:
        print(f"plot: {p}")
    exp_id = mark_model_development(uri, cfg.tracking.experiment)
    print(f"total {(time.perf_counter() - start) / 60:.1f} min. Open the results in MLflow:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {redact_uri(uri)} --port 5000\n"
          f"  then {ui_link('http://127.0.0.1:5000', exp_id)}   (the runs grouped under {parent_name})")
    return table


def unlearnt_attacks(cfg: Config, metrics: dict[str, float]) -> list[str]:
    """The attacks of cfg.poison that an undefended run with these final metrics did not learn, one sentence each."""
    out = []
    backdoor = metrics.get(metric_names.FINAL_BACKDOOR_ASR, float("nan"))
    if "backdoor" in cfg.poison.attack and not backdoor >= LEARNT_BACKDOOR_ASR:
        out.append(f"`none` did not learn the backdoor ({cfg.poison.trigger} -> {cfg.poison.target}): ASR "
                   f"{backdoor:.3f} < {LEARNT_BACKDOOR_ASR}, so the defenses' backdoor ASRs measure nothing here")
    targeted = metrics.get(metric_names.FINAL_TARGETED_ASR, float("nan"))
    if "targeted" in cfg.poison.attack and not targeted > LEARNT_TARGETED_ASR:
        out.append(f"`none` did not learn the targeted attack: ASR {targeted:.3f} <= {LEARNT_TARGETED_ASR:.4f}, so "
                   "the defenses' targeted ASRs measure nothing here")
    return out


def _train_one(cfg: Config, defense: str, i: int, n: int, times: list[float], parent: str) -> str:
    """Train the demo's `i`-th defense as a child of the demo's parent run; returns its run id."""
    from .train import run_training

    eta = f", ETA {sum(times) / len(times) * (n - i) / 60:.1f} min" if times else ""
    print(f"[demo {i + 1}/{n}] training defense={defense}{eta}", flush=True)
    run_cfg = replace(cfg, train__defense=defense)
    run_cfg = replace(run_cfg, name=f"{cfg.name}-{defense}-{training_digest(run_cfg)}")
    result = run_training(run_cfg, progress=True, parent_run_id=parent)
    times.append(result.seconds)
    m = result.metrics
    print(f"[demo {i + 1}/{n}] {defense}: zero-shot {m.get(metric_names.FINAL_ZEROSHOT_TOP1, float('nan')):.3f}, "
          f"backdoor ASR {m.get(metric_names.FINAL_BACKDOOR_ASR, float('nan')):.3f}, "
          f"targeted ASR {m.get(metric_names.FINAL_TARGETED_ASR, float('nan')):.3f} ({result.seconds / 60:.1f} min)", flush=True)
    if defense == "none":
        for line in unlearnt_attacks(cfg, m):
            print(f"[demo] note: {line} (the sized attacks: docs/results.md, attack sizing)", flush=True)
    return result.run_id
