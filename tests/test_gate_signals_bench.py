"""benchmarks/gate_signals.py's operating points: a combined z flagged below a threshold, or capped to the lowest
share of each block (what a heavy clean tail of the gate's z would cost under a cap)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gate_signals", ROOT / "benchmarks" / "gate_signals.py")
gate_signals = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gate_signals            # its dataclasses look their module up
spec.loader.exec_module(gate_signals)


def test_a_cap_flags_only_the_lowest_share_of_each_block_below_the_threshold():
    """Two blocks of 100: block 0 holds both poisoned rows (z -20, -15) and eight clean rows at z -9; block 1 ten
    clean rows at z -6. Below -8: the poison and block 0's clean tail; capped at 2% (two rows a block): block 0's two
    poisoned rows and block 1's two lowest, which are also below the gate's -3."""
    z = np.zeros(200)
    kind = np.array([""] * 200, dtype=object)
    z[:2], kind[:2] = (-20.0, -15.0), "backdoor"
    z[2:10] = -9.0
    z[100:110] = np.linspace(-6.5, -6.0, 10)
    points = {p["rule"]: p for p in gate_signals.capped_points(z, kind, block=100, threshold=-3.0)}
    deep = points["z < -8.0"]
    assert deep["flag_rate"] == 10 / 200 and deep["recall_backdoor"] == 1.0 and deep["precision"] == 2 / 10
    capped = points["lowest 2.0% of each block, z < -3.0"]
    assert capped["flag_rate"] == 4 / 200 and capped["recall_backdoor"] == 1.0 and capped["clean_flagged"] == 2 / 198
    assert points["lowest 0.5% of each block, z < -3.0"]["recall_backdoor"] == 0.5      # one row a block
