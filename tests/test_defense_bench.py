"""The defense benchmark's matrix and target checks (the training itself is exercised by test_train.py)."""
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
    assert len(todo) == 2 * 2 * (1 + 2 * 2)
    base = bench.load_config(bench.BASE, [])
    composed = bench.cell_config(base, bench.Cell("shapes", "blended+targeted", "otcclip", 1))
    assert (composed.poison.attack, composed.poison.trigger, composed.poison.target) == (("backdoor", "targeted"),
                                                                                          "blended", "circle")
    assert composed.poison.attack_name == "backdoor+targeted"
    assert composed.train.seed == composed.poison.seed == 1 and composed.name.startswith("bench-shapes-blended+targeted-otcclip-s1-")
    clean = bench.cell_config(base, bench.Cell("fashion", "clean", "none", 0))
    assert clean.poison.attack == () and clean.poison.attack_name == "none" and clean.train.defense == "none"
    with pytest.raises(ValueError, match="one backdoor trigger"):
        bench.Cell("fashion", "patch+blended", "none", 0).overrides()


def test_targets_report_met_and_missed_with_their_figures():
    values = {("fashion", "clean", "none"): {"final/zeroshot_top1": [0.70]},
              ("fashion", "patch", "none"): {"final/backdoor_asr": [0.95, 0.85]},
              ("fashion", "patch", "roclip"): {"final/zeroshot_top1": [0.60]},
              ("fashion", "patch", "otcclip"): {"final/backdoor_asr": [0.10], "final/zeroshot_top1": [0.69],
                                                "rematch/detect_precision": [0.9], "rematch/detect_recall": [0.97],
                                                "rematch/damage": [0.01]}}
    lines = "\n".join(bench.target_lines(values, ["fashion"], ["patch"]))
    assert "no-defense backdoor ASR 0.900 (target >= 0.7): met" in lines
    assert "OTCCLIP backdoor ASR 0.100 (target <= 0.05): **missed**" in lines
    assert "zero-shot 0.690 vs clean 0.700 (within 0.02): met; vs RoCLIP 0.600 (>= +0.02): met" in lines
    assert "P 0.900 / R 0.970" in lines and "damage 0.0100 (target <= 0.02): met" in lines
    assert "targeted" not in lines
