"""The defense registry (what each defense re-matches and trains) and the typed hand-off to the Train workers."""
import dataclasses
import math
import pickle
import typing
from pathlib import Path

import pytest
import torch

from otc_ray.config import TrainConfig, load_config
from otc_ray.train.defenses import DEFENSES, Defense, get_defense
from otc_ray.train.loop import LoopConfig
from otc_ray.train.publish import WeightPublisher

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"


def test_the_registry_holds_every_configurable_defense():
    assert set(DEFENSES) == set(typing.get_args(typing.get_type_hints(TrainConfig)["defense"]))
    for name, defense in DEFENSES.items():
        assert isinstance(defense, Defense) and defense.name == name and get_defense(name) is defense


def test_unknown_defense_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown defense 'magic' \(train\.defense\): known are none, roclip"):
        get_defense("magic")


def test_what_each_defense_rematches():
    cfg = load_config(TINY, ["rematch.k=5"])
    assert get_defense("none").rematch(cfg) is None
    safe = get_defense("safeclip").rematch(cfg)                                # its split, in the stage
    assert (safe.gate, safe.action, safe.start_epoch, safe.sticky) == ("gmm", "drop", cfg.train.safeclip_warmup + 1,
                                                                       False)
    assert safe.alpha == 1.0 and safe.enabled
    assert cfg.rematch.propagate and not safe.propagate                        # OTCCLIP's trigger propagation only
    assert [get_defense("safeclip").lr_scale(cfg, e) for e in range(3)] == [1.0, cfg.train.safeclip_lr_scale, 1.0]
    assert get_defense("otcclip").lr_scale(cfg, 1) == 1.0
    assert get_defense("otcclip").rematch(cfg) == cfg.rematch                  # as configured
    assert get_defense("otcclip").rematch(load_config(TINY, ["rematch.enabled=false"])) is None   # ablation
    roclip = get_defense("roclip").rematch(cfg)                                # the baseline by definition
    assert (roclip.alpha, roclip.gate, roclip.witness) == (1.0, "none", False)   # cosine only; no witness
    assert (roclip.start_epoch, roclip.every_epochs) == (1, 2)                 # its break_epoch 2: epochs 1, 3, ...
    assert dataclasses.replace(roclip, alpha=cfg.rematch.alpha, gate=cfg.rematch.gate, witness=cfg.rematch.witness,
                               propagate=cfg.rematch.propagate, start_epoch=cfg.rematch.start_epoch,
                               every_epochs=cfg.rematch.every_epochs) == cfg.rematch
    # the defense, not the rematch section, says which method runs: roclip whatever rematch says
    assert get_defense("roclip").rematch(load_config(TINY, ["rematch.k=5", "rematch.enabled=false",
                                                       "rematch.alpha=0.2"])) == roclip
    assert not roclip.propagate
    every_epoch = get_defense("roclip").rematch(load_config(TINY, ["train.roclip_every=1"]))
    assert (every_epoch.start_epoch, every_epoch.every_epochs) == (0, 1)


@pytest.mark.parametrize("defense, terms", [
    ("none", {"clip_loss"}),
    ("roclip", {"clip_loss"}),
    ("otcclip", {"clip_loss", "inter_loss", "intra_loss"}),
    ("safeclip", {"image_unimodal_loss", "text_unimodal_loss"}),                 # epoch 0 < safeclip_warmup
    ("safeclip-1", {"clip_loss"}),                                               # its CLIP epoch on all pairs
    ("safeclip-2", {"clip_loss", "image_unimodal_loss", "text_unimodal_loss"}),  # safe: CLIP, risky: unimodal
])
def test_batch_loss_of_each_defense(defense, terms):
    from otc_ray.model import FeatureModel, build_model

    name, epoch = (defense.split("-")[0], int(defense.split("-")[1])) if "-" in defense else (defense, 0)
    cfg = load_config(TINY, [f"train.defense={name}", "ot.intra_samples=2", "train.safeclip_warmup=1"])
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    B, S = 4, bundle.image_size
    pixels = torch.randn(B, 3, S, S)
    ids = bundle.tokenizer(["a red shoe", "a blue bag", "a green shirt", "a black coat"])
    weights = torch.tensor([1.0, 1.0, 0.0, 0.0])                               # the stage's split: 2 risky pairs
    loss, logged = get_defense(name).batch_loss(FeatureModel(bundle.model), bundle.model, pixels, ids, cfg, epoch,
                                                torch.Generator().manual_seed(0), weights)
    assert set(logged) == terms | {"total_loss"}
    total = float(loss.detach())
    assert loss.requires_grad and math.isfinite(total) and total == pytest.approx(logged["total_loss"])


def test_loop_config_round_trips_through_pickle():
    """The hand-off travels to the workers pickled (Ray's cloudpickle), with the typed config inside."""
    import ray.cloudpickle

    cfg = load_config(TINY, ["train.defense=otcclip"])
    loop = LoopConfig(cfg, "run-id", "sqlite:///runs/mlflow.db", 39, publish=WeightPublisher("otc-weights-x", cfg.rematch),
                      chaos="/tmp/marker:1:2")
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        back = loads(dumps(loop))
        assert back == loop and back.config == cfg and back.config.train.defense == "otcclip"
        assert back.evaluate is None and back.poison_keys is None and back.publish.cfg == cfg.rematch
    with pytest.raises(dataclasses.FrozenInstanceError):
        loop.steps_per_epoch = 1
