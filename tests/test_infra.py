"""infra/: the cluster launcher YAML passes Ray's own validation; the runtime env uploads the code and nothing
else; the KubeRay RayJob is structurally sound and its entrypoint config loads; the Dockerfile and README agree."""
import copy
import json
import re
import shlex
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from otc_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SECRET_NAME = re.compile(r"(ACCESS_KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("ray[")]
    return pin.split("==")[1]


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _ray_image_tag() -> str:
    """The pinned Ray image tag form: <ray version>-py<major><minor>-gpu (an alias of the default -cuXX)."""
    return f"rayproject/ray:{_pinned_ray()}-py311-gpu"


def test_pins_agree():
    assert ray.__version__ == _pinned_ray(), "installed Ray differs from pyproject's pin"


# ----------------------------------------------------------------------------------------- runtime env
def test_runtime_env_uploads_code_only(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = _yaml(INFRA / "runtime_env.yaml")
    RuntimeEnv(**env)                                   # Ray's own type checks (env_vars: Dict[str, str], ...)
    assert env["working_dir"] == "."
    for required in (".venv", ".data", "runs", ".git", "tests", "benchmarks"):
        assert required in env["excludes"], required
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3"} <= set(env["env_vars"])
    leaked = [k for k in env["env_vars"] if SECRET_NAME.search(k)]
    assert not leaked, f"credentials must come from the cluster's secret/env, not the runtime env: {leaked}"

    # What `ray job submit --working-dir . --runtime-env infra/runtime_env.yaml` would upload (.gitignore
    # not consulted, so the excludes alone must keep local state out).
    package = tmp_path / "pkg.zip"
    create_package(str(ROOT), package, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    for needed in ("otc_ray/cli.py", "otc_ray/config.py", "jobs/train.py", "jobs/configs/tiny.yaml",
                   "jobs/configs/gpu-cluster.yaml", "pyproject.toml"):
        assert needed in names, needed
    top = {n.split("/")[0] for n in names}
    assert not top & {".venv", ".data", "runs", ".git", "tests", "benchmarks", ".hypothesis"}, top
    assert not [n for n in names if "__pycache__" in n or n.endswith(".db")]
    assert package.stat().st_size < 8 << 20, f"upload is {package.stat().st_size >> 20} MiB"


# ----------------------------------------------------------------------------------------- cluster launcher
def _prepared_cluster() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_yaml(INFRA / "aws" / "cluster.yaml"))     # what `ray up` does before launching
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_schema_validation():
    from ray.autoscaler._private.util import validate_config

    config = _prepared_cluster()
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == _ray_image_tag()
    assert all(img.startswith(f"rayproject/ray:{_pinned_ray()}-py311")
               for img in [config["docker"].get("head_image", ""), *[
                   t.get("docker", {}).get("worker_image", config["docker"]["image"])
                   for t in config["available_node_types"].values()]] if img)

    broken = copy.deepcopy(config)
    broken["available_node_types"]["ray.worker.gpu"]["min_worker"] = 1          # a typo Ray must reject
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_cluster_node_types_fit_the_gpu_config():
    config = _prepared_cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    cpu_workers = {n: t for n, t in types.items() if n != config["head_node_type"] and n not in gpu}
    assert gpu and cpu_workers, "needs GPU workers (re-match, training) and CPU data workers"
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu.values())

    job = load_config(ROOT / "jobs" / "configs" / "gpu-cluster.yaml")
    need_gpus = job.train.num_workers + job.rematch.max_actors * job.rematch.actor_num_gpus
    have_gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu.values())
    assert have_gpus >= need_gpus, (have_gpus, need_gpus)
    per_gpu_cpus = max(job.train.cpus_per_worker, job.rematch.actor_num_cpus)
    for name, t in gpu.items():
        assert t["resources"]["GPU"] * per_gpu_cpus <= t["resources"]["CPU"], name

    installs = " ".join(config["setup_commands"])
    (mount,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert f"pip install --no-cache-dir {mount}" in installs
    assert all("ray start" in " ".join(config[k]) and "RAY_AUTH_MODE=token" in " ".join(config[k])
               for k in ("head_start_ray_commands", "worker_start_ray_commands"))


# ----------------------------------------------------------------------------------------- KubeRay RayJob
KUBERAY_SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"    # RayJob CRDs (extract_schema.py)


def _crd_schema(version: str) -> dict:
    return json.loads((KUBERAY_SCHEMAS / f"rayjob-{version}.schema.json").read_text())["schema"]


def unknown_fields(value, schema: dict, at: str = "") -> list[str]:
    """Paths of `value`'s mapping keys that the CRD schema does not define (what `kubectl apply --validate=strict`
    rejects and a lax apply silently prunes); open objects (additionalProperties, preserve-unknown-fields) pass."""
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in unknown_fields(v, schema.get("items", {}), f"{at}[{i}]")]
    if not isinstance(value, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props, extra = schema.get("properties", {}), schema.get("additionalProperties")
    out = []
    for key, v in value.items():
        if key in props:
            out += unknown_fields(v, props[key], f"{at}.{key}")
        elif isinstance(extra, dict):
            out += unknown_fields(v, extra, f"{at}.{key}")
        elif not extra:
            out.append(f"{at}.{key}")
    return out


def _header_min_kuberay() -> str:
    text = (INFRA / "k8s" / "rayjob.yaml").read_text()
    return re.search(r"KubeRay operator (v\d+\.\d+\.\d+)\+", text).group(1)


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict, kind: str) -> int:
    return int(container.get("resources", {}).get(kind, {}).get("nvidia.com/gpu", 0))


def test_rayjob_manifest_structure():
    job = _yaml(INFRA / "k8s" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m otc_ray train --config jobs/configs/gpu-cluster.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0

    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    assert not [k for k in runtime_env["env_vars"] if SECRET_NAME.search(k)]

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert {"rayStartParams", "template"} <= set(head)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert all(_gpus(c, "limits") == 0 for c in _containers(head)), "the head is a CPU pod"

    groups = cluster["workerGroupSpecs"]
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_groups = [g for g in groups if any(_gpus(c, "limits") for c in _containers(g))]
    assert gpu_groups, "needs a GPU worker group"
    for group in gpu_groups:
        for c in _containers(group):
            assert _gpus(c, "limits") >= 1 and _gpus(c, "requests") == _gpus(c, "limits"), c["name"]

    # The entrypoint's config exists in the repo, loads, and fits the GPUs the manifest asks for.
    argv = shlex.split(spec["entrypoint"])
    cfg = load_config(ROOT / argv[argv.index("--config") + 1])
    assert cfg.train.use_gpu
    gpus = sum(g["maxReplicas"] * max(_gpus(c, "limits") for c in _containers(g)) for g in gpu_groups)
    assert gpus >= cfg.train.num_workers + cfg.rematch.max_actors * cfg.rematch.actor_num_gpus


def test_rayjob_fields_exist_in_the_crd_of_its_minimum_kuberay():
    """Every field of the RayJob is in the RayJob CRD of the KubeRay version the header names as the minimum, and
    some field is not in the release before it (the header's minimum is the real one, not a guess)."""
    job = _yaml(INFRA / "k8s" / "rayjob.yaml")
    job.pop("metadata")                 # ObjectMeta: core Kubernetes, a bare object in every CRD
    minimum = _header_min_kuberay()
    assert minimum == "v1.6.0"
    assert unknown_fields(job, _crd_schema(minimum)) == []
    assert unknown_fields(job, _crd_schema("v1.5.1")) == [".spec.rayClusterSpec.authOptions.secretName"]
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3          # a typo the check catches
    assert unknown_fields(broken, _crd_schema(minimum)) == [".spec.rayClusterSpec.workerGroupSpecs[0].maxReplica"]


def test_rayjob_token_auth_and_autoscaling_are_kuberays():
    """Token auth through authOptions (the operator injects the token into Ray pods, the submitter and its own
    dashboard client), not hand-set env vars that the operator does not know about; autoscaling is on where a
    group's replicas may range."""
    spec = _yaml(INFRA / "k8s" / "rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    auth = cluster["authOptions"]
    mode_enum = _crd_schema(_header_min_kuberay())["properties"]["spec"]["properties"]["rayClusterSpec"][
        "properties"]["authOptions"]["properties"]["mode"]["enum"]
    assert auth["mode"] == "token" and auth["mode"] in mode_enum and auth["secretName"]
    assert re.search(rf"create secret generic {auth['secretName']} --from-literal=auth_token=",
                     (INFRA / "k8s" / "rayjob.yaml").read_text())                  # the key KubeRay reads
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    containers = [c for g in groups for c in _containers(g)] + spec["submitterPodTemplate"]["spec"]["containers"]
    hand_set = [(c["name"], e["name"]) for c in containers for e in c.get("env", [])
                if e["name"] in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")]
    assert hand_set == [], "KubeRay sets RAY_AUTH_* from authOptions; a hand-set value would shadow it"
    ranging = [g["groupName"] for g in cluster["workerGroupSpecs"] if g["minReplicas"] < g["maxReplicas"]]
    assert ranging and cluster["enableInTreeAutoscaling"] is True, ranging


def test_rayjob_takes_credentials_from_a_secret_only():
    spec = _yaml(INFRA / "k8s" / "rayjob.yaml")["spec"]
    ray_groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    ray_containers = [c for g in ray_groups for c in _containers(g)]
    containers = ray_containers + spec["submitterPodTemplate"]["spec"]["containers"]
    for c in containers:
        for var in c.get("env", []):
            if SECRET_NAME.search(var["name"]):
                assert "valueFrom" in var and "value" not in var, f"{c['name']}: {var['name']} inline"
    assert all(any("secretRef" in e for e in c.get("envFrom", [])) for c in ray_containers)
    images = {c["image"] for c in containers}
    assert len(images) == 1 and next(iter(images)).endswith(f"otc-ray:{_project_version()}"), images
    workdir = re.search(r"^WORKDIR\s+(\S+)", (INFRA / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert {c.get("workingDir") for c in ray_containers} == {workdir}


# ----------------------------------------------------------------------------------------- Dockerfile, README
def test_dockerfile_builds_on_the_pinned_ray_image():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert froms == [f"FROM {_ray_image_tag()}"]
    copies = [ln.split()[1:] for ln in lines if ln.upper().startswith("COPY ")]
    sources = [s for parts in copies for s in parts[:-1] if not s.startswith("--")]
    assert "." not in sources, "copy named paths only: the context root holds .venv and data"
    assert all((ROOT / s).exists() for s in sources), sources
    assert {"pyproject.toml", "otc_ray", "jobs"} <= set(sources)
    assert re.search(r"pip install --no-cache-dir --no-deps \.", text)
    assert not re.search(r"(AWS_SECRET|AWS_ACCESS_KEY|TOKEN)\s*=", text)


def test_readme_has_the_commands_and_its_paths_exist():
    text = (INFRA / "README.md").read_text()
    for command in ("ray up", "ray job submit", "--working-dir . --runtime-env infra/runtime_env.yaml",
                    "python jobs/train.py --config", "kubectl apply -f infra/k8s/rayjob.yaml", "mlflow server",
                    "docker build -f infra/docker/Dockerfile"):
        assert command in text, command
    for path in set(re.findall(r"\b((?:infra|jobs)/[\w./-]+\.(?:yaml|py|md))", text)) | {"infra/docker/Dockerfile"}:
        assert (ROOT / path).exists(), path
