"""Issue 34, items 3 and 4: a key in two shards is a counted duplicate (first file wins) in inspect and clean, also
on resume; and the cleaning job is a function of its input, checkpoint and settings: byte-identical shards and
report whether it ran with 1 or 2 actors or was interrupted and resumed. Shards are built by hand with tarfile;
every byte outside --out is unchanged by the runs."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otc_ray.config import config_from_dict
from otc_ray.data import schema
from otc_ray.pipelines.clean import PART_PREFIX, PENDING_PREFIX, REPORT_FILE, SUMMARY_FILE, clean_shards

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
REMATCH = {"block_size": 16, "k": 4, "neighbours": 8, "bank_size": 24, "min_actors": 1,
           "max_actors": 1, "actor_num_cpus": 0.5, "gate_threshold": -1.0, "gate_reference": 8}


def _cfg(**rematch):
    return config_from_dict({"data": {"dataset": "shapes", "samples_per_shard": 12, "image_size": 32},
                             "rematch": {**REMATCH, **rematch}, "ot": {"iters": 20}})


def _sample(rng, key: str, caption: str) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return [(f"{key}.png", buf.getvalue()), (f"{key}.txt", caption.encode()),
            (f"{key}.json", json.dumps({"label": int(rng.integers(0, 3))}).encode())]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 shards of 18 samples; key "dup" is in shard 0 and shard 2 (different captions)."""
    root = tmp_path_factory.mktemp("det")
    rng = np.random.default_rng(3)
    (root / "in").mkdir()
    for s in range(3):
        members = []
        for i in range(18):
            members += _sample(rng, f"s{s}-{i:03d}", f"a {COLOURS[(i + s) % 4]} {SHAPES[i % 3]}")
        members += _sample(rng, "dup", f"copy in shard {s}") if s in (0, 2) else []
        _write_tar(root / "in" / f"{s:05d}.tar", members)
    return root


def _files(folder: Path, skip=(SUMMARY_FILE,)) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in skip}


def _outside(root: Path, outs: list[Path]) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(o in p.parents for o in outs)}


def test_duplicates_and_byte_identical_output_with_1_or_2_actors_and_after_resume(ray_local, shards):
    from otc_ray.data.inspect import inspect_shards

    in_path = str(shards / "in")
    outs = [shards / name for name in ("one", "two", "resumed")]
    before = _outside(shards, outs)

    report = inspect_shards(in_path, _cfg().data)
    assert report.total == 3 * 18 + 2 and report.skipped == {schema.DUPLICATE_KEY: 1} and report.duplicate_keys == 1

    one = clean_shards(in_path, str(outs[0]), _cfg())
    two = clean_shards(in_path, str(outs[1]), _cfg(min_actors=2, max_actors=2))
    assert one.total == two.total == 3 * 18 + 2 and one.dropped_by_reason.get(schema.DUPLICATE_KEY) == 1
    rows = pq.read_table(outs[0] / REPORT_FILE).to_pylist()
    dup = [r for r in rows if r["key"] == "dup"]
    assert [(Path(r["source"]).name, r["reason"]) for r in dup] == [("00000.tar", dup[0]["reason"]),
                                                                  ("00002.tar", schema.DUPLICATE_KEY)]
    assert dup[0]["caption"] == "copy in shard 0" and dup[0]["reason"] != schema.DUPLICATE_KEY
    assert all(r["source"] for r in rows), "every report row names its input file"
    shards_one = {k: v for k, v in _files(outs[0]).items() if k.startswith("clean-")}
    assert shards_one and shards_one == {k: v for k, v in _files(outs[1]).items() if k.startswith("clean-")}
    assert (outs[0] / REPORT_FILE).read_bytes() == (outs[1] / REPORT_FILE).read_bytes()

    # an interrupted run: the state a kill leaves after some shards (marker, report, info not yet written; half the
    # parts gone; a shard written but its part not, named in the ledger)
    first = clean_shards(in_path, str(outs[2]), _cfg())
    assert first.total == one.total
    for name in (SUMMARY_FILE, REPORT_FILE, "_info.json"):
        (outs[2] / name).unlink()
    import pyarrow as pa

    from otc_ray.pipelines.clean import REPORT_SCHEMA

    stems = sorted(p.stem for p in outs[2].glob("clean-*.tar"))
    assert len(stems) >= 3
    for stem in stems[: len(stems) // 2]:                              # never committed: gone
        (outs[2] / f"{stem}.tar").unlink()
    (outs[2] / f"{PENDING_PREFIX}{stems[-1]}.json").write_text("{}")   # shard written, part not: rewritten
    for stem in stems[len(stems) // 2:-1]:                             # committed: shard, its ledger record, its part
        (outs[2] / f"{PENDING_PREFIX}{stem}.json").write_text("{}")
        part = [r for r in rows if r["shard"] == f"{stem}.tar"]
        pq.write_table(pa.Table.from_pylist(part, schema=REPORT_SCHEMA), outs[2] / f"{PART_PREFIX}{stem}.parquet")
    resumed = clean_shards(in_path, str(outs[2]), _cfg())
    assert 0 < resumed.resumed < resumed.total == one.total
    assert _files(outs[2]) == _files(outs[0]), "a resumed run differs from an uninterrupted one"
    assert _outside(shards, outs) == before, "a run changed a file outside its --out"


def test_a_block_s_decisions_do_not_depend_on_the_order_blocks_come_in():
    """With a fixed reference (what the cleaning job gives every actor), a block's flags, gate z and chosen captions
    are the same whichever blocks a matcher saw before it; with the FIFO bank they are not (the bug of issue 34)."""
    import torch

    from otc_ray.model import build_model
    from otc_ray.rematch.matcher import Matcher

    cfg = _cfg()
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 32, 32, 3), dtype=np.uint8)
    captions = [f"a {COLOURS[i % 4]} {SHAPES[i % 3]} {i % 5}" for i in range(60)]
    keys = [f"k{i:02d}" for i in range(60)]

    def decisions(order: list[int], reference: bool) -> dict:
        matcher = Matcher(bundle, cfg.rematch, cfg.ot)
        if reference:
            matcher.set_reference(images[:24], captions[:24], keys[:24], [-1] * 24)
        out = {}
        for b in order:
            rows = slice(b * 12, b * 12 + 12)
            r = matcher.match(images[rows], captions[rows], keys[rows]).result
            out[b] = (r.flagged.tolist(), np.round(r.gate_z.numpy(), 5).tolist(), r.source.tolist())
        return out

    assert decisions([0, 1, 2, 3, 4], True) == decisions([4, 2, 0, 3, 1], True)
    assert decisions([0, 1, 2, 3, 4], False) != decisions([4, 2, 0, 3, 1], False)
