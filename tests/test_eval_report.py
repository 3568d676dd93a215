"""The evaluation report on a tiny random open_clip model saved by the test: `otc-ray eval`, `evaluate_model`,
`ModelEncoder` and `load_checkpoint_model`."""
import math
import re

import numpy as np
import pytest
import torch

from otc_ray.cli import main
from otc_ray.config import DataConfig, EvalConfig, ModelConfig, PoisonConfig
from otc_ray.data.builtin import dataset_info
from otc_ray.data.make import make_shards
from otc_ray.evaluate.encoder import Encoder
from otc_ray.evaluate.model_encoder import ModelEncoder
from otc_ray.evaluate.report import format_metrics
from otc_ray.model import build_model
from otc_ray.model_checkpoint import load_checkpoint_model
from otc_ray.pipelines.evaluate import evaluate_model, load_eval_set, resolve_attack
from otc_ray.poison.transform import poison_shards

DATA = DataConfig(dataset="fashion", samples_per_shard=60)
RATES = ("zeroshot_top1", "zeroshot_top5", "backdoor_asr", "targeted_asr", "retrieval_i2t_r1", "retrieval_i2t_r5",
         "retrieval_t2i_r1", "retrieval_t2i_r5")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A test split (90), a training split (120) and its targeted poisoning (2 targets x 3 copies)."""
    root = tmp_path_factory.mktemp("eval")
    make_shards(DATA, "test", 90, str(root / "test"), "wds", progress=False)
    make_shards(DATA, "train", 120, str(root / "train"), "wds", progress=False)
    poison_shards(str(root / "train"), str(root / "poisoned"), PoisonConfig(attack="targeted", targets=2, per_target=3,
                  adversarial="bag"), DATA, target_source=str(root / "test"), progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    bundle = build_model(ModelConfig())
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(bundle.model.state_dict(), path)
    return path, bundle


def _check_rates(metrics: dict[str, float], rates=RATES) -> None:
    for k in rates:
        assert math.isfinite(metrics[k]) and 0.0 <= metrics[k] <= 1.0, (k, metrics[k])


def test_cli_eval_prints_every_metric(ray_local, sets, checkpoint, capsys):
    argv = ["eval", "--checkpoint", str(checkpoint[0]), "--data", str(sets / "test"), "--attack-manifest",
            str(sets / "poisoned"), "--train", str(sets / "train"), "eval.batch_size=64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = dict(re.findall(r"^(\w+)\s+(\S+)$", out, flags=re.M))
    for key in (*RATES, "linear_probe_acc", "linear_probe_train_acc", "linear_probe_train_count",
                "backdoor_asr_count", "targeted_asr_count", "eval_count", "eval_labeled_count"):
        assert key in table, f"{key} missing from:\n{out}"
    _check_rates({k: float(v) for k, v in table.items()}, (*RATES, "linear_probe_acc"))
    assert table["eval_count"] == "90" and table["targeted_asr_count"] == "2" and table["linear_probe_train_count"] == "120"
    assert "(from the config)" in out                    # a targeted manifest: backdoor trigger from the config
    lines = [line for line in out.splitlines() if line.split()[0] in table]
    assert len({len(line) for line in lines}) == 1          # aligned columns


def test_evaluate_model_split_probe_and_counts(ray_local, sets, checkpoint):
    bundle = load_checkpoint_model(str(checkpoint[0]), ModelConfig())
    encoder = ModelEncoder(bundle, batch_size=32)
    assert isinstance(encoder, Encoder)
    poison = PoisonConfig(target="sneaker", trigger="solid")
    metrics = evaluate_model(encoder, str(sets / "test"), DATA, poison, EvalConfig(num_eval=50, batch_size=32),
                             manifest_path=str(sets / "poisoned"))
    assert "linear_probe_acc" not in metrics and 0 < metrics["linear_probe_split_train_count"] < 50
    _check_rates(metrics, (*RATES, "linear_probe_split_acc"))
    test = load_eval_set(str(sets / "test"), DATA, 50, dataset_info("fashion").classes)
    assert list(test.keys) == sorted(test.keys) and test.keys[0] == "000000000"      # the 50 smallest keys
    assert metrics["eval_count"] == 50 and metrics["backdoor_asr_count"] == int((test.labels != 7).sum())
    assert metrics["targeted_asr_count"] == 2
    assert "zeroshot_top1" in format_metrics(metrics) and "nan" not in format_metrics(metrics)
    truth = resolve_attack(str(sets / "poisoned"), poison, DATA)
    assert truth.source == "config" and truth.spec.kind == "solid" and truth.adversarial == ("bag", "bag")


def test_checkpoint_round_trip_and_rejects(tmp_path, checkpoint):
    path, original = checkpoint
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    loaded = ModelEncoder(load_checkpoint_model(str(path), ModelConfig()))
    want = ModelEncoder(original)
    torch.testing.assert_close(loaded.encode_images(images), want.encode_images(images))
    torch.testing.assert_close(loaded.encode_texts(["a bag", "a coat"]), want.encode_texts(["a bag", "a coat"]))
    assert loaded.encode_images(images).shape == (4, 128)
    torch.manual_seed(1)
    other = ModelEncoder(build_model(ModelConfig()))
    assert not torch.allclose(other.encode_images(images), want.encode_images(images))
    with pytest.raises(ValueError, match="does not fit model arch 'otc-tiny-vit-64'"):
        load_checkpoint_model(str(path), ModelConfig(arch="otc-tiny-vit-64"))
    torch.save({"x": torch.zeros(1), "cfg": {"lr": 0.1}}, tmp_path / "not_state.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_checkpoint_model(str(tmp_path / "not_state.pt"), ModelConfig())
    torch.save({"x": np.zeros(1, dtype=object)}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="not a weights-only torch state dict"):
        load_checkpoint_model(str(tmp_path / "pickle.pt"), ModelConfig())
    with pytest.raises(ValueError, match="no checkpoint file"):
        load_checkpoint_model(str(tmp_path / "missing.pt"), ModelConfig())
