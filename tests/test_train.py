"""Ray Train pre-training end to end on tiny data: MLflow contents, 2 workers, failure + resume, defenses."""
import math
from pathlib import Path

import pytest

from otc_ray.cli import main
from otc_ray.config import load_config
from otc_ray.pipelines.train import run_training
from otc_ray.track.mlflow_logger import metric_history, run_metrics
from otc_ray.train.chaos import ENV

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"


def _cfg(tmp_path, *overrides):
    """The tiny config on 256 training pairs (4 steps an epoch; its 16 poisoned pairs all kept) and 64 held-out
    samples for eval and the linear probe: what these tests check does not depend on the number of steps."""
    return load_config(TINY, [f"output_dir={tmp_path}", "data.num_train=256", "eval.num_eval=64",
                              "eval.linear_probe_train=64", *overrides])


def _check_every_metric_logged(cfg, result) -> None:
    """One worker's run: every metric family in MLflow, a per-epoch history, both checkpoint files, params, tags,
    status and the plot artifact."""
    metrics = run_metrics(result.tracking_uri, result.run_id)
    for key in ("eval/zeroshot_top1", "eval/backdoor_asr", "train/samples_per_s_worker", "train/epoch_clip_loss",
                "final/linear_probe_split_acc", "final/zeroshot_top1", "run/seconds"):
        assert key in metrics, key
    assert len(metric_history(result.tracking_uri, result.run_id, "eval/zeroshot_top1")) == cfg.train.epochs
    assert 0.0 <= metrics["eval/backdoor_asr"] <= 1.0
    assert Path(result.checkpoint, "model.pt").is_file() and Path(result.checkpoint, "state.pt").is_file()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.params["train.defense"] == "none" and run.data.tags["attack"] == "backdoor"
    assert run.info.status == "FINISHED"
    artifacts = [a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id, "plots")]
    assert artifacts == ["plots/asr_accuracy_per_epoch.png"]


def test_one_worker_logs_every_metric_and_a_seeded_run_repeats(ray_local, tmp_path):
    """Same config and seed, two runs: the same batches in the same order (ordered Ray Data stream, seeded
    per-epoch shuffle, seeded init and augmentation), so every logged figure repeats exactly, whether the shards
    are read in the driver (a small set) or by Ray Data's read tasks (`data.driver_read_mb=0`); the first run is
    also the check that one worker logs every metric (one training fewer than two separate tests)."""
    keys = ("train/epoch_clip_loss", "eval/zeroshot_top1", "eval/backdoor_asr", "final/linear_probe_split_acc")
    histories = []
    for name, driver_read_mb in (("again-1", 32), ("again-2", 0)):
        cfg = _cfg(tmp_path, "train.defense=none", f"name={name}", f"data.driver_read_mb={driver_read_mb}")
        result = run_training(cfg, progress=False)
        if not histories:
            _check_every_metric_logged(cfg, result)
        histories.append({k: [v for _, v in sorted(metric_history(result.tracking_uri, result.run_id, k))]
                          for k in keys})
    assert all(histories[0][k] for k in keys), histories[0]
    assert histories[0] == histories[1]


def test_two_workers_and_resume_after_a_killed_worker(ray_local, tmp_path, monkeypatch):
    """A worker dies mid-epoch 1 (FailureConfig max_failures=1): the run restarts from the epoch-0
    checkpoint, finishes, and logs into the same MLflow run."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(ENV, f"{marker}:1:2")
    cfg = _cfg(tmp_path, "train.defense=none", "train.num_workers=2", "name=two", "train.epochs=2",
               "data.num_train=512")         # 4 steps an epoch on each worker: step 2 of epoch 1 is mid-epoch
    result = run_training(cfg, progress=False)
    assert marker.exists()
    history = metric_history(result.tracking_uri, result.run_id, "epoch")
    assert sorted({int(s) for s, _ in history}) == [0, 1]
    assert result.metrics["epoch"] == 1.0
    again = run_training(cfg, progress=False)          # same name: restored, nothing left to train
    assert again.run_id == result.run_id


def test_safeclip_low_lr_clip_epoch_then_the_gmm_split(ray_local, tmp_path):
    """No unimodal warm-up (safeclip_warmup 0): epoch 0 trains L_clip on all pairs at a hundredth of the LR, unsplit;
    epoch 1 the stage's Gaussian-mixture split flags pairs as risky (at least the 15% that the 85% cap on the safe
    share leaves), trained unimodally."""
    cfg = _cfg(tmp_path, "train.defense=safeclip", "train.safeclip_warmup=0", "name=safeclip")
    uri, run_id = _run(cfg)
    flag_rate = dict(metric_history(uri, run_id, "rematch/flag_rate"))
    assert flag_rate[0] == 0.0 and flag_rate[1] >= 0.1, flag_rate
    unimodal = dict(metric_history(uri, run_id, "train/epoch_image_unimodal_loss"))
    assert 0 not in unimodal and math.isfinite(unimodal[1])
    lr = sorted(metric_history(uri, run_id, "train/lr"))
    assert lr[0][1] < 0.02 * cfg.train.lr, lr[:2]                              # the low-LR epoch


@pytest.mark.parametrize("defense", ["otcclip", "roclip", "otcclip-drop"])
def test_rematching_defense_streams_through_the_stage(ray_local, tmp_path, defense):
    """One epoch re-matched from the start (rematch.start_epoch=0): the stage's flags reach the trainer and
    detection is scored against the poison manifest; with action=drop flagged pairs get loss weight 0 (2 workers)."""
    # drop on 2 workers: the weighted CLIP loss all-gathers the weights, so every rank must take the same path
    extra = ["rematch.action=drop", "rematch.gate_threshold=0", "train.num_workers=2"] if defense.endswith("drop") else \
        ["rematch.gate_threshold=-1", "train.roclip_every=1"]   # a loose gate for a tiny model; roclip from epoch 0
    cfg = _cfg(tmp_path, f"train.defense={defense.split('-')[0]}", "train.epochs=1", "rematch.start_epoch=0",
               f"name={defense}", *extra)
    metrics = run_metrics(*_run(cfg))
    assert metrics["rematch/detect_tp"] + metrics["rematch/detect_fn"] > 0        # poisoned rows were seen
    if defense == "otcclip-drop":       # nothing re-captioned; every flagged pair is out of the loss
        assert metrics["rematch/recaptioned_rate"] == 0.0 and 0.0 < metrics["rematch/flag_rate"] < 1.0
        assert metrics["rematch/dropped_rate"] == pytest.approx(metrics["rematch/flag_rate"])
        assert metrics["rematch/mean_weight"] == pytest.approx(1.0 - metrics["rematch/flag_rate"])
        assert math.isfinite(metrics["train/epoch_clip_loss"])
        return
    assert 0.0 < metrics["rematch/recaptioned_rate"] <= 1.0
    assert metrics["rematch/dropped_rate"] == 0.0
    if defense == "otcclip":
        assert "train/epoch_inter_loss" in metrics and "train/epoch_intra_loss" in metrics
        assert metrics["rematch/weights_staleness"] == 0.0      # the witness alone judged epoch 0: one version
    else:
        # RoCLIP: no gate, every image takes its nearest caption (flagged = given another caption)
        assert metrics["rematch/flag_rate"] == pytest.approx(metrics["rematch/recaptioned_rate"])


def _run(cfg):
    result = run_training(cfg, progress=False)
    return result.tracking_uri, result.run_id


def test_bad_config_fails_before_ray(tmp_path, capsys):
    assert main(["train", "--config", str(TINY), "train.defense=magic"]) == 2
    assert "train.defense" in capsys.readouterr().err
