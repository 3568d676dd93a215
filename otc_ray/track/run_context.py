"""What a person opening MLflow needs beside the metrics: the experiment's kind, the shard sets a run read, its
config, and the parent run that groups a demo's or a benchmark's runs.

    exp_id = mark_model_development(uri, "otc-ray-demo")  # a model-development experiment, not GenAI traces
    ui_link("http://127.0.0.1:5000", exp_id)               # its training runs in the MLflow UI
    log_shard_sets(uri, run_id, [ShardSet("fashion-train", "data/fashion-train", "training", 5000), ...])
    log_config(uri, run_id, cfg)                           # artifact config.yaml: rerun with --config config.yaml
    parent = start_parent_run(cfg, "demo-3f2a")            # children: run_training(cfg, parent_run_id=parent)
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import SECRET_FIELDS, Config, content_digest, to_dict
from ..data.storage import is_s3
from .mlflow_logger import start_or_resume_run, tracking_uri

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"     # read by the MLflow 3.x UI to choose its experiment page
MODEL_DEVELOPMENT = "custom_model_development"    # its value for model training (vs "genai_development")
PARENT_RUN_TAG = "mlflow.parentRunId"             # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID
DATASET_CONTEXT_TAG = "mlflow.data.context"       # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT
CONFIG_ARTIFACT = "config.yaml"
GROUP_TAG = "otc_ray.group"                       # on a parent run: "demo" / "benchmark"; compare leaves it out


def mark_model_development(uri: str, experiment: str) -> str:
    """Tag the experiment as model development (once), so that MLflow lists its runs as training runs with their
    data sets and metrics instead of GenAI traces and "Evaluation runs"; returns the experiment id.

    MLflow 3.17's UI takes the page's kind from its GenAI / Model training switch when that is shown (default GenAI,
    remembered per browser) and from this tag otherwise: `ui_link` opens the experiment on the model-training side."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} at {uri}")
    if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    return exp.experiment_id


def ui_link(base_url: str, experiment_id: str) -> str:
    """The MLflow UI address of an experiment's training runs: the runs table with data sets and metrics."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


UI_PORT = 5000                                      # where `mlflow ui` listens by default


def ui_base(uri: str) -> str:
    """The MLflow UI address for a tracking URI: an http(s) tracking server is its own UI; a local store (sqlite,
    files) is served by `mlflow ui --backend-store-uri URI` at http://127.0.0.1:5000."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{UI_PORT}"


def run_link(uri: str, experiment: str, run_id: str) -> str:
    """Where a person sees run `run_id` of `experiment`: its page in the MLflow UI, with how to start the UI first for
    a local store ("mlflow ui --backend-store-uri sqlite:///... then http://127.0.0.1:5000/#/experiments/1/runs/ID")."""
    from ..credentials import redact_uri

    exp = _client(uri).get_experiment_by_name(experiment)
    page = f"{ui_base(uri)}/#/experiments/{exp.experiment_id if exp else '0'}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return page
    return f"mlflow ui --backend-store-uri {redact_uri(uri)} --port {UI_PORT}, then {page}"


@dataclass(frozen=True)
class ShardSet:
    """A shard set as an MLflow dataset input: name, path (local or s3://), context ("training" / "evaluation")
    and its row count (good samples for training, evaluated rows for evaluation)."""

    name: str
    path: str
    context: str
    rows: int

    def to_input(self):
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = self.path if is_s3(self.path) else Path(self.path).resolve().as_uri()
        dataset = Dataset(name=self.name, digest=content_digest({"source": source, "rows": self.rows})[:8],
                          source_type="s3" if is_s3(self.path) else "local", source=json.dumps({"uri": source}),
                          profile=json.dumps({"num_rows": self.rows}))
        return DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, self.context)])


def log_shard_sets(uri: str, run_id: str, sets: list[ShardSet]) -> None:
    """Log the shard sets as the run's dataset inputs (the runs table's "Dataset" column)."""
    _client(uri).log_inputs(run_id, datasets=[s.to_input() for s in sets])


def config_yaml(cfg: Config) -> str:
    """The run's whole config as YAML that `--config` loads back (secrets left empty: they come from the env)."""
    def plain(node):
        if isinstance(node, dict):
            return {k: ("" if k in SECRET_FIELDS else plain(v)) for k, v in node.items()}
        return [plain(v) for v in node] if isinstance(node, (list, tuple)) else node

    return yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False)


def log_config(uri: str, run_id: str, cfg: Config) -> None:
    """The run's config as the artifact `config.yaml` (what was trained, as a file to train it again)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / CONFIG_ARTIFACT
        path.write_text(config_yaml(cfg))
        _client(uri).log_artifact(run_id, str(path))


def start_parent_run(cfg: Config, name: str, group: str) -> str:
    """The run named `name` that groups a demo's or a benchmark's runs (created, or resumed by name), in
    `tracking.experiment`, tagged as model development and `GROUP_TAG`: group; its params are `cfg`'s, its artifact
    the config."""
    parent_cfg = dataclasses.replace(cfg, name=name, tracking=dataclasses.replace(cfg.tracking, run_name=""))
    run_id = start_or_resume_run(parent_cfg, {GROUP_TAG: group})
    uri = tracking_uri(parent_cfg)
    mark_model_development(uri, cfg.tracking.experiment)
    log_config(uri, run_id, cfg)
    return run_id


def finish_parent_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    """End the parent run (its children ended on their own)."""
    _client(tracking_uri(cfg)).set_terminated(run_id, status=status)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)
