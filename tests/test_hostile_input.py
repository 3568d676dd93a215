"""Hostile input: unsafe tar members, images that claim to be huge, over-long captions, checkpoints that carry
pickled code, secrets that must stay out of MLflow and the console, and fuzzed shards (random bytes, bit flips,
truncation, inserted garbage) that must never crash a reader and must leave every row counted."""
from __future__ import annotations

import io
import os
import shlex
import struct
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otc_ray.cli import main
from otc_ray.config import ModelConfig, load_config
from otc_ray.data import schema
from otc_ray.data.decode import DecodeLimits, decode_batch, decode_image
from otc_ray.data.parquet_format import iter_parquet_samples, write_parquet_shard
from otc_ray.data.ray_io import _to_block, count_outcomes, load_samples
from otc_ray.data.shards import encode_image
from otc_ray.data.tar_format import iter_tar_samples, write_tar_shard

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
REASONS = set(schema.SKIP_REASONS) | {""}
FUZZ = settings(max_examples=int(os.environ.get("OTC_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _png(side: int = 16, value: int = 120) -> bytes:
    return encode_image(np.full((side, side, 3), value, np.uint8), "png")


def _tar(members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            info, payload = m if isinstance(m, tuple) else (m, b"")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload else None)
    return buf.getvalue()


def _member(name: str, payload: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, payload


def _sample(key: str, image: bytes | None = None) -> list:
    return [_member(f"{key}.png", image if image is not None else _png()),
            _member(f"{key}.txt", f"a grey square {key}".encode()), _member(f"{key}.json", b'{"label": 0}')]


def _rows_to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """What a Ray read task hands the decoder: the rows as an Arrow block of the reader schema, as numpy."""
    table = _to_block(rows)
    return {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}


def _check_counted(rows: list[dict], limits: DecodeLimits) -> Counter:
    """Every row has a key and a known reason, survives the Arrow block schema and the decoder; returns outcomes."""
    assert all(isinstance(r[schema.KEY], str) and r[schema.KEY] for r in rows)
    assert all(r[schema.ERROR] in REASONS for r in rows)
    if not rows:
        return Counter()
    decoded = decode_batch(_rows_to_batch(rows), limits)
    assert len(decoded[schema.KEY]) == len(rows)
    assert all(str(e) in REASONS for e in decoded[schema.ERROR])
    return Counter(str(e) or "ok" for e in decoded[schema.ERROR])


LIMITS = DecodeLimits(image_size=16, max_pixels=25_000_000, max_caption_chars=200, truncate_captions=False)


# ----------------------------------------------------------------------------------------- unsafe tar members
UNSAFE = {
    "absolute": [_member("/etc/cron.d/000000001.png", _png())],
    "dotdot": [_member("../../000000002.png", _png())],
    "dotdot_inside": [_member("shards/../../000000003.png", _png())],
    "symlink": [_member("000000004.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd")],
    "hardlink": [_member("000000005.png", kind=tarfile.LNKTYPE, linkname="/etc/shadow")],
    "char_device": [_member("000000006.png", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "block_device": [_member("000000007.png", kind=tarfile.BLKTYPE, devmajor=8, devminor=0)],
    "fifo": [_member("000000008.png", kind=tarfile.FIFOTYPE)],
    "long_name_escape": [_member("x/" * 60 + "../" * 70 + "000000009.png", _png())],     # GNU longname record
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_tar_member_is_refused(case):
    """The member's sample is `unsafe_path` whatever else it carries, its bytes are not used, and the good sample
    beside it is untouched. (Nothing is ever extracted: the reader parses headers from the stream.)"""
    members = _sample("000000000") + UNSAFE[case]
    key = UNSAFE[case][0][0].name.rsplit(".", 1)[0]
    members += [_member(f"{key}.txt", b"caption"), _member(f"{key}.json", b"{}")]
    rows = list(iter_tar_samples(io.BytesIO(_tar(members)), "hostile.tar"))
    assert [(r[schema.KEY], r[schema.ERROR]) for r in rows] == [("000000000", ""), (key, schema.UNSAFE_PATH)]
    assert rows[1][schema.IMAGE_BYTES] == b"", "an unsafe member's bytes must not be used"
    assert _check_counted(rows, LIMITS) == Counter({"ok": 1, schema.UNSAFE_PATH: 1})


def test_pax_path_record_overrides_a_safe_looking_header_name():
    """A pax header whose `path` record escapes, in front of an innocent ustar name, is judged by the pax path."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("000000001.png")                 # what a naive reader of the ustar header sees
        info.pax_headers = {"path": "../../etc/000000001.png"}  # what tar extraction would use
        payload = _png()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    rows = list(iter_tar_samples(io.BytesIO(buf.getvalue()), "pax.tar"))
    assert [r[schema.ERROR] for r in rows] == [schema.UNSAFE_PATH]


def test_non_utf8_member_name_is_a_counted_row_not_a_crash():
    """A latin-1 (or corrupted) member name must not break the Arrow block of a Ray read task: the key keeps its
    undecodable bytes as \\xNN escapes (found by the fuzz test below: a read task raised UnicodeEncodeError), and
    the sample is an `unsafe_path` skip (no writer could write that key back: otc_ray.data.keys)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, payload in (("caf\xe9.png", _png()), ("caf\xe9.txt", b"a caption"), ("caf\xe9.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    rows = list(iter_tar_samples(io.BytesIO(buf.getvalue()), "latin1.tar"))
    assert [(r[schema.KEY], r[schema.ERROR]) for r in rows] == [("caf\\xe9", schema.UNSAFE_PATH)]
    assert _check_counted(rows, LIMITS) == Counter({schema.UNSAFE_PATH: 1})


# ----------------------------------------------------------------------------------------- decompression bombs
def _png_claiming(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims width x height RGB pixels (decoding it would need width*height*3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_png_header_claiming_50000x50000_is_refused_before_decoding(monkeypatch):
    """Our pixel limit alone refuses the bomb: Pillow's own guard is switched off here (MAX_IMAGE_PIXELS None), so
    this fails if `data.max_pixels` is not checked before decoding."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = _png_claiming(50_000, 50_000)
    assert len(bomb) < 100
    assert Image.open(io.BytesIO(bomb)).size == (50_000, 50_000)      # Pillow opens it without complaint now
    start = time.monotonic()
    assert decode_image(bomb, LIMITS) == (None, schema.IMAGE_TOO_LARGE)
    small = DecodeLimits(16, max_pixels=64 * 64 - 1, max_caption_chars=200, truncate_captions=False)
    assert decode_image(_png(64), small) == (None, schema.IMAGE_TOO_LARGE)                 # the limit is the config's
    assert decode_image(_png(64), LIMITS)[1] == ""
    assert time.monotonic() - start < 2.0, "the image was decoded (7.5 GB of pixels)"
    rows = list(iter_tar_samples(io.BytesIO(_tar(_sample("000000001", bomb) + _sample("000000002"))), "b.tar"))
    assert _check_counted(rows, LIMITS) == Counter({"ok": 1, schema.IMAGE_TOO_LARGE: 1})


# ----------------------------------------------------------------------------------------- over-long captions
@pytest.mark.parametrize("overflow, expected", [("skip", schema.CAPTION_TOO_LONG), ("truncate", "")])
def test_overlong_caption_follows_config(overflow, expected):
    cfg = load_config(TINY, ["data.max_caption_chars=64", f"data.caption_overflow={overflow}", "data.image_size=16"])
    limits = DecodeLimits.from_config(cfg.data)
    caption = ("word " * 400_000).encode()                                          # 2 MB of caption
    members = _sample("000000001")[:1] + [_member("000000001.txt", caption), _member("000000001.json", b"{}")]
    rows = list(iter_tar_samples(io.BytesIO(_tar(members)), "c.tar"))
    decoded = decode_batch(_rows_to_batch(rows), limits)
    assert list(decoded[schema.ERROR]) == [expected]
    if overflow == "truncate":
        assert len(decoded[schema.CAPTION][0]) == 64 and decoded[schema.CAPTION][0].startswith("word word")


# ----------------------------------------------------------------------------------------- pickled code
class _Payload:
    """Unpickling this runs `touch <marker>` (what a malicious checkpoint would do with a worse command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    """torch's default (weights_only=True since 2.6) is not the protection: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns
    the default off, so only an explicit `weights_only=True` at our call sites keeps the payload from running."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from otc_ray.model_checkpoint import load_checkpoint_model
    from otc_ray.train.checkpoint import MODEL_FILE, STATE_FILE, load_checkpoint

    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1, "step": 8, "hook": _Payload(marker)}, folder / STATE_FILE)
    torch.save({"visual.proj": torch.zeros(2), "evil": _Payload(marker)}, folder / MODEL_FILE)

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_checkpoint(folder, model, optimizer, scheduler, np.random.default_rng(0))
    with pytest.raises(ValueError, match="not a weights-only torch state dict"):
        load_checkpoint_model(str(folder / MODEL_FILE), ModelConfig())
    assert not marker.exists(), "the checkpoint's pickled code ran"

    # Control: the payload is live — a plain unpickling load runs it. So the refusals above are what saved us.
    torch.load(folder / MODEL_FILE, weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------------------- secrets
KEY_ID = "AKIAHOSTILE7Q2X9ZPLM"
SECRET = "hostileS3cret+Key/0123456789abcdefGHIJ"
TOKEN = "hostile-token-5c1d9e7a"


@pytest.mark.slow                       # an MLflow run on sqlite
def test_secrets_stay_out_of_mlflow_repr_and_console(tmp_path, monkeypatch, capsys):
    from otc_ray.track.mlflow_logger import RunLogger, start_or_resume_run, tracking_uri
    from otc_ray.train.evaluation import EpochEvaluator

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    cfg = load_config(TINY, [f"output_dir={tmp_path}", f"data.s3.access_key_id={KEY_ID}",
                             f"data.s3.secret_access_key={SECRET}", "data.s3.endpoint_url=http://127.0.0.1:9"])
    uri = tracking_uri(cfg)
    run_id = start_or_resume_run(cfg, tags={"defense": cfg.train.defense})
    log = RunLogger(uri, run_id)
    log.metrics({"train/loss": 1.0}, step=0)
    log.finish()
    from mlflow.tracking import MlflowClient

    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["data.s3.access_key_id"] == params["data.s3.secret_access_key"] == "***"
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())   # mlflow.db (+ wal), artifacts
    for secret in (KEY_ID, SECRET, TOKEN):
        assert secret.encode() not in stored, f"{secret} stored by MLflow"

    # Ray Train keeps str() of the loop config's values in its run state (dashboard); errors print reprs.
    shown = repr(cfg) + str(EpochEvaluator(ref=None, cfg=cfg))
    assert KEY_ID not in shown and SECRET not in shown

    # The CLI's one-line errors name the key, never the secret value (numeric, unparsable, or fine but beside
    # another bad key).
    for overrides in ([f"data.s3.secret_access_key=987654321098765432"],
                      [f"data.s3.secret_access_key=*{SECRET}"],
                      [f"data.s3.secret_access_key={SECRET}", f"data.s3.access_key_id={KEY_ID}", "train.epochs=zero"]):
        assert main(["train", "--config", str(TINY), f"output_dir={tmp_path}", *overrides]) == 2
        out = capsys.readouterr()
        assert "otc-ray: error: config key" in out.err
        for secret in ("987654321098765432", SECRET, KEY_ID, TOKEN):
            assert secret not in out.out + out.err, out.err


# ----------------------------------------------------------------------------------------- fuzzing
def _real_samples(n: int = 6):
    rng = np.random.default_rng(0)
    return [(f"{i:09d}", encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "png"), "png",
             f"a noisy square number {i}", {"label": i % 3}) for i in range(n)]


def _shard(fmt: str) -> bytes:
    buf = io.BytesIO()
    (write_tar_shard if fmt == "wds" else write_parquet_shard)(buf, _real_samples())
    return buf.getvalue()


TAR, PARQUET = _shard("wds"), _shard("parquet")
with tarfile.open(fileobj=io.BytesIO(TAR)) as _t:
    _last = _t.getmembers()[-1]
    TAR_END = _last.offset_data + -(-_last.size // 512) * 512 + 512      # through the first end-of-archive block

mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                        min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=700))),
)


def _mutate(data: bytes, op) -> bytes:
    kind, arg = op
    out = bytearray(data)
    if kind == "flip":
        for frac, bit in arg:
            out[int(frac * len(out))] ^= 1 << bit
    elif kind == "truncate":
        del out[int(arg * len(out)):]
    else:
        frac, garbage = arg
        pos = int(frac * len(out))
        out[pos:pos] = garbage
    return bytes(out)


def _read(fmt: str, data: bytes) -> list[dict]:
    reader = iter_tar_samples if fmt == "wds" else iter_parquet_samples
    return list(reader(io.BytesIO(data), f"fuzz.{fmt}"))


@FUZZ
@given(data=st.binary(max_size=4096), fmt=st.sampled_from(["wds", "parquet"]))
def test_fuzz_random_bytes_never_crash_and_are_counted(data, fmt):
    rows = _read(fmt, data)
    _check_counted(rows, LIMITS)
    if fmt == "parquet":
        assert [r[schema.ERROR] for r in rows] == [schema.CORRUPT_SHARD]
    elif data[:512].strip(b"\0"):
        assert rows, "a non-empty header block must produce at least one counted row"


@FUZZ
@given(op=mutation, fmt=st.sampled_from(["wds", "parquet"]))
def test_fuzz_mutated_real_shards_never_crash_and_are_counted(op, fmt):
    original = TAR if fmt == "wds" else PARQUET
    rows = _read(fmt, _mutate(original, op))
    outcomes = _check_counted(rows, LIMITS)
    assert sum(outcomes.values()) == len(rows)
    assert outcomes.get("ok", 0) <= len(_real_samples())
    if op[0] == "truncate" and fmt == "wds" and int(op[1] * len(original)) < TAR_END:
        assert rows and rows[-1][schema.ERROR] == schema.TRUNCATED_SHARD      # a tar cut before its end is counted as cut


def test_mutated_shard_through_ray_counts_every_row(ray_local, tmp_path):
    """A good shard beside a mangled one (bit flips, garbage, then truncated): Ray's read + decode counts exactly
    what the local reader + decoder count, the good shard's samples all come through, and nothing raises."""
    rng = np.random.default_rng(7)
    mangled = bytearray(TAR)
    for pos in rng.integers(0, len(mangled), 24):
        mangled[pos] ^= 1 << int(rng.integers(0, 8))
    mangled[len(mangled) // 3:len(mangled) // 3] = rng.bytes(300)
    mangled = bytes(mangled[: int(len(mangled) * 0.8)])
    (tmp_path / "00000.tar").write_bytes(TAR)
    (tmp_path / "00001.tar").write_bytes(mangled)

    cfg = load_config(TINY, ["data.image_size=16", "data.max_caption_chars=200"]).data
    counts = count_outcomes(load_samples(str(tmp_path), cfg))
    local = _check_counted(_read("wds", TAR) + _read("wds", mangled), DecodeLimits.from_config(cfg))
    assert counts == dict(local)
    assert counts["ok"] >= len(_real_samples()) and sum(counts.values()) > len(_real_samples())
