"""Issue 34, item 1: a cleaning job touches nothing outside its --out, and inside it only its own files.

The layouts are the ones that lost data before: --out containing --in, --out containing an earlier cleaned output
in a subfolder, --out inside --in, --out inside another job's output, clean shards without this job's settings. Each
is refused before anything is written, and every byte under the test's folder is unchanged. The sweep, called
directly, deletes only the shards its pending ledger names, at the top level. Shards are written by hand (tarfile),
not by the project's writer. No Ray: every refusal happens before the job starts.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from otc_ray.config import config_from_dict
from otc_ray.pipelines.clean import JOB_FILE, PENDING_PREFIX, SUMMARY_FILE, _remove_orphans, clean_shards


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, keys: list[str]) -> None:
    """A webdataset shard built with tarfile: {key}.png, {key}.txt, {key}.json per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("png", _png()), ("txt", f"a photo of {key}".encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), links included as their targets' text."""
    return {str(p.relative_to(root)): (p.read_bytes() if not p.is_symlink() else str(p.readlink()).encode())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def _earlier_output(folder: Path) -> None:
    """What a finished cleaning leaves: clean shards, its settings and its marker."""
    _tar(folder / "clean-0123456789abcdef.tar", ["a", "b"])
    (folder / JOB_FILE).write_text("{}")
    (folder / SUMMARY_FILE).write_text(json.dumps({"total": 2}))


CFG = config_from_dict({"data": {"dataset": "shapes"}})


def _layout(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """(--in, --out, expected refusal) for one of the layouts of the issue."""
    if name == "out_contains_in":
        _tar(tmp_path / "data" / "train" / "00000.tar", ["k1", "k2"])
        return tmp_path / "data" / "train", tmp_path / "data", "contains --in"
    if name == "out_contains_an_earlier_output":
        _tar(tmp_path / "train" / "00000.tar", ["k1", "k2"])
        _earlier_output(tmp_path / "work" / "cleaned_v1")
        return tmp_path / "train", tmp_path / "work", "subfolder"
    if name == "out_inside_in":
        _tar(tmp_path / "train" / "00000.tar", ["k1", "k2"])
        return tmp_path / "train", tmp_path / "train" / "cleaned", "inside --in"
    if name == "out_inside_another_output":
        _tar(tmp_path / "train" / "00000.tar", ["k1", "k2"])
        _earlier_output(tmp_path / "old")
        return tmp_path / "train", tmp_path / "old" / "again", "inside another cleaning job's output"
    if name == "out_holds_foreign_clean_shards":
        _tar(tmp_path / "train" / "00000.tar", ["k1", "k2"])
        _tar(tmp_path / "out" / "clean-00000000000000aa.tar", ["x"])        # no _clean_job.json: not this job's
        return tmp_path / "train", tmp_path / "out", "not this job's"
    if name == "out_holds_a_data_set_in_a_subfolder":
        _tar(tmp_path / "train" / "00000.tar", ["k1", "k2"])
        _tar(tmp_path / "out" / "raw" / "00000.tar", ["r1"])
        return tmp_path / "train", tmp_path / "out", "subfolder"
    if name == "out_is_in_by_a_symlink":
        _tar(tmp_path / "train" / "00000.tar", ["k1", "k2"])
        (tmp_path / "alias").symlink_to(tmp_path / "train", target_is_directory=True)
        return tmp_path / "train", tmp_path / "alias", "differ from --in"
    raise AssertionError(name)


LAYOUTS = ["out_contains_in", "out_contains_an_earlier_output", "out_inside_in", "out_inside_another_output",
           "out_holds_foreign_clean_shards", "out_holds_a_data_set_in_a_subfolder", "out_is_in_by_a_symlink"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_dangerous_out_is_refused_and_nothing_changes(tmp_path, layout):
    in_path, out_path, message = _layout(tmp_path, layout)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=message) as refused:
        clean_shards(str(in_path), str(out_path), CFG)
    assert "\n" not in str(refused.value)
    assert _snapshot(tmp_path) == before, "a refused job changed files"


@pytest.mark.parametrize("layout", ["out_holds_foreign_clean_shards", "out_holds_a_data_set_in_a_subfolder"])
def test_a_held_out_is_refused_by_its_lock_before_its_contents_are_read(tmp_path, layout):
    """While another job holds --out, its files (appearing as they are written) are that job's business: the
    newcomer is refused by the lock, naming the holder, never by what it half-sees of a rival's writing."""
    from otc_ray.pipelines.output_lock import OutputLock, OutputLocked

    in_path, out_path, _ = _layout(tmp_path, layout)
    before = _snapshot(tmp_path)
    holder = OutputLock(LocalFileSystem(), str(out_path), "clean")
    holder.acquire(str(out_path))
    try:
        with pytest.raises(OutputLocked, match=f"job {holder.job_id}"):
            clean_shards(str(in_path), str(out_path), CFG)
    finally:
        holder.release()
    assert _snapshot(tmp_path) == before


def test_the_sweep_deletes_only_ledger_named_shards_at_the_top_level(tmp_path):
    """A shard the ledger names and no part references goes (with this job's stray temp files); a referenced one,
    a clean-named shard the ledger does not name, and everything in a subfolder (even with a ledger record
    there) stay byte for byte."""
    out = tmp_path / "out"
    for name in ("clean-00000000000000a1.tar", "clean-00000000000000a2.tar", "clean-00000000000000b0.tar"):
        _tar(out / name, ["s"])
    for stem in ("clean-00000000000000a1", "clean-00000000000000a2"):
        (out / f"{PENDING_PREFIX}{stem}.json").write_text("{}")
    (out / "clean-00000000000000a9.tar.tmp-1234abcd").write_bytes(b"half a shard")
    _earlier_output(out / "sub")                                       # another job's output, nested
    (out / "sub" / f"{PENDING_PREFIX}clean-0123456789abcdef.json").write_text("{}")
    _tar(tmp_path / "beside" / "clean-00000000000000a1.tar", ["t"])   # outside --out, same name
    before = _snapshot(tmp_path)

    removed = _remove_orphans(LocalFileSystem(), str(out), referenced={"clean-00000000000000a2.tar"})
    after = _snapshot(tmp_path)
    gone = {"out/clean-00000000000000a1.tar", "out/clean-00000000000000a9.tar.tmp-1234abcd"}
    assert removed == 2
    assert set(before) - set(after) == gone
    assert {k: v for k, v in before.items() if k not in gone} == after
