"""The defense benchmark: its matrix, variant files, cell files (the one results store), the report built from them
and its target checks (the training itself is exercised by test_train.py)."""
import importlib.util
import re
import shutil
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


from otc_ray.track.cells import cell_from_run, write_cell  # noqa: E402


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


VARIANT = "cosine-only"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A variants folder with one ablation, and cell files of real MLflow runs: `none` and otcclip on fashion patch,
    the ablation on the same seed, and one file of other settings (a stale cell). Built once; each test copies it."""
    tmp_path = tmp_path_factory.mktemp("store")
    variants = tmp_path / "variants"
    variants.mkdir()
    (variants / f"{VARIANT}.yaml").write_text("# the caption by cosine alone\nrematch:\n  alpha: 1.0\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = bench.load_config(bench.BASE, [])
    folder = tmp_path / "cells"
    for defense, asr, recall, variant, seed in (("none", [0.3, 0.9], None, "", 0),
                                                ("otcclip", [0.05, 0.02], [0.8, 0.9], "", 0),
                                                ("otcclip", [0.1, 0.3], [0.5, 0.4], VARIANT, 0),
                                                ("otcclip", [0.2, 0.1], [0.5, 0.4], "", 1)):
        cell = bench.Cell("fashion", "patch", defense, seed, variant)
        cfg, digest = bench.cell_config(base, cell, variants)
        curves = {"eval/backdoor_asr": asr, "final/backdoor_asr": [asr[-1]], "final/zeroshot_top1": [0.6]}
        if recall:
            curves |= {"rematch/gate_recall_backdoor": recall, "rematch/gate_precision": [0.5, 0.6]}
        params = {"data.dataset": "fashion", "train.defense": defense, "poison.attack": "backdoor",
                  "poison.trigger": "patch", "poison.count": "50", "train.seed": str(seed)}
        run_id = _logged_run(uri, cfg.name, params, curves)
        stale = seed == 1                   # trained under other settings: its digest is not today's
        write_cell(bench.cell_path(folder, cell), cell_from_run(uri, run_id, vars(cell), "0123456789" if stale else
                                                                 digest, "abc1234", bench.EXPERIMENT))
    return tmp_path


def _fixture_store(store, tmp_path):
    """(the benchmark's base config, a copy of the fixture's cells folder, of its variants folder)."""
    for name in ("cells", "variants"):
        shutil.copytree(store / name, tmp_path / name)
    return bench.load_config(bench.BASE, []), tmp_path / "cells", tmp_path / "variants"


def test_the_report_is_rebuilt_from_the_cell_files_alone(store, tmp_path):
    """Each finished cell is one JSON file (coordinates, config digest, commit, final metrics, curves); the report
    holds the current cells with the commit that measured them, compares the variant with the configuration it
    extends, fills the template's figures, draws the plots, and names the stale file it left out."""
    base, folder, variants = _fixture_store(store, tmp_path)
    template = tmp_path / "template.md"
    template.write_text("<!-- notes {{ not filled }} -->\n# R\nASR {{ fig fashion patch otcclip - final/backdoor_asr }}; "
                        "variant {{ diff fashion patch otcclip cosine-only final/backdoor_asr }}; tag {{ archive_tag }}\n"
                        + "".join(f"\n{{{{ {name} }}}}\n" for name in bench.SECTIONS))
    out = tmp_path / "docs" / "results.md"
    text, left_out = bench.report(base, folder, template, out, variants=variants)
    assert out.read_text() == text and text.startswith("<!-- Generated by") and "not filled" not in text
    assert "ASR 0.020; variant difference +0.280, one seed: no spread to judge it by; tag results-archive-" in text
    assert "| patch | none | 1 | 0.600 | - | 0.900 | - | - | - | - | abc1234 |" in text           # the matrix row
    assert "python benchmarks/defense_bench.py run --datasets fashion --attacks patch --defenses none,otcclip " \
           "--clean-defenses '' --seeds 0" in text                       # exactly these cells: no clean references
    assert "| (default) |  | fashion | patch | otcclip | 1 | 0.600 | - | 0.020 |" in text           # the ablation table
    assert "| cosine-only | (default) | fashion | patch | otcclip | 1 | 0.600 | - | 0.300 |" in text
    assert "--variants cosine-only" in text and "- `cosine-only`: the caption by cosine alone" in text
    assert "- cosine-only vs the default (fashion / patch / otcclip, 1 seed): zero-shot difference +0.000" in text
    assert "| fashion | patch | otcclip | 1 | 0.80 0.90 |" in text                  # per-epoch new-flag recall
    assert "OTCCLIP backdoor ASR 0.020 (target <= 0.05): met" in text
    assert [p.name for p, _ in left_out] == ["patch-otcclip-s1.json"] and "config digest 0123456789" in text
    assert (tmp_path / "docs" / "results-plots" / "fashion" / "patch" / "asr_per_epoch.png").stat().st_size > 0
    assert "![fashion patch asr_per_epoch](results-plots/fashion/patch/asr_per_epoch.png)" in text


def test_a_template_that_drops_a_table_or_names_no_figure_is_an_error(store, tmp_path):
    base, folder, variants = _fixture_store(store, tmp_path)
    sections = "".join(f"{{{{ {name} }}}}\n" for name in bench.SECTIONS)
    out = tmp_path / "results.md"
    for text, message in ((sections.replace("{{ stress }}", ""), "`{{ stress }}` must appear once"),
                          (sections + "{{ fig shapes patch none - final/backdoor_asr }}", "no current cell has that"),
                          (sections + "{{ diff fashion patch none - final/backdoor_asr }}", "compares a variant"),
                          (sections + "{{ table }}", "expected a section")):
        (tmp_path / "t.md").write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            bench.report(base, folder, tmp_path / "t.md", out, variants=variants)
    (folder / "fashion" / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a benchmark cell file"):
        bench.read_store(folder, base, variants)


def test_a_cell_is_current_only_under_the_config_it_trained(store, tmp_path):
    """A rerun reuses a cell whose digest is today's config's for it; a changed setting, or a changed variant file,
    makes the file stale (the cell trains again)."""
    base, folder, variants = _fixture_store(store, tmp_path)
    none_cell = bench.Cell("fashion", "patch", "none", 0)
    done = bench.current_cell(folder, base, none_cell, variants)
    assert done is not None and done.history["eval/backdoor_asr"] == [(0, 0.3), (1, 0.9)] and done.commit == "abc1234"
    assert bench.current_cell(folder, bench.load_config(bench.BASE, ["train.epochs=7"]), none_cell, variants) is None
    ablation = bench.Cell("fashion", "patch", "otcclip", 0, VARIANT)
    assert bench.current_cell(folder, base, ablation, variants) is not None
    (variants / f"{VARIANT}.yaml").write_text("# the caption by cosine alone\nrematch:\n  alpha: 0.9\n")
    assert bench.current_cell(folder, base, ablation, variants) is None
    assert bench.current_cell(folder, base, bench.Cell("fashion", "patch", "otcclip", 1), variants) is None


def test_every_variant_file_is_a_described_valid_override_of_the_benchmark_config():
    """Each benchmarks/variants/*.yaml says what it tests on its first line and builds a valid config for a cell; an
    attack variant changes poison.*, an ablation does not; each compares with the configuration it extends."""
    base = bench.load_config(bench.BASE, [])
    names = bench.known_variants()
    assert len(names) >= 10
    defaults = {attack: bench.cell_config(base, bench.Cell("fashion", attack, "otcclip", 0))[1]
                for attack in ("patch", "patch+targeted")}
    for name in names:
        assert bench.variant_description(name), f"{name}.yaml: no first-line comment saying what it tests"
        attack = "patch" if bench.is_stress(name) else "patch+targeted"
        cfg, digest = bench.cell_config(base, bench.Cell("fashion", attack, "otcclip", 0, name))
        assert name in cfg.name and digest != defaults[attack], f"{name}.yaml changes nothing"
    cosine, _ = bench.cell_config(base, bench.Cell("fashion", "patch+targeted", "otcclip", 0,
                                                   "no-propagate-ref64-cosine-only"))
    assert (cosine.rematch.alpha, cosine.rematch.propagate, cosine.rematch.gate_reference) == (1.0, False, 64)
    assert bench.extended_variant("no-propagate-ref64-cosine-only") == "no-propagate-ref64"
    assert bench.extended_variant("no-propagate-ref64") == "no-propagate"
    assert bench.extended_variant("no-propagate") == bench.extended_variant("rate-5%") == ""
    assert bench.is_stress("rate-5%") and not bench.is_stress("no-propagate")
    with pytest.raises(bench.ConfigError, match="unknown variant 'bogus'"):
        bench.load_variant("bogus")


def test_variant_files_reject_what_is_not_a_config_override(tmp_path):
    (tmp_path / "flat.yaml").write_text("# flat\nalpha: 1.0\n")
    (tmp_path / "broken.yaml").write_text("rematch: [\n")
    (tmp_path / "typo.yaml").write_text("# typo\nrematch:\n  alpah: 1.0\n")
    with pytest.raises(bench.ConfigError, match="flat.yaml must hold config sections"):
        bench.load_variant("flat", tmp_path)
    with pytest.raises(bench.ConfigError, match="broken.yaml is not valid YAML"):
        bench.load_variant("broken", tmp_path)
    with pytest.raises(bench.ConfigError, match="alpah"):
        bench.cell_config(bench.load_config(bench.BASE, []), bench.Cell("fashion", "patch", "otcclip", 0, "typo"),
                          tmp_path)


def test_the_run_command_refuses_unknown_attacks_variants_and_loose_overrides(capsys):
    for argv, message in ((["--attacks=patch,bogus"], "unknown attack 'bogus'"),
                          (["--variants", "bogus"], "--variants: unknown ['bogus']"),
                          (["train.lr=0.1"], "put config overrides in a benchmarks/variants")):
        with pytest.raises(SystemExit):
            bench.main(["run", "--datasets", "fashion", "--seeds", "0", *argv])
        assert message in capsys.readouterr().err
    assert [c.attack for c in bench.cells(["fashion"], [], ["none", "roclip"], [0, 1])] == ["clean"] * 4
    variant_cells = bench.cells(["fashion"], ["patch"], ["otcclip"], [0, 1], variants=["no-propagate"])
    assert [(c.attack, c.variant) for c in variant_cells] == [("patch", "no-propagate")] * 2     # no clean references
    sig, _ = bench.cell_config(bench.load_config(bench.BASE, []), bench.Cell("fashion", "sig", "none", 0))
    assert (sig.poison.trigger, sig.poison.sig_delta) == ("sig", 80.0)            # the size `none` learns (sizing)


@pytest.mark.slow
def test_the_committed_store_is_current_and_docs_results_is_its_report(tmp_path):
    """Every committed cell file holds a current configuration, and docs/results.md is exactly what `report` builds
    from them (rebuild it with `make results` after changing the cells, the template or the config)."""
    base = bench.load_config(bench.BASE, [])
    results, left_out = bench.read_store(bench.CELLS, base)
    assert not left_out, f"stale cell files: {left_out[:3]}"
    assert len(results) >= 100
    text, _ = bench.report(base, bench.CELLS, bench.TEMPLATE, tmp_path / "docs" / "results.md")
    assert text == bench.RESULTS.read_text(), "docs/results.md is not the report of the cells: run `make results`"


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


def test_the_tables_show_no_asr_of_an_attack_the_cell_does_not_carry():
    """A targeted-only cell still measures the triggered test images (the rate without a backdoor), a backdoor-only
    cell the target images: the tables must not print those as the attack's ASR, while the attack's own stays."""
    from otc_ray.track import metric_names
    from otc_ray.track.cells import CellResult
    from otc_ray.track.mlflow_logger import RunRecord

    def result(attack: str, asr: float, targeted: float) -> CellResult:
        metrics = {metric_names.FINAL_ZEROSHOT_TOP1: 0.6, metric_names.FINAL_BACKDOOR_ASR: asr,
                   metric_names.FINAL_TARGETED_ASR: targeted}
        return CellResult({}, "d", "c0ffee1", RunRecord(f"run-{attack}", attack, "FINISHED", {}, {}, metrics))

    results = {bench.Cell("fashion", "targeted", "none", 0, "data-captions"): result("targeted", 0.017, 0.5),
               bench.Cell("fashion", "patch", "none", 0, "rate-5%"): result("patch", 0.99, 0.1)}
    table = "\n".join(bench.variant_rows(results, ["data-captions", "rate-5%"]))
    assert "| data-captions | (default) | fashion | targeted | none | 1 | 0.600 | - | - | 0.500 |" in table
    assert "| rate-5% | (default) | fashion | patch | none | 1 | 0.600 | - | 0.990 | - |" in table


def test_the_validation_table_has_one_row_per_cell_with_its_figures(store):
    """benchmarks/validation_table.py: each cell file of a folder is one row, its variant named, '-' where a cell
    has no such metric (none has no detection figures)."""
    spec_vt = importlib.util.spec_from_file_location("validation_table", ROOT / "benchmarks" / "validation_table.py")
    table = importlib.util.module_from_spec(spec_vt)
    spec_vt.loader.exec_module(table)
    lines = table.rows(store / "cells")
    assert len(lines) == 2 + 4 and lines[0].startswith("| data | attack | defense | variant | seed | zero-shot")
    assert any(line.startswith(f"| fashion | patch | otcclip | {VARIANT} | 0 | 0.600 | - | 0.300 | - |")
               for line in lines)
    assert any(line.startswith("| fashion | patch | none | (default) | 0 | 0.600 | - | 0.900 | - | - | - | - |")
               for line in lines)


def test_stress_rows_say_whether_none_learnt_the_attack():
    """An attack `none` does not learn is no defense's success: the stress section says so per row (backdoor ASR
    below 0.9, or a targeted ASR already at the defense's target)."""
    from otc_ray.track import metric_names
    from otc_ray.track.cells import CellResult
    from otc_ray.track.mlflow_logger import RunRecord

    def result(asr: float, targeted: float) -> CellResult:
        metrics = {metric_names.FINAL_BACKDOOR_ASR: asr, metric_names.FINAL_TARGETED_ASR: targeted}
        return CellResult({}, "d", "c0ffee1", RunRecord("r", "n", "FINISHED", {}, {}, metrics))

    results = {bench.Cell("fashion", "patch", "none", 0, "rate-5%"): result(0.99, 0.0),
               bench.Cell("fashion", "patch", "none", 1, "rate-5%"): result(0.95, 0.0),
               bench.Cell("fashion", "patch", "otcclip", 0, "rate-5%"): result(0.01, 0.0),
               bench.Cell("fashion", "patch", "none", 0, "random-patch"): result(0.02, 0.0),
               bench.Cell("fashion", "targeted", "none", 0, "jittered-copies"): result(0.02, 0.0)}
    lines = bench.learnt_lines(results, ["rate-5%", "random-patch", "jittered-copies"])
    assert lines == [
        "- rate-5% (fashion / patch): `none` learnt it (backdoor ASR 0.970 ± 0.020 over 2 seeds)",
        "- random-patch (fashion / patch): `none` did **not** learn it (backdoor ASR 0.020 over 1 seed < 0.90): the "
        "defenses' backdoor ASRs of this row measure nothing",
        "- jittered-copies (fashion / targeted): `none` did **not** learn it (targeted ASR 0.000 over 1 seed <= "
        "0.0625, the target): the defenses' targeted ASRs of this row measure nothing"]


def test_the_literature_base_trains_60k_pairs_on_the_fast_model_with_per_image_triggers():
    """`run --base jobs/configs/literature-bench.yaml`: the full Fashion-MNIST split, the fast model, a one-epoch
    witness, 0.1% poisoned unless a rate variant says otherwise; the literature's attacks draw their trigger per
    image (BadNet at a random place) or warp (WaNet)."""
    base = bench.load_config(bench.LITERATURE_BASE, [])
    assert (base.data.num_train, base.model.arch, base.poison.rate) == (60000, "otc-fast-vit-32", 0.001)
    assert base.rematch.warmup_steps == -(-base.data.num_train // base.train.batch_size)     # one epoch
    expect = {"badnet": ("patch", "random", True), "blend-noise": ("blended", "br", True),
              "sig-phase": ("sig", "br", True), "wanet": ("wanet", "br", False)}
    for attack in bench.LITERATURE_ATTACKS:
        cfg, _ = bench.cell_config(base, bench.Cell("fashion", attack, "none", 3, "rate-0.5%"))
        assert (cfg.poison.trigger, cfg.poison.trigger_location, cfg.poison.trigger_per_image) == expect[attack]
        assert cfg.poison.rate == 0.005 and cfg.poison.attack == ("backdoor",)
    assert bench.cell_config(base, bench.Cell("fashion", "badnet", "none", 3, "rate-0.05%"))[0].poison.rate == 0.0005


def test_a_composite_variant_applies_each_file_in_turn():
    """`--variants A+B`: A's overrides, then B's, one cell named after both; an unknown part is refused."""
    both = bench.load_variant("rate-0.5%+witness-100")
    assert both == {**bench.load_variant("rate-0.5%"), **bench.load_variant("witness-100")}
    assert both["poison.rate"] == 0.005 and both["rematch.warmup_steps"] == 100
    cell = bench.Cell("fashion", "sig-phase", "otcclip", 3, "rate-0.5%+witness-100")
    cfg, _ = bench.cell_config(bench.load_config(bench.LITERATURE_BASE, []), cell)
    assert (cfg.poison.rate, cfg.rematch.warmup_steps) == (0.005, 100)
    assert bench.cell_path(Path("store"), cell).name == "sig-phase-otcclip-rate-0.5%+witness-100-s3.json"
    assert bench.variant_description("rate-0.5%+witness-100") == "; ".join(
        bench.variant_description(v) for v in ("rate-0.5%", "witness-100"))
    with pytest.raises(bench.ConfigError, match="unknown variant 'bogus'"):
        bench.load_variant("rate-0.5%+bogus")


def test_the_seeds_table_averages_each_configuration_over_the_chosen_seeds():
    """`defense_bench.py table`: one row per (data set, attack, defense, variant) among the chosen seeds, mean ± std
    of each figure and the flagged share, the mean backdoor ASR per epoch; the validation seed stays out unless
    chosen, and an attack's absent figure is '-'."""
    from otc_ray.track import metric_names
    from otc_ray.track.cells import CellResult
    from otc_ray.track.mlflow_logger import RunRecord

    def result(asr: list[float], zeroshot: float, flagged: float | None = None) -> CellResult:
        metrics = {metric_names.FINAL_BACKDOOR_ASR: asr[-1], metric_names.FINAL_ZEROSHOT_TOP1: zeroshot}
        if flagged is not None:
            metrics[metric_names.REMATCH_FLAG_RATE] = flagged
        history = {metric_names.EVAL_BACKDOOR_ASR: list(enumerate(asr))}
        return CellResult({}, "d", "c0ffee1", RunRecord("r", "n", "FINISHED", {}, {}, metrics), history)

    results = {bench.Cell("fashion", "sig-phase", "none", 0, ""): result([0.2, 0.8], 0.80),
               bench.Cell("fashion", "sig-phase", "none", 1, ""): result([0.4, 1.0], 0.90),
               bench.Cell("fashion", "sig-phase", "none", 3, ""): result([0.0, 0.1], 0.10),
               bench.Cell("fashion", "sig-phase", "otcclip", 0, "witness-100"): result([0.0, 0.01], 0.85, 0.1)}
    lines = bench.seeds_table(results, {0, 1, 2})
    assert lines[0].startswith("| data | attack | defense | variant | seeds | zero-shot |") and len(lines) == 4
    assert lines[2] == ("| fashion | sig-phase | none | (default) | 0,1 | 0.850 ± 0.050 | - | 0.900 ± 0.100 | - | - | - | "
                        "- | - | 0.300 0.900 | c0ffee1 |")
    assert lines[3] == ("| fashion | sig-phase | otcclip | witness-100 | 0 | 0.850 | - | 0.010 | - | - | - | - | "
                        "0.100 | 0.000 0.010 | c0ffee1 |")
    assert "| 3 | 0.100 |" in bench.seeds_table(results, {3})[2]
