"""The trainer's per-epoch re-match tally on hand-built batches: detection of new and sticky flags by attack, and
damage counted by the class a new caption names."""
import numpy as np
import pytest

from otc_ray.data import schema
from otc_ray.data.builtin import dataset_info
from otc_ray.data.class_info import class_patterns
from otc_ray.train.tally import RematchTally


def _batch(keys, captions, labels, sources, recaptioned, flagged, gate):
    n = len(keys)
    return {schema.KEY: np.array(keys), schema.CAPTION_USED: np.array(captions, dtype=object), schema.LABEL: np.array(labels),
            schema.SOURCE_LABEL: np.array(sources), schema.RECAPTIONED: np.array(recaptioned), schema.FLAGGED: np.array(flagged),
            schema.GATE_FLAGGED: np.array(gate), schema.WEIGHT: np.ones(n, np.float32)}


def test_damage_is_the_class_the_new_caption_names_and_detection_splits_by_attack():
    info = dataset_info("fashion")
    shirt, bag = info.classes.index("shirt"), info.classes.index("bag")
    # k0: clean shirt re-captioned with a backdoored pair's caption ("sneaker"), whose image was a shirt: the source
    #     label says no harm, the caption names another class -> damage
    # k1: clean shirt re-captioned with another shirt's caption -> no damage; k2: clean, unchanged
    # k3: backdoor, caught by the gate; k4: targeted, sticky flag only (the gate did not flag it this epoch)
    batch = _batch(["k0", "k1", "k2", "k3", "k4"],
                   ["a photo of a sneaker", "a photo of a shirt", "a photo of a shirt", "a photo of a bag", "a bag"],
                   [shirt, shirt, shirt, bag, shirt], [shirt, shirt, shirt, bag, shirt],
                   [True, True, False, True, False], [True, True, False, True, True], [True, True, False, True, False])
    tally = RematchTally({"k3": "backdoor", "k4": "targeted"}, class_patterns(info))
    tally.add(batch)
    m = tally.metrics()
    assert m["rematch/damage"] == pytest.approx(1 / 3) and m["rematch/damage_count"] == 1.0
    assert m["rematch/gate_recall_backdoor"] == 1.0 and m["rematch/gate_recall_targeted"] == 0.0
    assert m["rematch/recall_targeted"] == 1.0                                   # sticky: still flagged
    assert m["rematch/recaptioned_rate"] == pytest.approx(3 / 5)
    without = RematchTally({"k3": "backdoor", "k4": "targeted"})                  # classes unknown: source labels
    without.add(batch)
    assert without.metrics()["rematch/damage"] == 0.0
