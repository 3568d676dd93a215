"""The cleaning job: re-match every caption of a shard set with a fixed checkpoint; write cleaned shards.

    summary = clean_shards("s3://bkt/train", "s3://bkt/train_clean", cfg, checkpoint="runs/x/model.pt",
                           manifest="s3://bkt/train/_poison_manifest.parquet")
    print("\\n".join(summary.lines()))

Pipeline (Ray Data, streaming): read + decode -> re-matching actor pool (otc_ray/rematch/stage.py) -> a write
task per batch of `data.samples_per_shard` rows, which commits one shard of the kept and re-captioned samples
(the input's format, original image bytes, the caption used; metadata gains a `clean` entry when something
changed), then the batch's report rows as its commit record, and returns those rows (no images). The files:
    _lock.json                  held while the job runs: one job per --out, local or S3 (`output_lock`)
    _clean_job.json             the job's settings (input, checkpoint, re-match config), written first
    clean-<hash>.tar|.parquet   shards, named by a hash of their batch's keys: a retried write overwrites
    _part-clean-<hash>.parquet  the report rows of that batch, committed after its shard: the shard is accounted for
    _clean_report.parquet       one row per input row: key, outcome kept|recaptioned|dropped, reason, captions, scores,
                                shard (the shard of the row's batch: its sample is there unless dropped),
                                its input file and row there (source, row: a duplicated key's copies each have one)
    _info.json                  the input's, plus a `clean` section
    _clean_summary.json         counts (and detection quality with a manifest); written last = the completion marker
    _pending-<hash>.json        this job's ledger: written before the shard of that name, so the job only ever
                                deletes a file that it named here first
Nothing is lost: every input row (its file and row there) is in the report exactly once, and input rows = output
keys + dropped rows; a key met in more than one file is written once (its first file's copy), its other copies are
dropped as `duplicate_key` (`data.ray_io`).
Deterministic: the same input, checkpoint and settings give byte-identical shards, report and `_info.json`, run
once, interrupted and resumed, or with any number of actors. Blocks are formed in one fixed order (Ray Data's
`preserve_order`: sorted files, rows in file order), and each block is judged against the same fixed reference
(the first `rematch.bank_size` good rows of the input, `Matcher.set_reference`), never a bank filled in the order
blocks happen to reach an actor; sticky flags and trigger propagation, whose state is that arrival order, are not
used by this one-pass job (they are training's). An interrupted job, rerun with the same settings, resumes: the
same batches come again, and one whose shard has a committed part is not written again (its shard is kept; the
re-matching itself is recomputed, as a block's decisions depend on the whole block); a rerun with other settings
is refused. Before the marker, shards that a pending record
names and no part references (a write cut between shard and part) are deleted, by the lock holder only.

Nothing outside --out is ever touched, and inside it only this job's files: every listing, sweep and clean-up looks
at the top level of --out only (never into a subfolder), and deletes only files named in a `_pending-` record, its
stray temp files, and its parts once the report holds them. `--out` is refused up front (`check_output`) when it
is, contains or is contained in `--in`, or lies inside another cleaning job's output; and, once this job holds the
lock (`check_output_contents`), when it holds a finished marker, shards that are not this job's, a subfolder with
shards or another job's files, or clean shards without this job's `_clean_job.json`. Readers refuse a folder with
clean shards and no marker (`data.shards.list_shards`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import posixpath
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from fsspec.implementations.local import LocalFileSystem

from otc_ray.config import Config, S3Config, content_digest, replace, validate
from otc_ray.credentials import move_secrets_to_env
from otc_ray.data import schema
from otc_ray.data.decode import good_rows
from otc_ray.data.ray_io import decode, read_shards
from otc_ray.data.shards import (CLEAN_MARKER, CLEAN_SHARD_RE, COMPRESSED_SUFFIXES, INFO_FILE, SUFFIX, commit_file,
                                 list_shards, read_info,
                                 write_shard)
from otc_ray.data.storage import display, resolve
from otc_ray.model import check_image_size
from otc_ray.pipelines.output_lock import OutputLock
from otc_ray.rematch.stage import add_rematch_stage
from otc_ray.rematch.weights import publish, weight_store
from otc_ray.track.mlflow_logger import RunLogger, start_or_resume_run, tracking_uri

REPORT_FILE = "_clean_report.parquet"
SUMMARY_FILE = CLEAN_MARKER
JOB_FILE = "_clean_job.json"
PART_PREFIX = "_part-"
PENDING_PREFIX = "_pending-"
SHARD_RE = CLEAN_SHARD_RE
SHARD_SUFFIXES = tuple(SUFFIX.values()) + COMPRESSED_SUFFIXES
KEPT, RECAPTIONED, DROPPED = "kept", "recaptioned", "dropped"
FLAGGED_REASON = "flagged"

REPORT_SCHEMA = pa.schema([
    ("key", pa.string()), ("outcome", pa.string()), ("reason", pa.string()), ("caption_used", pa.string()),
    ("caption", pa.string()), ("source_key", pa.string()), ("own_score", pa.float32()),
    ("best_score", pa.float32()), ("suspicion", pa.float32()), ("gate_z", pa.float32()), ("flagged", pa.bool_()),
    ("weight", pa.float32()), ("shard", pa.string()), ("source", pa.string()), ("row", pa.int64()),
])


@dataclass
class CleanSummary:
    """What `clean_shards` did; total = kept + recaptioned + dropped (= every input row)."""

    input: str
    output: str
    checkpoint: str
    gate: str
    action: str
    alpha: float
    total: int = 0
    kept: int = 0
    recaptioned: int = 0
    dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    flagged: int = 0
    downweighted: int = 0
    shards: int = 0
    orphans_removed: int = 0
    resumed: int = 0                # rows accounted for by an interrupted run of this job, not written again
    seconds: float = 0.0
    detection: Optional[dict[str, float]] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numeric view for experiment tracking (`log_fn`)."""
        out = {f"clean_{k}": float(getattr(self, k)) for k in
               ("total", "kept", "recaptioned", "dropped", "flagged", "downweighted", "shards", "resumed",
                "seconds")}
        out.update({f"clean_dropped_{r}": float(n) for r, n in self.dropped_by_reason.items()})
        out.update({f"clean_{k}": float(v) for k, v in (self.detection or {}).items()})
        return out

    def lines(self) -> list[str]:
        rate = self.total / max(self.seconds, 1e-9)
        out = [f"cleaned {self.input} -> {self.output} (gate {self.gate}, action {self.action}, alpha {self.alpha}), "
               f"checkpoint {self.checkpoint or 'none (random init)'}",
               f"input rows   {self.total}  ({rate:.0f} rows/s, {self.seconds:.1f} s)",
               f"kept         {self.kept}" + (f"  ({self.downweighted} down-weighted)" if self.downweighted else ""),
               f"recaptioned  {self.recaptioned}",
               f"dropped      {self.dropped}"]
        out += [f"  {reason:<20} {n}" for reason, n in sorted(self.dropped_by_reason.items())]
        out.append(f"flagged      {self.flagged}   shards written {self.shards}"
                   + (f"   resumed: {self.resumed} rows from an interrupted run" if self.resumed else ""))
        if self.detection:
            d = self.detection
            out.append(f"detection    precision {d['detect_precision']:.3f}  recall {d['detect_recall']:.3f}  "
                       f"f1 {d['detect_f1']:.3f}" + (f"  auroc {d['detect_auroc']:.3f}" if "detect_auroc" in d else ""))
        return out


# ----------------------------------------------------------------------------------------- write task
def _outcomes(batch: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """(outcome, reason) per row: bad input and weight-0 rows are dropped; a changed caption is recaptioned."""
    outcomes, reasons = [], []
    for err, weight, changed in zip(batch[schema.ERROR], batch[schema.WEIGHT], batch[schema.RECAPTIONED]):
        if err:
            outcomes.append(DROPPED), reasons.append(str(err))
        elif weight <= 0:
            outcomes.append(DROPPED), reasons.append(FLAGGED_REASON)
        else:
            outcomes.append(RECAPTIONED if changed else KEPT), reasons.append("")
    return outcomes, reasons


def _meta(raw: Any, caption: str, source_key: str, changed: bool, weight: float) -> dict:
    meta = json.loads(raw or b"{}")
    if changed or weight < 1.0:
        entry: dict[str, Any] = {"weight": float(weight)}
        if changed:
            entry.update(original_caption=caption, source_key=source_key)
        meta["clean"] = entry
    return meta


def shard_name(keys: list[str], fmt: str) -> str:
    """Deterministic shard name from the keys of the batch it comes from: clean-<16 hex>.tar|.parquet.
    A retried batch overwrites its shard, whatever it keeps."""
    text = "\n".join(keys) + "\n#"
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"clean-{digest}{SUFFIX[fmt]}"


def write_batch(batch: dict[str, np.ndarray], out: str, fmt: str, s3: S3Config,
                done: frozenset = frozenset()) -> dict[str, np.ndarray]:
    """Commit the kept and re-captioned rows of a re-matched batch as one shard (any mix of image formats, the
    original bytes); return the batch's report rows. A batch whose shard name is in `done` (an interrupted run of
    this job committed its part) is not written again and returns no rows: the driver has them from the part."""
    outcomes, reasons = _outcomes(batch)
    keys = [str(k) for k in batch[schema.KEY]]
    if shard_name(keys, fmt).rsplit(".", 1)[0] in done:
        return {f.name: np.zeros(0, dtype=_NUMPY.get(f.name, object)) for f in REPORT_SCHEMA}
    samples = []
    for i, outcome in enumerate(outcomes):
        if outcome == DROPPED:
            continue
        changed = outcome == RECAPTIONED
        meta = _meta(batch[schema.META][i], str(batch[schema.CAPTION][i]), str(batch[schema.SOURCE_KEY][i]), changed,
                     float(batch[schema.WEIGHT][i]))
        samples.append((keys[i], bytes(batch[schema.IMAGE_BYTES][i]), str(batch[schema.IMAGE_EXT][i]),
                        str(batch[schema.CAPTION_USED][i]), meta))
    name = shard_name(keys, fmt)
    fs, root = resolve(out, s3)
    if samples:                 # the ledger first: the sweep deletes only a shard that a pending record names
        commit_file(fs, posixpath.join(root, f"{PENDING_PREFIX}{name.rsplit('.', 1)[0]}.json"), b"{}")
        write_shard(fs, posixpath.join(root, name), fmt, samples)
    rows = _report_rows(batch, keys, outcomes, reasons, name)
    _commit_part(fs, root, name, rows)
    return rows


_NUMPY = {"own_score": np.float32, "best_score": np.float32, "suspicion": np.float32, "gate_z": np.float32,
          "flagged": bool, "weight": np.float32, "row": np.int64}


def _part_stems(fs, root: str) -> list[str]:
    """The shard stems (clean-<hash>) whose report part an interrupted run of this job committed."""
    return [posixpath.basename(p)[len(PART_PREFIX):-len(".parquet")] for p in _top_level(fs, root)
            if posixpath.basename(p).startswith(PART_PREFIX) and p.endswith(".parquet") and ".tmp-" not in p]


def _commit_part(fs, root: str, shard: str, rows: dict[str, np.ndarray]) -> None:
    """The batch's report rows as `_part-<shard stem>.parquet`: the record that its shard is committed."""
    table = pa.table({f.name: pa.array(rows[f.name].tolist(), type=f.type) for f in REPORT_SCHEMA}, schema=REPORT_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    commit_file(fs, posixpath.join(root, f"{PART_PREFIX}{shard.rsplit('.', 1)[0]}.parquet"), buf.getvalue())


def _report_rows(batch, keys, outcomes, reasons, shard: str) -> dict[str, np.ndarray]:
    return {"key": np.asarray(keys, dtype=object), "outcome": np.asarray(outcomes, dtype=object),
            "reason": np.asarray(reasons, dtype=object),
            "caption_used": np.asarray([str(c) for c in batch[schema.CAPTION_USED]], dtype=object),
            "caption": np.asarray([str(c) for c in batch[schema.CAPTION]], dtype=object),
            "source_key": np.asarray([str(c) for c in batch[schema.SOURCE_KEY]], dtype=object),
            **{c: np.asarray(batch[c], dtype=np.float32) for c in (schema.OWN_SCORE, schema.BEST_SCORE, schema.SUSPICION, schema.GATE_Z)},
            "flagged": np.asarray(batch[schema.FLAGGED], dtype=bool), "weight": np.asarray(batch[schema.WEIGHT], np.float32),
            "shard": np.asarray([shard] * len(keys), dtype=object),
            "source": np.asarray([str(s) for s in batch[schema.SOURCE]], dtype=object),
            "row": np.asarray(batch[schema.ROW], dtype=np.int64)}


# ----------------------------------------------------------------------------------------- driver steps
def _inside(outer: str, inner: str) -> bool:
    """`inner` is `outer` or lies below it (posix paths without a trailing slash)."""
    outer, inner = outer.rstrip("/"), inner.rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


def _real(fs, path: str) -> str:
    """The path with symlinks resolved on local disk (so that a link cannot hide a nesting); S3 keys as they are."""
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else path


def _top_level(fs, root: str) -> list[str]:
    """The files directly in `root` (never a subfolder's); [] when it does not exist."""
    if not fs.isdir(root):
        return []
    return sorted(p for p in fs.ls(root, detail=False) if fs.isfile(p))


def check_output(in_path: str, out_path: str, s3: S3Config):
    """(fs, root) of the output after the refusals of its place (ValueError, one line naming the path): --out is,
    contains or lies in --in, or lies inside another cleaning job's output. Reads nothing inside --out: its
    contents are checked under the lock (`check_output_contents`)."""
    in_fs, in_root = resolve(in_path, s3)
    fs, root = resolve(out_path, s3)
    if type(in_fs) is type(fs):
        a, b = _real(in_fs, in_root), _real(fs, root)
        if _inside(a, b) and a.rstrip("/") == b.rstrip("/"):
            raise ValueError(f"--out must differ from --in ({out_path})")
        if _inside(b, a):
            raise ValueError(f"--out {out_path} contains --in {in_path}; choose an --out outside the input")
        if _inside(a, b):
            raise ValueError(f"--out {out_path} is inside --in {in_path}; choose an --out outside the input")
    parent = posixpath.dirname(root.rstrip("/"))
    while parent and parent not in ("/", root):
        if any(fs.exists(posixpath.join(parent, f)) for f in (JOB_FILE, SUMMARY_FILE)):
            raise ValueError(f"--out {out_path} is inside another cleaning job's output ({display(fs, parent)}); "
                             "choose an --out outside it")
        parent, before = posixpath.dirname(parent), parent
        if parent == before:
            break
    return fs, root


def check_output_contents(fs, root: str, out_path: str) -> None:
    """Refuse an --out holding a finished marker, shards that are not this job's, a subfolder with shards or another
    job's files, or clean shards without `_clean_job.json` (ValueError naming the file). Called by the lock's holder
    only: a rival job's files, appearing while the folder is listed, cannot be mistaken for a stranger's, nor a job
    that finished while this one waited be resumed."""
    if fs.exists(posixpath.join(root, SUMMARY_FILE)):
        raise ValueError(f"{out_path} already holds a finished cleaning ({SUMMARY_FILE}); choose another --out")
    if not fs.isdir(root):
        return
    ours = fs.exists(posixpath.join(root, JOB_FILE))
    top = set(_top_level(fs, root))
    for path in sorted(fs.find(root)):
        base = posixpath.basename(path)
        if path not in top:
            if base.endswith(SHARD_SUFFIXES) or base in (JOB_FILE, SUMMARY_FILE):
                raise ValueError(f"{out_path} holds shards or another job's files in a subfolder ({display(fs, path)}); "
                                 "choose an empty --out")
            continue
        if base.startswith(("_", ".")) or not base.endswith(SHARD_SUFFIXES):
            continue
        if not SHARD_RE.match(base) or not ours:
            raise ValueError(f"{out_path} already holds shards that are not this job's ({display(fs, path)}); "
                             "choose an empty --out")


def _collect(ds: "ray.data.Dataset") -> pa.Table:
    """All report rows the dataset's write tasks return (unsorted)."""
    parts: dict[str, list] = {name: [] for name in REPORT_SCHEMA.names}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name in parts:
            parts[name].append(batch[name])
    cols = {name: (np.concatenate(v) if v else np.zeros(0)) for name, v in parts.items()}
    return pa.table({f.name: pa.array(cols[f.name].tolist(), type=f.type) for f in REPORT_SCHEMA}, schema=REPORT_SCHEMA)


def _checked_report(tables: list[pa.Table]) -> pa.Table:
    """The report rows sorted by (key, source, row); raises when an input row (source, row) occurs twice, or a key
    is in the output twice (an accounting failure)."""
    table = pa.concat_tables(tables) if tables else REPORT_SCHEMA.empty_table()
    rows = list(zip(table.column("source").to_pylist(), table.column("row").to_pylist()))
    if len(set(rows)) != len(rows):
        dup = [r for r, n in Counter(rows).items() if n > 1]
        raise RuntimeError(f"{len(dup)} input rows reached the report more than once (e.g. {dup[:3]}): "
                           "accounting failed")
    out = [k for k, o in zip(table.column("key").to_pylist(), table.column("outcome").to_pylist()) if o != DROPPED]
    if len(set(out)) != len(out):
        dup = [k for k, n in Counter(out).items() if n > 1]
        raise RuntimeError(f"{len(dup)} keys were written more than once (e.g. {dup[:3]}): accounting failed")
    return table.sort_by([("key", "ascending"), ("source", "ascending"), ("row", "ascending")])


def _committed_parts(fs, root: str) -> list[pa.Table]:
    """The report parts an interrupted run of this job committed (each: a shard and its rows), or []."""
    tables = []
    for path in _top_level(fs, root):
        if posixpath.basename(path).startswith(PART_PREFIX) and path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(io.BytesIO(f.read())).cast(REPORT_SCHEMA))
    return tables


def _job_settings(in_path: str, checkpoint: Optional[str], cfg: Config, fmt: str) -> dict:
    return {"input": in_path, "checkpoint": checkpoint or "", "format": fmt, "rematch": asdict(cfg.rematch),
            "model": asdict(cfg.model), "ot": asdict(cfg.ot), "samples_per_shard": cfg.data.samples_per_shard}


def _start_or_resume(fs, root: str, out_path: str, settings: dict) -> list[pa.Table]:
    """Record the job's settings in a new folder, or check them against an interrupted run's; returns that run's
    committed report parts ([] for a new job). ValueError when the interrupted run had other settings."""
    path = posixpath.join(root, JOB_FILE)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            before = json.loads(f.read())
        if json.loads(json.dumps(settings, default=str)) != before:
            changed = sorted(k for k in settings if json.loads(json.dumps(settings[k], default=str)) != before.get(k))
            raise ValueError(f"{out_path} holds an interrupted cleaning with other settings ({', '.join(changed)}); "
                             "rerun it with the same settings to resume, or choose another --out")
        return _committed_parts(fs, root)
    commit_file(fs, path, json.dumps(settings, indent=2, sort_keys=True, default=str).encode())
    return []


def _reference(in_path: str, cfg: Config) -> Optional[dict]:
    """The fixed bank every re-matching actor judges each block against: the first `rematch.bank_size` good rows of
    the input in its deterministic order (sorted files, rows in file order); None without a bank."""
    if not cfg.rematch.enabled:
        return None
    good = decode(read_shards(in_path, cfg.data), cfg.data).map_batches(good_rows, batch_format="numpy")
    rows = good.take(cfg.rematch.bank_size)
    if not rows:
        return None
    return {schema.KEY: [str(r[schema.KEY]) for r in rows], schema.IMAGE: np.stack([r[schema.IMAGE] for r in rows]),
            schema.CAPTION: [str(r[schema.CAPTION]) for r in rows], schema.LABEL: [int(r[schema.LABEL]) for r in rows]}


def _remove_orphans(fs, root: str, referenced: set[str]) -> int:
    """Delete the shards this job's ledger names (`_pending-` records) that the report does not reference (a write
    cut between its shard and its part), and this job's stray temp files; top level of `root` only. Returns the
    number of shards and temp files removed. Only the lock holder calls this."""
    removed = 0
    files = _top_level(fs, root)
    present = {posixpath.basename(p) for p in files}
    for path in files:
        base = posixpath.basename(path)
        if base.startswith(PENDING_PREFIX) and base.endswith(".json") and ".tmp-" not in base:
            stem = base[len(PENDING_PREFIX):-len(".json")]
            for suffix in SHARD_SUFFIXES:
                shard = stem + suffix
                if SHARD_RE.match(shard) and shard in present and shard not in referenced:
                    fs.rm(posixpath.join(root, shard))
                    removed += 1
        elif base.startswith(("clean-", PART_PREFIX, PENDING_PREFIX)) and ".tmp-" in base:
            fs.rm(path)
            removed += 1
    return removed


def _detection(report: pa.Table, manifest: str, s3: S3Config) -> dict[str, float]:
    from otc_ray.evaluate.detection import detection_auroc, detection_metrics
    from otc_ray.poison.manifest import read_manifest

    poison_keys = set(read_manifest(manifest, s3).column("key").to_pylist())
    keep = np.asarray([r in ("", FLAGGED_REASON) for r in report.column("reason").to_pylist()], dtype=bool)
    keys = np.asarray(report.column("key").to_pylist(), dtype=object)[keep]
    flags = np.asarray(report.column("flagged").to_pylist(), dtype=bool)[keep]
    out = detection_metrics(flags, poison_keys, keys=list(keys))
    z = np.asarray(report.column("gate_z").to_numpy(zero_copy_only=False), dtype=np.float64)[keep]
    suspicion = np.asarray(report.column("suspicion").to_numpy(zero_copy_only=False), dtype=np.float64)[keep]
    truth = np.fromiter((k in poison_keys for k in keys), dtype=bool, count=len(keys))
    score = -z if len(z) and np.isfinite(z).all() else suspicion
    if len(score) and np.isfinite(score).all():
        out.update(detection_auroc(score, truth))
    return out


def _load_weights(checkpoint: Optional[str], cfg: Config) -> Optional[dict]:
    if checkpoint is None:
        return None
    from otc_ray.model_checkpoint import load_checkpoint_model

    return load_checkpoint_model(checkpoint, cfg.model, cfg.data.s3).model.state_dict()


def clean_shards(in_path: str, out_path: str, cfg: Config, checkpoint: Optional[str] = None,
                 manifest: Optional[str] = None, log_fn: Optional[Callable[[dict[str, float]], None]] = None,
                 ray_remote_args: Optional[dict[str, Any]] = None,
                 on_start: Optional[Callable[[], None]] = None) -> CleanSummary:
    """Clean the shard set at `in_path` into `out_path` (local or s3://) with `cfg.rematch` (see module docstring).

    checkpoint: an open_clip state dict (torch.save(model.state_dict())) or .safetensors, local or s3://; None =
    `model.pretrained`, or when that is "" the seeded random init.
    manifest: a poison manifest (folder or file) for detection precision / recall. log_fn receives
    `summary.metrics()`. ray_remote_args go to the re-matching actors. on_start is called once the job holds the
    output (e.g. to open its MLflow run). Ray must be initialised. Raises `output_lock.OutputLocked` (a ValueError) when another job is writing `out_path`.
    """
    start = time.perf_counter()
    cfg = move_secrets_to_env(cfg)          # the write tasks get no keys (credentials.py)
    validate(cfg.rematch)
    check_image_size(cfg.model.arch, cfg.data.image_size)
    checkpoint = checkpoint or cfg.model.pretrained or None
    s3 = cfg.data.s3
    _, _, fmt = list_shards(in_path, cfg.data.format, s3)
    fs, root = check_output(in_path, out_path, s3)
    lock = OutputLock(fs, root, "clean")
    lock.acquire(out_path)
    try:
        check_output_contents(fs, root, out_path)
        committed = _start_or_resume(fs, root, out_path, _job_settings(in_path, checkpoint, cfg, fmt))
        if on_start is not None:
            on_start()
        summary = _clean_locked(in_path, out_path, cfg, fmt, fs, root, committed, checkpoint, manifest,
                                ray_remote_args, start)
    finally:
        lock.release()
    if log_fn is not None:
        log_fn(summary.metrics())
    return summary


def _clean_locked(in_path: str, out_path: str, cfg: Config, fmt: str, fs, root: str, committed: list[pa.Table],
                  checkpoint: Optional[str], manifest: Optional[str],
                  ray_remote_args: Optional[dict[str, Any]], start: float) -> CleanSummary:
    """The job itself, under the output's lock: clean the rows no committed part accounts for, then sweep, report,
    and commit the marker."""
    s3 = cfg.data.s3
    resumed = sum(t.num_rows for t in committed)
    state = _load_weights(checkpoint, cfg)
    store = None
    if state is not None:
        store = weight_store(f"otc-clean-{uuid.uuid4().hex[:12]}")
        publish(store, state)
        del state
    context = ray.data.DataContext.get_current()
    order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True     # the same blocks, in the same order, every run
    try:
        rematch = dataclasses.replace(cfg.rematch, sticky=False, propagate=False)
        ds = add_rematch_stage(decode(read_shards(in_path, cfg.data), cfg.data), rematch, cfg.model, cfg.ot,
                               weights=store, ray_remote_args=ray_remote_args, reference=_reference(in_path, cfg))
        ds = ds.map_batches(write_batch, fn_kwargs={"out": display(fs, root), "fmt": fmt, "s3": s3,
                                                    "done": frozenset(_part_stems(fs, root))},
                            batch_size=cfg.data.samples_per_shard, batch_format="numpy",
                            num_cpus=cfg.data.read_num_cpus)
        report = _checked_report(committed + [_collect(ds)])
    finally:
        context.execution_options.preserve_order = order
        if store is not None:
            ray.kill(store)
    shards = {s for s, o in zip(report.column("shard").to_pylist(), report.column("outcome").to_pylist())
              if s and o != DROPPED}
    orphans = _remove_orphans(fs, root, shards)
    buf = io.BytesIO()
    pq.write_table(report, buf, compression="zstd")
    commit_file(fs, posixpath.join(root, REPORT_FILE), buf.getvalue())

    outcomes = report.column("outcome").to_pylist()
    reasons = report.column("reason").to_pylist()
    weights = report.column("weight").to_numpy(zero_copy_only=False)
    counts = Counter(outcomes)
    summary = CleanSummary(
        input=in_path, output=out_path, checkpoint=checkpoint or "", gate=cfg.rematch.gate,
        action=cfg.rematch.action, alpha=cfg.rematch.alpha, total=report.num_rows, kept=counts[KEPT], recaptioned=counts[RECAPTIONED],
        dropped=counts[DROPPED], dropped_by_reason=dict(Counter(r for o, r in zip(outcomes, reasons) if o == DROPPED)),
        flagged=int(np.sum(report.column("flagged").to_numpy(zero_copy_only=False))),
        downweighted=int(sum(1 for o, w in zip(outcomes, weights) if o != DROPPED and w < 1.0)),
        shards=len(shards), orphans_removed=orphans, resumed=resumed,
        detection=_detection(report, manifest, s3) if manifest else None)
    info = read_info(in_path, s3) or {}
    info["clean"] = {"from": in_path, "checkpoint": checkpoint or "", "rematch": asdict(cfg.rematch),
                     "num_samples": summary.kept + summary.recaptioned}
    info["num_samples"] = summary.kept + summary.recaptioned
    commit_file(fs, posixpath.join(root, INFO_FILE), json.dumps(info, indent=2, sort_keys=True, default=str).encode())
    summary.seconds = time.perf_counter() - start
    commit_file(fs, posixpath.join(root, SUMMARY_FILE), json.dumps(summary.to_dict(), indent=2, sort_keys=True).encode())
    for path in _top_level(fs, root):                   # the parts are in the report now; the ledger is done
        if posixpath.basename(path).startswith((PART_PREFIX, PENDING_PREFIX)):
            fs.rm(path)
    return summary


def run_clean_job(in_path: str, out_path: str, cfg: Config, checkpoint: Optional[str] = None,
                  manifest: Optional[str] = None) -> tuple[CleanSummary, str]:
    """`clean_shards` as an MLflow run of its own (the `otc-ray clean` command): params, the summary's counts and
    detection as metrics, the report as an artifact; FINISHED, FAILED, or KILLED on Ctrl-C / SIGTERM. The run is
    named after the job's settings and output, so a resumed job continues its run. Returns (summary, run id)."""
    cfg = move_secrets_to_env(cfg)
    fmt = list_shards(in_path, cfg.data.format, cfg.data.s3)[2]
    name = f"clean-{content_digest({**_job_settings(in_path, checkpoint, cfg, fmt), 'output': out_path})}"
    run_cfg = replace(cfg, tracking__run_name=name)
    uri = tracking_uri(run_cfg)
    opened: list[RunLogger] = []

    def open_run() -> None:
        tags = {"job": "clean", "input": in_path, "output": out_path, "checkpoint": checkpoint or "",
                "manifest": manifest or ""}
        opened.append(RunLogger(uri, start_or_resume_run(run_cfg, tags=tags), cfg.tracking.flush_timeout_s))

    try:
        summary = clean_shards(in_path, out_path, cfg, checkpoint, manifest, on_start=open_run)
    except (KeyboardInterrupt, SystemExit):           # Ctrl-C, or SIGTERM (the CLI turns it into SystemExit)
        if opened:
            opened[0].finish("KILLED", timeout_s=min(30.0, cfg.tracking.flush_timeout_s))
        raise
    except BaseException:
        if opened:
            opened[0].finish("FAILED")
        raise
    logger = opened[0]
    logger.metrics(summary.metrics(), step=0)
    fs, root = resolve(out_path, cfg.data.s3)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / REPORT_FILE
        local.write_bytes(fs.cat_file(posixpath.join(root, REPORT_FILE)))
        (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
        logger.artifact(str(local), "clean")
        logger.artifact(str(Path(tmp) / SUMMARY_FILE), "clean")
    logger.finish()
    return summary, logger.run_id
