"""MLflow tracking: the one module that imports mlflow.

The driver creates (or resumes, by run name) the run and hands its id to the workers; rank 0 logs
through a `RunLogger` bound to that id. Everything goes through an explicit `MlflowClient`, never the
fluent API's process-global active run, so several runs can be logged from one process.

    run_id = start_or_resume_run(cfg, tags={"defense": "otcclip"})
    log = RunLogger(tracking_uri(cfg), run_id)
    log.metrics({"train/loss": 0.3}, step=10)
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, TrackingConfig, content_digest, flatten

MAX_PARAM_CHARS = 6000
# settings a resumed run may change: where things run and are logged, not what is trained
RESUMABLE_PREFIXES = ("ray.", "tracking.", "output_dir", "train.max_failures", "train.keep_checkpoints",
                      "train.log_every", "train.torch_threads", "train.storage_path", "rematch.min_actors",
                      "rematch.max_actors", "rematch.actor_resource", "data.s3.", "data.cache_mb",
                      "data.driver_read_mb")
# keys added after runs were recorded, with the value that trains exactly as the code did before they existed:
# left out of the training digest while they hold it, so the digests (and benchmark cells) of earlier runs stay current
DIGEST_NEUTRAL = {"rematch.precision": "model"}


def tracking_uri(cfg: Config) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite under the output folder (absolute path)."""
    return _uri(cfg.tracking, cfg.output_dir)


def _uri(tracking: TrackingConfig, output_dir: str) -> str:
    if tracking.uri:
        return tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    # a new sqlite store announces "Creating initial MLflow database tables..." at INFO: routine, not news
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    """The source tree's commit, or 'unknown' (e.g. a `ray job submit` working dir without .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def artifact_root(uri: str) -> str | None:
    """Where the experiments of a local sqlite store keep their runs' artifacts: `mlartifacts` beside the database
    file, fixed by the store (not by the output_dir of whichever job created the experiment first); None for a
    tracking server or a file store (each keeps artifacts where it is configured to)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def experiment_id(uri: str, name: str, artifact_root: str | None) -> str:
    """Id of experiment `name`, created with `artifact_root` if new; an experiment created elsewhere (an older
    version kept artifacts under the creating job's output_dir) is named with where its artifacts go."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_root)
    if artifact_root and exp.artifact_location.rstrip("/") != artifact_root.rstrip("/"):
        print(f"otc-ray: experiment {name!r} at {_shown(uri)} keeps its artifacts at {exp.artifact_location} (set when "
              f"it was created), not beside the store; use another tracking.experiment to keep them there",
              file=sys.stderr, flush=True)
    return exp.experiment_id


def start_or_resume_run(cfg: Config, tags: dict[str, str] | None = None) -> str:
    """Run id of the run named `tracking.run_name` (or `name`) in the experiment; created with params if new.

    A rerun with the same name continues the same MLflow run (matching Ray Train's resume by run name).
    """
    uri = tracking_uri(cfg)
    exp_id = experiment_id(uri, cfg.tracking.experiment, artifact_root(uri))
    client = _client(uri)
    run_name = cfg.tracking.run_name or cfg.name
    found = client.search_runs([exp_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        _check_same_training(run_name, dict(found[0].data.params), flatten(cfg))
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={"git_commit": git_commit(), **(tags or {})})
    log_params(uri, run.info.run_id, flatten(cfg))
    return run.info.run_id


def training_digest(cfg: Config) -> str:
    """10 hex digits naming what a run trains (its whole config less RESUMABLE_PREFIXES): equal configs, equal
    digest."""
    return content_digest({k: str(v) for k, v in flatten(cfg).items()
                           if not k.startswith(RESUMABLE_PREFIXES) and DIGEST_NEUTRAL.get(k, ...) != v})


def _check_same_training(run_name: str, logged: dict[str, str], new: dict[str, Any]) -> None:
    """ConfigError when resuming `run_name` would continue it under different training settings."""
    changed = sorted(k for k, v in new.items() if not k.startswith(RESUMABLE_PREFIXES) and k in logged
                     and logged[k] != str(v)[:MAX_PARAM_CHARS])
    if changed:
        diff = ", ".join(f"{k}: {logged[k]} -> {new[k]}" for k in changed[:6]) + (" ..." if len(changed) > 6 else "")
        raise ConfigError(f"run {run_name!r} already exists with other settings ({diff}); resuming it would mix "
                          f"them. Choose a new `name`, or another output_dir / tracking.experiment.")


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    client = _client(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed away past the flush timeout: the message says what was not delivered."""


class RunLogger:
    """Logs to one existing run. Construct it on rank 0 only (the caller's rank gate).

    Calls return at once: they are delivered in order by a background sender that buffers and retries them while
    the tracking server is away (`otc_ray.track.delivery`), so an outage never stops training. `flush` waits for
    delivery (reads of the run's own metrics come after it); `finish` delivers everything, then the status, waiting
    up to `flush_timeout_s` for the server to come back (TrackingUnavailable after that); `close` ends a logger
    that does not end the run (a Train worker's)."""

    def __init__(self, uri: str, run_id: str, flush_timeout_s: float = 600.0):
        from .delivery import Delivery

        self.uri, self.run_id, self.flush_timeout_s = uri, run_id, flush_timeout_s
        self.client = _client(uri)
        self.delivery = Delivery(f"mlflow run {run_id[:8]}")

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log finite scalars (NaN/inf are skipped: MLflow charts cannot show them)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if batch:
            self.delivery.submit(f"metrics at step {step}", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def tags(self, values: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)) for k, v in values.items()]
        self.delivery.submit(f"tags {', '.join(values)}", lambda: self.client.log_batch(self.run_id, tags=tags))

    def artifact(self, path: str, folder: str | None = None) -> None:
        """Log a file; waits for its delivery (the caller may delete the file afterwards)."""
        self.delivery.submit(f"artifact {Path(path).name}",
                             lambda: self.client.log_artifact(self.run_id, path, artifact_path=folder))
        if not self.flush():
            print(f"[mlflow run {self.run_id[:8]}] artifact {path} waits for the tracking server", flush=True)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything logged so far is delivered; False when `timeout_s` (default flush_timeout_s)
        passed first."""
        return self.delivery.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    def _timeout(self, timeout_s: float | None) -> float:
        return self.flush_timeout_s if timeout_s is None else timeout_s

    def close(self, timeout_s: float | None = None, say_left: bool = True) -> list[str]:
        """Deliver what is buffered (up to the timeout, default flush_timeout_s) and stop the sender; returns what
        was not delivered (printed too unless not `say_left`)."""
        return self.delivery.close(self._timeout(timeout_s), say_left)

    def finish(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Deliver everything, then mark the run `status` (FINISHED, FAILED, KILLED)."""
        self.delivery.submit(f"status {status}", lambda: self.client.set_terminated(self.run_id, status=status))
        waited = self._timeout(timeout_s)
        left = self.close(waited, say_left=False)          # the error below says it
        if left:
            raise TrackingUnavailable(
                f"the MLflow tracking server at {_shown(self.uri)} did not come back within {waited:.0f} s: {len(left)} "
                f"calls to run {self.run_id} not delivered ({', '.join(left[:8])}{' ...' if len(left) > 8 else ''}); "
                f"the run is left RUNNING there. Start the server again (or set tracking.uri to one that is up) and "
                f"rerun; tracking.flush_timeout_s=SECONDS waits longer")


def _shown(uri: str) -> str:
    from ..credentials import redact_uri

    return redact_uri(uri)


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """Latest value of every metric of a run."""
    return dict(_client(uri).get_run(run_id).data.metrics)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in _client(uri).get_metric_history(run_id, key)]


@dataclass(frozen=True)
class RunRecord:
    """A finished or running MLflow run as plain data: params and tags as strings, latest metrics."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]


def search_runs(uri: str, experiment: str) -> list[RunRecord]:
    """Every run of `experiment` (oldest first); [] when the experiment does not exist."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000)
    return [RunRecord(r.info.run_id, r.info.run_name or "", r.info.status, dict(r.data.params), dict(r.data.tags),
                      dict(r.data.metrics)) for r in runs]
