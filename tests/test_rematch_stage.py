"""The re-matching stage on a real local Ray cluster: an actor pool on 2 cores without deadlock, bad rows passed
through untouched, every row kept, and weights published by a WeightStore picked up by the actors."""
from __future__ import annotations

import dataclasses
import io
import threading

import numpy as np
import pytest
import torch

from otc_ray.config import DataConfig, ModelConfig, OTConfig, RematchConfig
from otc_ray.data import schema
from otc_ray.data.make import make_shards
from otc_ray.data.ray_io import load_samples
from otc_ray.data.shards import encode_image
from otc_ray.data.tar_format import write_tar_shard
from otc_ray.rematch import stage
from otc_ray.rematch.weights import publish, weight_store

pytestmark = pytest.mark.ray        # starts Ray (make test-fast skips it)

DATA = DataConfig(dataset="shapes", samples_per_shard=64)
MODEL = ModelConfig(arch="otc-tiny-vit-32")
OT = OTConfig(iters=30)
CFG = RematchConfig(neighbours=8, bank_size=96, block_size=48, k=4, min_actors=1, max_actors=2, actor_num_cpus=0.5)


def write_bad_shard(path: str) -> list[str]:
    """A shard with a corrupt image and an empty caption; returns their keys."""
    good_png = encode_image(np.zeros((32, 32, 3), np.uint8), "png")
    stream = io.BytesIO()
    write_tar_shard(stream, [("bad-corrupt", b"not a png", "png", "a red circle", {}),
                             ("bad-empty", good_png, "png", "   ", {})])
    with open(path, "wb") as f:
        f.write(stream.getvalue())
    return ["bad-corrupt", "bad-empty"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage") / "train"
    make_shards(DATA, "train", 192, str(out), "wds", progress=False)
    bad = write_bad_shard(str(out / "00099.tar"))
    return out, bad


def _run_with_deadline(fn, seconds: float):
    """Run fn() in a thread; fail (instead of hanging the suite) when it has not returned after `seconds`."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the stage did not finish within {seconds:.0f} s (deadlock?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _rows(ds) -> dict[str, np.ndarray]:
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def test_stage_on_an_actor_pool_keeps_every_row_and_passes_bad_rows(ray_local, shards):
    """Also the trainer's pattern: the store is named, nobody holds its handle, weights are published after the
    stage is defined (by another process in training): the stage keeps the store alive and the actors follow it."""
    path, bad = shards
    from otc_ray.model import build_model

    name = "otc-test-stage-weights"
    ds = stage.add_rematch_stage(load_samples(str(path), DATA), CFG, MODEL, OT, weights=name)
    torch.manual_seed(7)
    publish(weight_store(name), build_model(MODEL).model.state_dict())
    rows = _run_with_deadline(lambda: _rows(ds), 150)
    keys = rows[schema.KEY].tolist()
    assert len(keys) == 194 and len(set(keys)) == 194
    assert set(schema.OUTPUT_COLUMNS) <= set(rows)
    is_bad = np.isin(rows[schema.KEY], bad)
    assert sorted(rows[schema.ERROR][is_bad].tolist()) == sorted([schema.CORRUPT_IMAGE, schema.EMPTY_CAPTION])
    assert not rows[schema.FLAGGED][is_bad].any() and not rows[schema.RECAPTIONED][is_bad].any()
    assert (rows[schema.WEIGHT][is_bad] == 1).all() and np.isnan(rows[schema.SUSPICION][is_bad]).all()
    assert (rows[schema.CAPTION_USED][is_bad] == rows[schema.CAPTION][is_bad]).all()
    good = ~is_bad
    for c in (schema.OWN_SCORE, schema.BEST_SCORE, schema.SUSPICION, schema.GATE_Z):
        assert np.isfinite(rows[c][good]).all(), c
    assert (rows[schema.WEIGHTS_VERSION] == 1).all(), "every actor must have loaded the published weights"
    changed = rows[schema.CAPTION_USED] != rows[schema.CAPTION]
    assert (changed == rows[schema.RECAPTIONED]).all()
    assert (rows[schema.SOURCE_KEY][~changed] == rows[schema.KEY][~changed]).all()
    assert set(rows[schema.SOURCE_KEY][changed]) <= set(keys)
    label_of = dict(zip(rows[schema.KEY].tolist(), rows[schema.LABEL].tolist()))        # the source sample's class travels along
    assert [label_of[k] for k in rows[schema.SOURCE_KEY][good]] == rows[schema.SOURCE_LABEL][good].tolist()


def _batch(n: int = 40) -> dict[str, np.ndarray]:
    from otc_ray.data.builtin import generate

    chunk = next(iter(generate("shapes", "train", n, seed=3, image_size=32)))
    return {schema.KEY: np.asarray(chunk["keys"], dtype=object), schema.IMAGE: np.stack(chunk["images"]),
            schema.CAPTION: np.asarray(chunk["captions"], dtype=object), schema.ERROR: np.asarray([""] * n, dtype=object)}


def test_actor_picks_up_newer_weights_between_batches(ray_local):
    from otc_ray.model import build_model

    store = weight_store("otc-test-pickup")
    cfg = CFG
    torch.manual_seed(1)
    first = build_model(MODEL).model.state_dict()
    torch.manual_seed(2)
    second = build_model(MODEL).model.state_dict()
    assert publish(store, first) == 1
    actor = stage.RematchActor(cfg, MODEL, OT, weights=store)            # the class the pool runs, here in-process
    assert actor.version == 1
    batch = _batch()
    out1 = actor(batch)
    assert (out1[schema.WEIGHTS_VERSION] == 1).all()
    again = actor(batch)
    np.testing.assert_array_equal(again[schema.OWN_SCORE], out1[schema.OWN_SCORE])       # same weights, same block
    assert publish(store, second) == 2
    out2 = actor(batch)
    assert (out2[schema.WEIGHTS_VERSION] == 2).all() and actor.version == 2
    assert not np.allclose(out2[schema.OWN_SCORE], out1[schema.OWN_SCORE]), "new weights must change the scores"
    loaded = actor.matcher.model.state_dict()
    assert all(torch.equal(loaded[k], second[k]) for k in second)
    # a warm-up epoch: weights published inactive -> rows pass through unmatched, version still seen
    assert publish(store, second, active=False) == 3
    out3 = actor(batch)
    assert (out3[schema.WEIGHTS_VERSION] == 3).all() and np.isnan(out3[schema.OWN_SCORE]).all()
    assert (out3[schema.CAPTION_USED] == batch[schema.CAPTION]).all() and not out3[schema.FLAGGED].any()
    ray_local.kill(store)


def test_a_store_with_nothing_published_means_pass_through(ray_local):
    store = weight_store("otc-test-empty")
    actor = stage.RematchActor(CFG, MODEL, OT, weights=store)
    out = actor(_batch(8))
    assert actor.version == 0 and np.isnan(out[schema.SUSPICION]).all() and not out[schema.RECAPTIONED].any()
    ray_local.kill(store)


def test_sticky_flags_persist_through_the_flag_store(ray_local):
    from otc_ray.rematch.flags import flag_store

    flags = flag_store()
    batch = _batch(24)
    first = str(batch[schema.KEY][0])
    ray_local.get(flags.add.remote([first]))                      # flagged in an "earlier epoch"
    cfg = dataclasses.replace(CFG, sticky=True)
    actor = stage.RematchActor(cfg, MODEL, OT, flags=flags)
    out = actor(batch)
    assert out[schema.FLAGGED][0], "a key flagged before stays flagged"
    flagged = {str(k) for k, f in zip(out[schema.KEY], out[schema.FLAGGED]) if f}
    assert ray_local.get(flags.size.remote()) == len(flagged | {first})
    assert ray_local.get(flags.query.remote(sorted(flagged))) == [True] * len(flagged)
    unsticky = stage.RematchActor(dataclasses.replace(cfg, sticky=False, propagate=False), MODEL, OT, flags=flags)
    assert unsticky.flags is None


def test_rematch_off_passes_everything_through(ray_local):
    actor = stage.RematchActor(dataclasses.replace(CFG, enabled=False), MODEL, OT)
    batch = _batch(8)
    out = actor(batch)
    assert actor.matcher is None
    assert (out[schema.CAPTION_USED] == batch[schema.CAPTION]).all() and not out[schema.FLAGGED].any()
    assert (out[schema.WEIGHT] == 1).all()
