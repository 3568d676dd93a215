"""Write the RayJob CRD's v1 openAPIV3Schema of a KubeRay release here, pod templates pruned (core Kubernetes,
not KubeRay's fields) and descriptions dropped, for tests/test_infra.py's field-name check.

    git clone https://github.com/ray-project/kuberay && cd kuberay
    python /path/to/tests/data/kuberay/extract_schema.py v1.6.0 /path/to/tests/data/kuberay
"""
import json
import subprocess
import sys
from pathlib import Path

import yaml

POD_TEMPLATES = ("template", "submitterPodTemplate")


def prune(node):
    """The schema without descriptions; pod templates become objects of any fields."""
    if isinstance(node, list):
        return [prune(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: ({"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                               if name in POD_TEMPLATES else prune(sub)) for name, sub in value.items()}
        else:
            out[key] = prune(value)
    return out


def main(tag: str, out_dir: str) -> None:
    text = subprocess.run(["git", "show", f"{tag}:ray-operator/config/crd/bases/ray.io_rayjobs.yaml"],
                          capture_output=True, text=True, check=True).stdout
    (v1,) = [v for v in yaml.safe_load(text)["spec"]["versions"] if v["name"] == "v1"]
    schema = {"kuberay": tag, "crd": "ray.io_rayjobs.yaml", "schema": prune(v1["schema"]["openAPIV3Schema"])}
    Path(out_dir, f"rayjob-{tag}.schema.json").write_text(json.dumps(schema, sort_keys=True, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
