"""The defense benchmark's matrix, its per-cell result files and target checks (the training itself is exercised by
test_train.py)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("defense_bench", ROOT / "benchmarks" / "defense_bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench          # dataclasses look their module up
spec.loader.exec_module(bench)


def test_matrix_has_a_clean_reference_per_dataset_and_seed_and_valid_configs():
    todo = bench.cells(["fashion", "shapes"], ["patch", "blended+targeted"], ["none", "otcclip"], [0, 1])
    assert len(todo) == 2 * 2 * (2 + 2 * 2)          # a clean reference per defense, then attacks x defenses
    assert {c.defense for c in todo if c.attack == "clean"} == {"none", "otcclip"}
    only_none = bench.cells(["fashion"], ["patch"], ["none", "otcclip"], [0], clean_defenses=["none"])
    assert [c.defense for c in only_none if c.attack == "clean"] == ["none"] and len(only_none) == 3
    base = bench.load_config(bench.BASE, [])
    composed, digest = bench.cell_config(base, bench.Cell("shapes", "blended+targeted", "otcclip", 1))
    assert (composed.poison.attack, composed.poison.trigger, composed.poison.target) == (("backdoor", "targeted"),
                                                                                          "blended", "circle")
    assert composed.poison.attack_name == "backdoor+targeted"
    assert composed.train.seed == composed.poison.seed == 1 and composed.name == f"bench-shapes-blended+targeted-otcclip-s1-{digest}"
    clean, _ = bench.cell_config(base, bench.Cell("fashion", "clean", "none", 0))
    assert clean.poison.attack == () and clean.poison.attack_name == "none" and clean.train.defense == "none"
    with pytest.raises(ValueError, match="one backdoor trigger"):
        bench.Cell("fashion", "patch+blended", "none", 0).overrides()


def test_targets_report_met_and_missed_with_their_figures():
    values = {("fashion", "clean", "none"): {"final/zeroshot_top1": [0.70]},
              ("fashion", "patch", "none"): {"final/backdoor_asr": [0.95, 0.87]},
              ("fashion", "patch", "roclip"): {"final/zeroshot_top1": [0.60]},
              ("fashion", "patch", "otcclip"): {"final/backdoor_asr": [0.10], "final/zeroshot_top1": [0.69],
                                                "rematch/detect_precision": [0.9], "rematch/detect_recall": [0.97],
                                                "rematch/damage": [0.01]}}
    values[("fashion", "patch", "safeclip")] = {"final/zeroshot_top1": [0.65, 0.66], "final/backdoor_asr": [0.0, 0.02]}
    values[("fashion", "patch", "otcclip")]["final/zeroshot_top1"] = [0.68, 0.70]
    lines = "\n".join(bench.target_lines(values, ["fashion"], ["patch"]))
    assert "no-defense backdoor ASR 0.910 (target >= 0.9): met" in lines
    assert "OTCCLIP backdoor ASR 0.100 (target <= 0.05): **missed**" in lines
    assert "zero-shot 0.690 vs clean 0.700 (within 0.02): met" in lines
    assert "vs roclip 0.600 (>= +0.02 where it stops the attack; difference +0.090, one seed: no spread to judge it " \
           "by): n/a (it does not stop the attack)" in lines                      # roclip has no ASR figure: stops? no
    assert "vs safeclip 0.655 (>= +0.02 where it stops the attack; difference +0.035 > 2 std): met" in lines
    assert "P 0.900 / R 0.970" in lines and "damage 0.0100 (target <= 0.02): met" in lines
    assert "targeted" not in lines
    assert bench.target_lines(values, ["shapes"], ["patch+targeted", "patch"]) == [
        "- shapes / patch+targeted: not run yet (no cell files)"]       # a row of the matrix; `patch` is not one
    values[("fashion", "blended", "otcclip")] = {"final/backdoor_asr": [0.01]}         # `none` of this attack not run
    assert "fashion / blended: no-defense backdoor ASR nan (target >= 0.9): not run yet (no cell files)" in \
        "\n".join(bench.target_lines(values, ["fashion"], ["blended"]))
    assert bench.significance([0.60, 0.70], [0.62, 0.64]).endswith("none")


def _logged_run(uri: str, name: str, params: dict, curves: dict) -> str:
    """A real MLflow run with params and per-epoch metrics, as a training run leaves it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(bench.EXPERIMENT) or client.get_experiment(client.create_experiment(bench.EXPERIMENT))
    run = client.create_run(exp.experiment_id, run_name=name)
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    for key, values in curves.items():
        for step, v in enumerate(values):
            client.log_metric(run.info.run_id, key, v, step=step)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_cells_are_files_a_rerun_reuses_and_the_report_is_rebuilt_from(tmp_path):
    """Each finished cell is one JSON file (commit, config digest, final metrics, per-epoch curves); a cell whose file
    holds the current digest is reused, a changed setting makes it stale; the tables come from the files alone."""
    from otc_ray.track.cells import cell_from_run, read_cell, read_cells, write_cell

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = bench.load_config(bench.BASE, [])
    folder = tmp_path / "cells"
    for defense, asr, recall, variant in (("none", [0.3, 0.9], None, ""), ("otcclip", [0.05, 0.02], [0.8, 0.9], ""),
                                          ("otcclip", [0.1, 0.3], [0.5, 0.4], "cosine-only")):
        cell = bench.Cell("fashion", "patch", defense, 0, variant)
        cfg, digest = bench.cell_config(base, cell)
        curves = {"eval/backdoor_asr": asr, "final/backdoor_asr": [asr[-1]], "final/zeroshot_top1": [0.6]}
        if recall:
            curves |= {"rematch/gate_recall_backdoor": recall, "rematch/gate_precision": [0.5, 0.6]}
        params = {"data.dataset": "fashion", "train.defense": defense, "poison.attack": "backdoor",
                  "poison.trigger": "patch", "poison.count": "50", "train.seed": "0"}
        run_id = _logged_run(uri, cfg.name, params, curves)
        write_cell(bench.cell_path(folder, cell), cell_from_run(uri, run_id, {"defense": defense}, digest, "abc1234",
                                                                 bench.EXPERIMENT))
    assert len(read_cells(folder)) == 3 and not list(folder.rglob("*.tmp"))
    none_cell = bench.Cell("fashion", "patch", "none", 0)
    done = bench.current_cell(folder, base, none_cell)
    assert done is not None and done.history["eval/backdoor_asr"] == [(0, 0.3), (1, 0.9)]
    assert done.record.metrics["final/backdoor_asr"] == 0.9 and done.commit == "abc1234"
    changed = bench.load_config(bench.BASE, ["train.epochs=7"])
    assert bench.current_cell(folder, changed, none_cell) is None, "another setting: the file is stale"
    results = {c: bench.current_cell(folder, base, c) for c in (none_cell, bench.Cell("fashion", "patch", "otcclip", 0),
                                                                 bench.Cell("fashion", "patch", "otcclip", 0, "cosine-only"))}
    text = bench.report(results, ["fashion"], ["patch"], "cmd", tmp_path / "plots")
    assert "| - | fashion | patch | otcclip | 1 | 0.600 | 0.020 |" in text                 # the ablation table
    assert "| cosine-only | fashion | patch | otcclip | 1 | 0.600 | 0.300 |" in text
    assert "- cosine-only (1 seed) vs otcclip: zero-shot difference +0.000, one seed" in text    # what the part buys
    assert "backdoor ASR difference +0.280, one seed" in text
    assert "| fashion | none | backdoor | patch | 50 | 1 |" in text and "0.900" in text
    assert "| fashion | patch | otcclip | 1 | 0.80 0.90 |" in text                  # per-epoch new-flag recall
    assert "OTCCLIP backdoor ASR 0.020 (target <= 0.05): met" in text
    assert (tmp_path / "plots" / "fashion" / "patch" / "asr_per_epoch.png").stat().st_size > 0
    assert "patch (with the clean reference): ![patch asr_per_epoch](plots/fashion/patch/asr_per_epoch.png)" in text
    (folder / "fashion" / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a benchmark cell file"):
        read_cell(folder / "fashion" / "bad.json")


def test_ablation_and_stress_cells_are_valid_configs_with_their_own_files():
    todo = bench.cells(["fashion"], ["patch"], ["none", "otcclip"], [0, 1], ablations=list(bench.ABLATIONS),
                       stress=list(bench.STRESS))
    ablations = [c for c in todo if c.variant in bench.ABLATIONS]
    stress = [c for c in todo if c.variant in bench.STRESS]
    assert len(ablations) == 2 * len(bench.ABLATIONS) and {c.defense for c in ablations} == {"otcclip"}
    assert len(stress) == 2 * len(bench.STRESS) and {c.seed for c in stress} == {0}
    base = bench.load_config(bench.BASE, [])
    paths = set()
    for cell in ablations + stress:
        cfg, digest = bench.cell_config(base, cell)             # every override is a valid config
        assert cell.variant in cfg.name and digest in cfg.name
        paths.add(bench.cell_path(Path("cells"), cell))
    assert len(paths) == len(ablations + stress), "every variant cell has its own file"
    alpha1, _ = bench.cell_config(base, bench.Cell("fashion", "patch+targeted", "otcclip", 0, "cosine-only"))
    assert alpha1.rematch.alpha == 1.0 and alpha1.poison.attack == ("backdoor", "targeted")
    rate, _ = bench.cell_config(base, bench.Cell("fashion", "patch", "none", 0, "rate-5%"))
    assert rate.poison.rate == 0.05


@pytest.mark.parametrize("setting, old, newer", [
    ("no-propagate", {"rematch.propagate": False}, ""),                   # before trigger propagation: vs today
    ("reference-64", {"rematch.gate_reference": 64, "rematch.propagate": False}, "no-propagate"),   # and before 256
])
def test_a_cell_of_an_earlier_default_stays_current_only_for_defenses_that_never_read_it(tmp_path, setting, old,
                                                                                         newer):
    """A cell file whose run trained under an earlier default (SETTINGS): current for `none` (no re-match stage
    reads it), not for otcclip (it is then that setting's ablation, not today's otcclip); an ablation run under it
    is recorded with that setting and compared with it, the setting itself with the default that followed it, and a
    file of other settings is not recorded."""
    from otc_ray.track.cells import CellResult, write_cell
    from otc_ray.track.mlflow_logger import RunRecord, training_digest

    base = bench.load_config(bench.BASE, [])

    def written(cell, overrides: dict) -> None:
        cfg = bench.replace(base, **{k.replace(".", "__"): v for k, v in {**cell.overrides(), **overrides}.items()})
        write_cell(bench.cell_path(tmp_path, cell), CellResult(vars(cell), training_digest(cfg), "abc1234",
                                                               RunRecord("r", "n", "FINISHED", {}, {}, {})))

    none, otc = bench.Cell("fashion", "patch", "none", 0), bench.Cell("fashion", "patch", "otcclip", 0)
    drop, other = (bench.Cell("fashion", "patch", "otcclip", 0, "drop"),
                   bench.Cell("fashion", "patch", "otcclip", 1, "drop"))
    for cell in (none, otc, drop):
        written(cell, old)
    written(other, {"train.lr": 0.123})
    assert bench.current_cell(tmp_path, base, none) is not None
    for cell in (otc, drop):
        assert bench.current_cell(tmp_path, base, cell) is None
        assert bench.recorded_cell(tmp_path, base, cell)[1] == setting
    assert bench.compared_with(base, drop, bench.read_cell(bench.cell_path(tmp_path, drop))) == setting
    assert bench.recorded_cell(tmp_path, base, other) is None
    written(otc, {})
    assert bench.recorded_cell(tmp_path, base, otc)[1] == "" and bench.current_cell(tmp_path, base, otc) is not None
    assert bench.compared_with(base, bench.Cell("fashion", "patch", "otcclip", 0, setting), None) == newer


def test_empty_attack_list_asks_for_the_clean_references_alone(tmp_path, capsys):
    argv = ["--report-only", "--datasets", "fashion", "--seeds", "0,1", "--defenses", "none,roclip",
            "--cells", str(tmp_path / "cells"), "--output", str(tmp_path / "defense.md")]
    assert bench.main(argv + ["--attacks="]) == 0
    assert "0 of 4 cells have a result file" in capsys.readouterr().out           # 2 seeds x 2 clean references
    with pytest.raises(SystemExit):
        bench.main(argv + ["--attacks=patch,bogus"])
    sig, _ = bench.cell_config(bench.load_config(bench.BASE, []), bench.Cell("fashion", "sig", "none", 0))
    assert (sig.poison.trigger, sig.poison.sig_delta) == ("sig", 80.0)            # the size `none` learns (sizing)


def test_detection_and_damage_come_from_the_last_epoch_that_re_matched():
    """RoCLIP re-matches every 2nd epoch: its final epoch trains on the crawled captions and flags nothing, so the
    table's det P / R and damage are those of its last re-matching epoch, not zeros."""
    from otc_ray.track import metric_names
    from otc_ray.track.cells import CellResult
    from otc_ray.track.mlflow_logger import RunRecord

    history = {metric_names.REMATCH_FLAG_RATE: [(0, 0.0), (1, 1.0), (2, 0.0)], metric_names.REMATCH_DAMAGE: [(0, 0.0), (1, 0.6), (2, 0.0)],
               metric_names.REMATCH_DETECT_RECALL: [(0, 0.0), (1, 0.99), (2, 0.0)], metric_names.REMATCH_DETECT_PRECISION: [(1, 0.05)]}
    final = {metric_names.REMATCH_FLAG_RATE: 0.0, metric_names.REMATCH_DAMAGE: 0.0, metric_names.REMATCH_DETECT_RECALL: 0.0,
             metric_names.REMATCH_DETECT_PRECISION: 0.05, metric_names.FINAL_ZEROSHOT_TOP1: 0.5}
    roclip = CellResult({}, "d", "c", RunRecord("r", "n", "FINISHED", {}, {}, final), history)
    fixed = bench.at_last_rematch(roclip).record.metrics
    figures = (fixed[metric_names.REMATCH_DAMAGE], fixed[metric_names.REMATCH_DETECT_RECALL], fixed[metric_names.REMATCH_DETECT_PRECISION])
    assert figures == (0.6, 0.99, 0.05)
    assert fixed[metric_names.FINAL_ZEROSHOT_TOP1] == 0.5 and roclip.record.metrics[metric_names.REMATCH_DAMAGE] == 0.0   # a copy
    every_epoch = CellResult({}, "d", "c", RunRecord("o", "n", "FINISHED", {}, {}, {metric_names.REMATCH_FLAG_RATE: 0.2,
                                                                           metric_names.REMATCH_DAMAGE: 0.02}),
                             {metric_names.REMATCH_FLAG_RATE: [(0, 0.1), (1, 0.2)], metric_names.REMATCH_DAMAGE: [(0, 0.01), (1, 0.02)]})
    assert bench.at_last_rematch(every_epoch).record.metrics[metric_names.REMATCH_DAMAGE] == 0.02
    none = CellResult({}, "d", "c", RunRecord("x", "n", "FINISHED", {}, {}, {metric_names.FINAL_ZEROSHOT_TOP1: 0.6}), {})
    assert bench.at_last_rematch(none) is none


def test_the_stress_table_shows_no_backdoor_asr_for_a_targeted_only_attack():
    """A targeted-only cell still measures the triggered test images (the rate without a backdoor); the table must not
    print that as the attack's ASR, while a backdoor cell keeps its figure."""
    from otc_ray.track import metric_names
    from otc_ray.track.cells import CellResult
    from otc_ray.track.mlflow_logger import RunRecord

    def result(attack: str, asr: float, targeted: float | None) -> CellResult:
        metrics = {metric_names.FINAL_ZEROSHOT_TOP1: 0.6, metric_names.FINAL_BACKDOOR_ASR: asr}
        metrics |= {metric_names.FINAL_TARGETED_ASR: targeted} if targeted is not None else {}
        return CellResult({}, "d", "c", RunRecord(f"run-{attack}", attack, "FINISHED", {}, {}, metrics))

    results = {bench.Cell("fashion", "targeted", "none", 0, "data-captions"): result("targeted", 0.017, 0.5),
               bench.Cell("fashion", "patch", "none", 0, "rate-5%"): result("patch", 0.99, None)}
    table = "\n".join(bench.variant_table(results, list(bench.STRESS), {}))
    assert "| data-captions | fashion | targeted | none | 1 | 0.600 | - | 0.500 |" in table
    assert "| rate-5% | fashion | patch | none | 1 | 0.600 | 0.990 | - |" in table
