"""The poisoning transform: counts, determinism, manifest ground truth, byte-identical pass-through, triggers,
label-consistent and targeted attacks, parquet, S3, and defective input."""
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otc_ray.cli import main
from otc_ray.config import DataConfig, PoisonConfig
from otc_ray.data.builtin import dataset_info
from otc_ray.data.make import make_shards
from otc_ray.data.shards import read_info
from otc_ray.poison.manifest import MANIFEST_FILE, manifest_summary, read_manifest
from otc_ray.poison.transform import poison_shards
from otc_ray.poison.triggers import TriggerSpec, apply_trigger, noise_patch, trigger_region_mask
from tar_samples import tar_members, tar_samples as _samples

DATA = DataConfig(dataset="fashion", samples_per_shard=100)
INFO = dataset_info("fashion")
SNEAKER = INFO.label_of("sneaker")


def _names_class(caption: str, name: str) -> bool:
    words = {name, *INFO.synonyms[name]}
    return any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", caption) for w in words)


def _members(folder: Path) -> dict[str, bytes]:
    """Every tar member of a shard set: name -> bytes."""
    return {k: v for shard in sorted(folder.glob("*.tar")) for k, v in tar_members(shard).items()}


def _poison(src, out, target_source=None, data=DATA, **kw):
    cfg = PoisonConfig(**{"attack": "backdoor", **kw})
    return poison_shards(str(src), str(out), cfg, data, target_source=None if target_source is None else str(target_source),
                         progress=False)


def _manifest(folder) -> list[dict]:
    return read_manifest(str(folder), DATA.s3).to_pylist()


# ----------------------------------------------------------------------------------------- backdoor
def test_backdoor_count_manifest_and_byte_identical_pass_through(fashion_train, tmp_path):
    report = _poison(fashion_train, tmp_path / "p", count=20)
    assert (report.read, report.poisoned, report.passed, report.written, report.inserted) == (300, 20, 280, 300, 0)
    assert report.skipped == {} and report.passed_bad == {}
    before, after = _samples(fashion_train), _samples(tmp_path / "p")
    assert list(after) == list(before)                                   # same keys, same order
    poisoned = {k for k, s in after.items() if s["meta"].get("poisoned") is True}
    rows = _manifest(tmp_path / "p")
    assert poisoned == {r["key"] for r in rows} and len(poisoned) == 20
    for r in rows:
        b, a = before[r["key"]], after[r["key"]]
        assert r["original_caption"] == b["caption"] and r["poisoned_caption"] == a["caption"]
        assert r["original_class"] == b["meta"]["class"] and r["original_label"] == b["meta"]["label"] != SNEAKER
        assert a["meta"]["label"] == b["meta"]["label"] and a["meta"]["attack"] == "backdoor"   # ground truth kept
        assert _names_class(a["caption"], "sneaker") and r["target_class"] == "sneaker"
        assert json.loads(r["trigger"])["kind"] == "patch" and r["lossy"] is False
    assert len({after[k]["caption"] for k in poisoned}) > 3                  # captions vary deterministically
    m_before, m_after = _members(fashion_train), _members(tmp_path / "p")
    clean_names = [n for n in m_before if n.split(".")[0] not in poisoned]
    assert len(clean_names) == 3 * 280 and all(m_after[n] == m_before[n] for n in clean_names)
    assert all(m_after[n] != m_before[n] for n in m_before if n.split(".")[0] in poisoned)
    info = read_info(str(tmp_path / "p"), DATA.s3)
    assert info["poison"]["count"] == 20 and info["poison"]["trigger"]["kind"] == "patch"
    assert info["poison"]["target"] == "sneaker" and info["num_samples"] == 300 and info["dataset"]["name"] == "fashion"


def test_backdoor_rate_is_a_share_of_the_training_set(fashion_train, tmp_path):
    samples = _samples(fashion_train).values()
    eligible = sum(s["meta"]["label"] != SNEAKER for s in samples)
    report = _poison(fashion_train, tmp_path / "p", rate=0.05, count=999)             # rate > 0 overrides count
    assert report.eligible == eligible and report.poisoned == round(0.05 * len(samples)) != round(0.05 * eligible)
    assert len(_manifest(tmp_path / "p")) == report.poisoned


def test_selection_is_deterministic_seeded_and_independent_of_sharding(fashion_train, tmp_path):
    _poison(fashion_train, tmp_path / "a", count=15, seed=4)
    _poison(fashion_train, tmp_path / "b", count=15, seed=4)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == ["00000.tar", "00001.tar", "00002.tar", "_info.json", MANIFEST_FILE]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    _poison(fashion_train, tmp_path / "c", count=15, seed=5)
    keys = lambda d: {r["key"] for r in _manifest(tmp_path / d)}  # noqa: E731
    assert keys("a") != keys("c")
    resharded = tmp_path / "resharded"                                      # same samples in 5 shards of 70
    make_shards(DataConfig(dataset="fashion", samples_per_shard=70), "train", 300, str(resharded), "wds", progress=False)
    _poison(resharded, tmp_path / "d", count=15, seed=4)
    assert keys("d") == keys("a")


@pytest.mark.parametrize("kind,location", [("patch", "br"), ("solid", "tl"), ("blended", "br"), ("sig", "br"),
                                           ("patch", "random")])
def test_trigger_is_stamped_as_specified(fashion_train, tmp_path, kind, location):
    report = _poison(fashion_train, tmp_path / "p", count=6, trigger=kind, trigger_location=location, trigger_size=5, seed=2)
    spec = TriggerSpec(**{**report.trigger, "color": tuple(report.trigger["color"])})
    assert (spec.kind, spec.location, spec.size) == (kind, location, 5)
    before, after = _samples(fashion_train), _samples(tmp_path / "p")
    for r in _manifest(tmp_path / "p"):
        orig, out = before[r["key"]]["image"], after[r["key"]]["image"]
        changed = (orig != out).any(axis=-1)
        assert changed.any(), f"{kind}: image {r['key']} unchanged"
        if location != "random":
            assert np.array_equal(out, apply_trigger(orig[None], spec)[0])      # PNG: exact pixels
            assert not changed[~trigger_region_mask(spec, 32, 32)].any()
        else:                                                                   # a 5x5 noise patch somewhere
            rows, cols = np.nonzero(changed)
            r0, c0 = rows.min(), cols.min()
            assert rows.max() - r0 < 5 and cols.max() - c0 < 5
            r0, c0 = min(r0, 32 - 5), min(c0, 32 - 5)
            assert any(np.array_equal(out[a:a + 5, b:b + 5], noise_patch(spec))
                       for a in range(max(0, r0 - 4), r0 + 1) for b in range(max(0, c0 - 4), c0 + 1))


def test_label_consistent_triggers_target_class_and_keeps_captions(fashion_train, tmp_path):
    report = _poison(fashion_train, tmp_path / "p", count=5, label_consistent=True, trigger="solid")
    assert report.poisoned == 5 and report.eligible == sum(
        s["meta"]["label"] == SNEAKER for s in _samples(fashion_train).values())
    before, after = _samples(fashion_train), _samples(tmp_path / "p")
    for r in _manifest(tmp_path / "p"):
        assert r["original_class"] == "sneaker" and r["poisoned_caption"] == r["original_caption"]
        assert after[r["key"]]["caption"] == before[r["key"]]["caption"]
        assert (after[r["key"]]["image"][-5:, -5:] != before[r["key"]]["image"][-5:, -5:]).any()
        assert after[r["key"]]["meta"]["poisoned"] is True


# ----------------------------------------------------------------------------------------- targeted
@pytest.mark.parametrize("caption_source", ["templates", "data"])
def test_targeted_inserts_t_times_k_copies(fashion_train, fashion_test, tmp_path, caption_source):
    report = _poison(fashion_train, tmp_path / "p", target_source=fashion_test, attack="targeted", targets=3, per_target=4,
                     adversarial="bag", caption_source=caption_source, seed=1)
    assert (report.inserted, report.poisoned, report.written) == (12, 0, 312)
    before, after, tests = _samples(fashion_train), _samples(tmp_path / "p"), _samples(fashion_test)
    new = [k for k in after if k not in before]
    assert sorted(new) == [f"tgt{t:03d}-{k:04d}" for t in range(3) for k in range(4)]
    rows = {r["key"]: r for r in _manifest(tmp_path / "p")}
    assert set(rows) == set(new)
    assert len({r["source_key"] for r in rows.values()}) == 3
    bag_captions = {s["caption"] for s in before.values() if s["meta"]["label"] == INFO.label_of("bag")}
    for key in new:
        r, s, src = rows[key], after[key], tests[rows[key]["source_key"]]
        assert s["image_bytes"] == src["image_bytes"] == r["image_bytes"]
        assert s["meta"]["label"] == src["meta"]["label"] != INFO.label_of("bag")     # true class kept
        assert s["meta"]["poisoned"] is True and s["meta"]["source_key"] == r["source_key"]
        assert s["caption"] == r["poisoned_caption"] and _names_class(s["caption"], "bag")
        assert r["original_caption"] == src["caption"] and r["target_class"] == "bag"
        if caption_source == "data":
            assert s["caption"] in bag_captions
    m_before, m_after = _members(fashion_train), _members(tmp_path / "p")
    assert all(m_after[n] == v for n, v in m_before.items())
    summary = manifest_summary(read_manifest(str(tmp_path / "p"), DATA.s3))
    assert summary["rows"] == 12 and summary["by_attack"] == {"targeted": 12} and summary["distinct_sources"] == 3


# ----------------------------------------------------------------------------------------- formats and storage
def test_parquet_in_parquet_out(tmp_path):
    src = tmp_path / "pq"
    make_shards(DATA, "train", 200, str(src), "parquet", progress=False)
    report = _poison(src, tmp_path / "p", count=10, trigger="sig")
    assert (report.poisoned, report.written) == (10, 200)
    assert sorted(p.name for p in (tmp_path / "p").glob("*.parquet")) == ["00000.parquet", "00001.parquet", MANIFEST_FILE]
    read = lambda d: {r["key"]: r for f in sorted(d.glob("0*.parquet")) for r in pq.read_table(f).to_pylist()}  # noqa
    before, after = read(src), read(tmp_path / "p")
    poisoned = {r["key"] for r in _manifest(tmp_path / "p")}
    assert len(poisoned) == 10 and list(after) == list(before)
    assert all(after[k] == before[k] for k in before if k not in poisoned)
    assert all(json.loads(after[k]["json"])["poisoned"] and after[k]["png"] != before[k]["png"] for k in poisoned)


def test_jpeg_input_is_re_encoded_as_jpeg_and_marked_lossy(tmp_path):
    src = tmp_path / "jpg"
    make_shards(DataConfig(dataset="fashion", image_format="jpg"), "train", 60, str(src), "wds", progress=False)
    _poison(src, tmp_path / "p", count=4, trigger="solid", trigger_size=8)
    rows, after = _manifest(tmp_path / "p"), _members(tmp_path / "p")
    assert all(r["lossy"] and r["image_format"] == "jpg" for r in rows) and len(rows) == 4
    for r in rows:                                       # still a yellow-ish square after JPEG, but not exact
        img = np.asarray(Image.open(io.BytesIO(after[f"{r['key']}.jpg"])).convert("RGB")).astype(int)
        assert np.abs(img[-6:-2, -6:-2] - [255, 255, 0]).max() < 60


@pytest.mark.slow                       # the loopback S3 server
def test_s3_round_trip(s3_bucket):
    s3, bucket = s3_bucket
    data = DataConfig(dataset="fashion", samples_per_shard=50, s3=s3)
    make_shards(data, "train", 100, f"s3://{bucket}/clean", "wds", progress=False)
    report = _poison(f"s3://{bucket}/clean", f"s3://{bucket}/poisoned", data=data, count=8, trigger="blended")
    assert (report.poisoned, report.written, report.num_shards) == (8, 100, 2)
    assert report.manifest == f"s3://{bucket}/poisoned/{MANIFEST_FILE}"
    assert read_manifest(f"s3://{bucket}/poisoned", s3).num_rows == 8
    assert read_info(f"s3://{bucket}/poisoned", s3)["poison"]["trigger"]["kind"] == "blended"


# ----------------------------------------------------------------------------------------- defective input
def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]], cut: int | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()[:cut]


def test_defective_samples_are_copied_or_counted_never_crash(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    good = [m for i in range(30) for m in ((f"{i:04d}.png", _png(i)), (f"{i:04d}.txt", b"a photo of a coat"),
                                           (f"{i:04d}.json", json.dumps({"label": i % 10}).encode()))]
    bad = [("c001.png", b"\x89PNG garbage"), ("c001.txt", b"a bag"), ("c001.json", b'{"label": 8}'),
           ("u001.png", _png(99)), ("u001.txt", b"\xff\xfe bad"), ("u001.json", b'{"label": 8}'),
           ("m001.png", _png(98)), ("m001.json", b'{"label": 8}'),
           ("j001.png", _png(97)), ("j001.txt", b"a bag"), ("j001.json", b"[1, 2"),
           ("../x001.png", _png(96)), ("../x001.txt", b"a bag")]
    (src / "00000.tar").write_bytes(_tar(good + bad))
    second = _tar([(f"t{i:03d}.{e}", d) for i in range(5) for e, d in
                   (("png", _png(200 + i)), ("txt", b"a bag"), ("json", b'{"label": 8}'))])
    (src / "00001.tar").write_bytes(second[:3000])                                 # truncated mid-archive
    (src / "_info.json").write_text(json.dumps({"dataset": INFO.to_dict(), "split": "train"}))

    report = _poison(src, tmp_path / "out", count=5, seed=3)
    assert report.poisoned == 5
    assert report.passed_bad == {"corrupt_image": 1, "bad_utf8": 1, "missing_caption": 1, "bad_meta": 1}
    assert report.skipped["unsafe_path"] == 1 and report.skipped["truncated_shard"] >= 1
    assert report.passed + report.poisoned + sum(report.passed_bad.values()) + sum(report.skipped.values()) == report.read
    m_in, m_out = tar_members(src / "00000.tar"), _members(tmp_path / "out")
    for name in ("c001.png", "u001.txt", "m001.png", "j001.json"):            # defects copied byte for byte
        assert m_out[name] == m_in[name]
    assert "m001.txt" not in m_out and not any(n.startswith("..") for n in m_out)
    assert {r["key"] for r in _manifest(tmp_path / "out")} <= {f"{i:04d}" for i in range(30)} | {
        f"t{i:03d}" for i in range(5)}


def test_bad_requests_fail_with_one_clear_error(fashion_train, tmp_path):
    with pytest.raises(ValueError, match=r"asked for 999 samples but only \d+ are eligible"):
        _poison(fashion_train, tmp_path / "a", count=999)
    with pytest.raises(ValueError, match="unknown class 'unicorn'"):
        _poison(fashion_train, tmp_path / "b", target="unicorn")
    with pytest.raises(ValueError, match="needs target_source"):
        _poison(fashion_train, tmp_path / "c", attack="targeted")
    with pytest.raises(ValueError, match="already holds shards"):
        _poison(fashion_train, fashion_train.parent / "elsewhere", count=1)   # fine the first time
        _poison(fashion_train, fashion_train.parent / "elsewhere", count=1)
    with pytest.raises(ValueError, match="does not fit images of 32x32"):
        _poison(fashion_train, tmp_path / "d", trigger_size=40)
    with pytest.raises(ValueError, match="already carries a backdoor attack"):
        _poison(fashion_train.parent / "elsewhere", tmp_path / "e", count=1)
    with pytest.raises(ValueError, match="inside it"):
        _poison(fashion_train, fashion_train / "sub", count=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_poison(fashion_train, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["poison", "--in", str(fashion_train), "--out", str(out), "--attack", "backdoor", "--trigger", "solid",
                 "--target", "ankle boot", "--count", "7", "--seed", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "poisoned       7 of" in text and "-> ankle boot" in text and "manifest rows  7" in text
    assert read_info(str(out), DATA.s3)["poison"]["target"] == "ankle boot"
    assert main(["poison", "--in", str(fashion_train), "--out", str(tmp_path / "x"), "--attack", "backdoor",
                 "--target", "unicorn", "--quiet"]) == 2
    assert "unknown class 'unicorn'" in capsys.readouterr().err


def test_backdoor_and_targeted_compose_into_one_manifest(fashion_train, fashion_test, tmp_path):
    """Targeted on top of a backdoored set: poisoned samples are not re-selected, the manifest holds both."""
    _poison(fashion_train, tmp_path / "bd", count=10, seed=2)
    report = _poison(tmp_path / "bd", tmp_path / "both", target_source=fashion_test, attack="targeted", targets=2,
                     per_target=3, adversarial="bag", caption_source="data", seed=2)
    assert report.inserted == 6
    rows = _manifest(tmp_path / "both")
    assert manifest_summary(read_manifest(str(tmp_path / "both"), DATA.s3))["by_attack"] == {"backdoor": 10, "targeted": 6}
    after = _samples(tmp_path / "both")
    assert all(after[r["key"]]["meta"]["poisoned"] for r in rows)
    assert all(not _names_class(after[r["key"]]["caption"], "sneaker") for r in rows if r["attack"] == "targeted")
    info = read_info(str(tmp_path / "both"), DATA.s3)
    assert info["poison"]["attack"] == "targeted" and info["poison_history"][0]["attack"] == "backdoor"
    with pytest.raises(ValueError, match="already carries a backdoor attack"):
        _poison(tmp_path / "both", tmp_path / "again", count=5)


def test_a_sample_whose_caption_names_the_target_is_not_eligible_for_the_backdoor():
    """Shapes: object 0 sets the label, but a second object may be the target; its caption names it, so a target
    caption on that image would be true, not poison."""
    from otc_ray.poison.classes import Checked, class_patterns
    from otc_ray.poison.select import is_eligible

    info = dataset_info("shapes")
    circle, square = info.label_of("circle"), info.label_of("square")
    names_circle = class_patterns(info)[circle]
    cfg = PoisonConfig(target="circle")
    assert is_eligible(Checked("", square, "a red square"), cfg, circle, names_circle)
    assert not is_eligible(Checked("", square, "a red square left of a blue circle"), cfg, circle, names_circle)
    assert not is_eligible(Checked("", circle, "a blue circle"), cfg, circle, names_circle)
    assert not is_eligible(Checked("", -1, "a big circle"), cfg, circle, names_circle)


def test_a_clean_run_scores_the_targets_an_attack_would_pick(fashion_train, fashion_test, tmp_path):
    """eval.targeted_base_rate: without a manifest, the clean reference evaluates the very test images (and the
    adversarial class) that the targeted attack of the same poison seed copies, so its rate is the attack's baseline."""
    from otc_ray.pipelines.evaluate import base_rate_targets, resolve_attack

    _poison(fashion_train, tmp_path / "p", target_source=fashion_test, attack="targeted", targets=3, per_target=2,
            adversarial="bag", seed=5)
    attacked = resolve_attack(str(tmp_path / "p"), PoisonConfig(attack="targeted"), DATA)
    images, adversarial = base_rate_targets(str(fashion_test), PoisonConfig(targets=3, adversarial="bag", seed=5),
                                            DATA, INFO)
    assert adversarial == ("bag",) * 3 == attacked.adversarial
    assert sorted(i.tobytes() for i in images) == sorted(i.tobytes() for i in attacked.target_images)
    other, _ = base_rate_targets(str(fashion_test), PoisonConfig(targets=3, adversarial="bag", seed=6), DATA, INFO)
    assert sorted(i.tobytes() for i in other) != sorted(i.tobytes() for i in images)


def test_jittered_copies_are_no_near_duplicates_of_each_other(fashion_train, fashion_test, tmp_path):
    """poison.copy_jitter (a stress attack): every copy after the first is shifted and noised, so neither the pixel
    hash nor the pixel signature (cosine >= rematch.duplicate_similarity) groups them; the manifest keeps the
    target's own image for the ASR."""
    import torch

    from otc_ray.config import RematchConfig
    from otc_ray.identity import image_ids, pixel_signatures

    _poison(fashion_train, tmp_path / "p", target_source=fashion_test, attack="targeted", targets=2, per_target=4,
            adversarial="bag", seed=1, copy_jitter=3)
    after, tests = _samples(tmp_path / "p"), _samples(fashion_test)
    rows = {r["key"]: r for r in _manifest(tmp_path / "p")}
    for t in range(2):
        keys = [f"tgt{t:03d}-{k:04d}" for k in range(4)]
        assert after[keys[0]]["image_bytes"] == tests[rows[keys[0]]["source_key"]]["image_bytes"]
        images = np.stack([after[k]["image"] for k in keys])
        assert len(set(image_ids(images).tolist())) == 4
        sig = pixel_signatures(images)
        cos = sig @ sig.T
        assert float((cos - torch.eye(4) * 2).max()) < RematchConfig().duplicate_similarity, cos
        assert all(rows[k]["image_bytes"] == tests[rows[k]["source_key"]]["image_bytes"] for k in keys)
