"""Every epoch trains on other batches, reproducibly: the worker's local shuffle is reseeded from
(train.seed, epoch, rank) (`loop._batches`), on a real Ray Data stream; and after the witness warm-up the model
restarts from its initial state (`loop._snapshot` / `loop._reset`)."""
from __future__ import annotations

import dataclasses

from otc_ray.config import Config, TrainConfig
from otc_ray.train.loop import _batches


def _epoch_batches(ds, cfg: Config, epoch: int, rank: int = 0) -> list[tuple[int, ...]]:
    return [tuple(sorted(b["id"].tolist())) for b in ds.iterator().iter_batches(**_batches(cfg, epoch, rank))]


def test_each_epoch_shuffles_differently_and_a_rerun_repeats_it(ray_local):
    # materialized: the blocks' order is fixed, so the test sees the shuffle alone (a live stream under load may
    # deliver blocks in another order; that is the stream's nondeterminism, not the shuffle's)
    ds = ray_local.data.range(1024, override_num_blocks=8).map_batches(lambda b: b, batch_format="numpy").materialize()
    cfg = Config(train=TrainConfig(batch_size=64, shuffle_buffer=512, seed=3))
    first, second = _epoch_batches(ds, cfg, 0), _epoch_batches(ds, cfg, 1)
    assert len(first) == len(second) == 1024 // 64
    assert sorted(i for b in first for i in b) == list(range(1024))                 # every row once per epoch
    assert set(first) != set(second), "two epochs must not train on the same batches"
    assert _epoch_batches(ds, cfg, 0) == first, "the same seed and epoch repeat the same batches"
    other_seed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=4))
    assert _epoch_batches(ds, other_seed, 0) != first
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, shuffle_buffer=0))
    assert _epoch_batches(ds, off, 0) == _epoch_batches(ds, off, 1), "shuffle_buffer 0: stream order"


def test_witness_reset_restores_the_initial_weights_optimizer_and_schedule():
    """After the witness warm-up the model restarts: weights, optimizer moments and LR schedule as before it."""
    import torch

    from otc_ray.train.loop import _reset, _snapshot
    from otc_ray.train.schedule import warmup_cosine

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = warmup_cosine(optimizer, 3, 20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr0 = optimizer.param_groups[0]["lr"]
    initial = _snapshot(model, optimizer, scheduler)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
    assert not torch.equal(model.weight, before["weight"]) and optimizer.param_groups[0]["lr"] != lr0
    _reset(initial, model, optimizer, scheduler)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert optimizer.param_groups[0]["lr"] == lr0 and scheduler.last_epoch == 0
    assert optimizer.state_dict()["state"] == {}, "no Adam moments survive the reset"
