"""MLflow side without training: resume by name refuses other settings; `compare` groups seeds and plots."""
import io
from pathlib import Path

import pytest

from otc_ray.config import ConfigError, load_config, replace
from otc_ray.track.compare import compare
from otc_ray.track.mlflow_logger import RunLogger, start_or_resume_run, tracking_uri, training_digest

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow          # MLflow stores on sqlite: seconds a test (make test-fast skips them)


def _cfg(tmp_path, *overrides):
    return load_config(TINY, [f"output_dir={tmp_path}", "tracking.experiment=track-test", *overrides])


def test_resume_by_name_refuses_other_training_settings(tmp_path):
    cfg = _cfg(tmp_path, "name=same")
    run_id = start_or_resume_run(cfg)
    assert start_or_resume_run(replace(cfg, train__max_failures=3, ray__num_cpus=8)) == run_id   # where, not what
    moved = replace(cfg, data__s3__endpoint_url="http://127.0.0.1:9", data__s3__retries=9, data__s3__read_timeout=5.0)
    assert start_or_resume_run(moved) == run_id                           # another endpoint / retry budget: where
    assert training_digest(moved) == training_digest(cfg)
    with pytest.raises(ConfigError, match=r"train.epochs: 2 -> 7"):
        start_or_resume_run(replace(cfg, train__epochs=7))
    assert training_digest(cfg) == training_digest(replace(cfg, ray__num_cpus=8))
    assert training_digest(cfg) != training_digest(replace(cfg, train__seed=1))



def test_artifacts_go_beside_the_store_not_to_the_folder_that_created_the_experiment(tmp_path, monkeypatch, capfd):
    """Issue 34, item 7: two jobs with different output_dir logging to one sqlite store (tracking.uri): the second
    job's artifacts land beside the store (the experiment's artifact location is the store's, whoever created it),
    not in the first job's folder; with the default store (under output_dir) they land under output_dir. Nothing is
    written to the working directory."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    shared = f"tracking.uri=sqlite:///{store / 'mlflow.db'}"
    report = tmp_path / "report.parquet"
    report.write_bytes(b"the clean job's report")

    def job(output_dir: Path, *overrides: str) -> Path:
        cfg = _cfg(output_dir, f"name=clean-{output_dir.name}", *overrides)
        run_id = start_or_resume_run(cfg, tags={"job": "clean"})
        log = RunLogger(tracking_uri(cfg), run_id)
        log.artifact(str(report), "clean")
        log.finish()
        [landed] = [p for p in tmp_path.rglob("report.parquet") if run_id in str(p)]
        return landed

    store.mkdir()
    first = job(tmp_path / "first", shared)
    second = job(tmp_path / "second", shared)
    assert store / "mlartifacts" in first.parents and store / "mlartifacts" in second.parents, (first, second)
    assert not (tmp_path / "first" / "mlartifacts").exists(), "artifacts went to the folder that created the experiment"
    alone = job(tmp_path / "alone")
    assert tmp_path / "alone" / "mlartifacts" in alone.parents
    assert {p.name for p in tmp_path.iterdir()} <= {"alone", "first", "report.parquet", "second", "store"}
    assert "keeps its artifacts" not in capfd.readouterr().err


def _fake_run(cfg, defense: str, seed: int, zeroshot: float, asr: list[float]) -> str:
    run_cfg = replace(cfg, train__defense=defense, train__seed=seed, name=f"{defense}-{seed}")
    uri = tracking_uri(run_cfg)
    run_id = start_or_resume_run(run_cfg)
    log = RunLogger(uri, run_id)
    for epoch, value in enumerate(asr):
        log.metrics({"eval/backdoor_asr": value}, step=epoch)
    log.metrics({"final/zeroshot_top1": zeroshot, "final/backdoor_asr": asr[-1]}, step=len(asr))
    log.finish()
    return run_id


def test_compare_groups_seeds_with_mean_and_std_and_draws_both_plots(tmp_path):
    cfg = _cfg(tmp_path, "poison.attack=backdoor", "poison.count=20")
    ids = [_fake_run(cfg, "none", 0, 0.50, [0.2, 0.9]), _fake_run(cfg, "none", 1, 0.60, [0.3, 0.7]),
           _fake_run(cfg, "otcclip", 0, 0.55, [0.1, 0.0])]
    table, plots = compare(tracking_uri(cfg), "track-test", "markdown", tmp_path / "plots")
    rows = {line.split("|")[2].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"none", "otcclip"}
    assert "0.550 ± 0.050" in rows["none"] and "0.800 ± 0.100" in rows["none"]      # zero-shot, ASR over 2 seeds
    assert "| 2 |" in rows["none"] and "| 1 |" in rows["otcclip"]
    assert all(p.exists() and p.stat().st_size > 1000 for p in plots) and len(plots) == 2
    only, _ = compare(tracking_uri(cfg), "track-test", "csv", run_ids=ids[2:])
    assert len(only.strip().splitlines()) == 2 and "otcclip" in only and ",none," not in only
    named, _ = compare(tracking_uri(cfg), "track-test", "markdown", run_names={"none-1"})
    assert "0.600 |" in named and "±" not in named.splitlines()[2]                      # one seed: none-1 alone
    with pytest.raises(ValueError, match="no runs"):
        compare(tracking_uri(cfg), "absent", "text")


def test_compare_reports_damage_of_the_last_epoch_that_re_matched(tmp_path):
    """RoCLIP re-matches every 2nd epoch; its final epoch flags nothing. The table shows the re-matching epoch's
    recall and damage (a real MLflow store's metric history), not the final zeros."""
    cfg = _cfg(tmp_path, "poison.attack=backdoor", "poison.count=20")
    run_cfg = replace(cfg, train__defense="roclip", name="roclip-0")
    uri, run_id = tracking_uri(run_cfg), start_or_resume_run(run_cfg)
    log = RunLogger(uri, run_id)
    for epoch, (rate, recall, damage) in enumerate([(0.0, 0.0, 0.0), (1.0, 0.98, 0.61), (0.0, 0.0, 0.0)]):
        log.metrics({"rematch/flag_rate": rate, "rematch/detect_recall": recall, "rematch/damage": damage}, step=epoch)
    log.metrics({"final/zeroshot_top1": 0.4}, step=3)
    log.finish()
    table, _ = compare(uri, "track-test", "csv")
    header, row = table.strip().splitlines()
    figures = dict(zip(header.split(","), row.split(",")))
    assert (figures["det R"], figures["damage"], figures["zero-shot"]) == ("0.980", "0.610", "0.400")


def test_epoch_progress_prints_each_finished_epoch_once(tmp_path, capsys):
    from otc_ray.train.progress import EpochProgress

    cfg = _cfg(tmp_path, "name=progress", "train.epochs=3")
    uri, run_id = tracking_uri(cfg), start_or_resume_run(cfg)
    log = RunLogger(uri, run_id)
    epoch = {"train/epoch_seconds": 12.4, "train/samples_per_s_worker": 80.0, "train/epoch_total_loss": 3.21}
    log.metrics(epoch | {"eval/zeroshot_top1": 0.41, "rematch/flag_rate": 0.024}, step=0)
    assert log.flush(timeout_s=60)
    progress = EpochProgress(cfg, uri, run_id)
    assert progress.poll() == ["[progress] epoch 1/3 12 s 80 samples/s loss 3.21 | zero-shot 0.410 flagged 2.4%"]
    assert progress.poll() == []
    log.metrics(epoch | {"eval/backdoor_asr": float("nan")}, step=1)      # NaN is not logged, so not shown
    assert log.flush(timeout_s=60)
    assert progress.poll() == ["[progress] epoch 2/3 12 s 80 samples/s loss 3.21"]
    assert "epoch 2/3" in capsys.readouterr().out
    two = EpochProgress(replace(cfg, train__num_workers=2), uri, run_id)
    assert two.poll()[0].startswith("[progress] epoch 1/3 12 s 160 samples/s (2 workers) loss 3.21")


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal (what a person's console is)."""

    def isatty(self) -> bool:
        return True


def test_step_line_has_bar_rate_and_etas():
    from otc_ray.train.progress import step_line

    # 64 samples/s at 32 samples a step = 2 steps/s: 30 steps left in this epoch (15 s), 2 more epochs of 40 (40 s)
    assert step_line("r", 0, 3, 10, 40, 64.0, 32) == \
        "[r] epoch 1/3 [#####---------------] 10/40 steps 64 samples/s ETA epoch 0:15, run 0:55"
    assert step_line("r", 2, 3, 40, 40, 10.0, 32).endswith("ETA epoch 0:00, run 0:00")
    assert "ETA epoch ?, run ?" in step_line("r", 0, 1, 0, 40, 0.0, 32)


def test_live_line_refreshes_in_place_on_a_terminal_only(tmp_path, monkeypatch):
    from otc_ray.train.progress import CLEAR_LINE, EpochProgress

    monkeypatch.delenv("CI", raising=False)
    cfg = _cfg(tmp_path, "name=live", "train.epochs=2", "train.batch_size=32")
    uri, run_id = tracking_uri(cfg), start_or_resume_run(cfg)
    log = RunLogger(uri, run_id)
    screen = _Terminal()
    progress = EpochProgress(cfg, uri, run_id, steps_per_epoch=40, stream=screen)
    assert progress.live and progress.poll() == [] and screen.getvalue() == ""        # nothing logged yet
    log.metrics({"progress/epoch": 0, "progress/step_in_epoch": 10, "progress/samples_per_s": 64.0}, step=10)
    assert log.flush(timeout_s=60)      # the logger delivers in the background
    progress.poll()
    assert screen.getvalue() == CLEAR_LINE + "[live] epoch 1/2 [#####---------------] 10/40 steps 64 samples/s " \
                                             "ETA epoch 0:15, run 0:35"
    log.metrics({"progress/epoch": 0, "progress/step_in_epoch": 40, "progress/samples_per_s": 64.0}, step=40)
    log.metrics({"train/epoch_seconds": 20.0, "train/samples_per_s_worker": 64.0}, step=0)
    assert log.flush(timeout_s=60)
    progress.poll()                     # the epoch's line replaces the live one; a finished epoch gets no live line
    assert screen.getvalue().endswith(CLEAR_LINE + "[live] epoch 1/2 20 s 64 samples/s\n")
    assert "\n" not in screen.getvalue().split(CLEAR_LINE)[1]                   # live lines never scroll

    piped = io.StringIO()               # a pipe / CI log: epoch lines only
    quiet = EpochProgress(cfg, uri, run_id, steps_per_epoch=40, stream=piped)
    assert not quiet.live and quiet.poll() == ["[live] epoch 1/2 20 s 64 samples/s"]
    assert piped.getvalue() == "[live] epoch 1/2 20 s 64 samples/s\n"
    monkeypatch.setenv("CI", "true")
    assert not EpochProgress(cfg, uri, run_id, steps_per_epoch=40, stream=_Terminal()).live


def test_a_neutral_new_key_leaves_the_digest_as_it_was_and_any_other_value_changes_it():
    from otc_ray.config import content_digest, flatten
    from otc_ray.track.mlflow_logger import DIGEST_NEUTRAL, RESUMABLE_PREFIXES

    cfg = load_config(None, [])
    without = {k: str(v) for k, v in flatten(cfg).items()
               if not k.startswith(RESUMABLE_PREFIXES) and k not in DIGEST_NEUTRAL}
    assert training_digest(cfg) == content_digest(without)          # as before the key existed
    assert training_digest(replace(cfg, rematch__precision="bf16")) != training_digest(cfg)
