#!/usr/bin/env bash
# GPU check (`make gpu-check`): on one CUDA GPU, OTCCLIP trains a few steps with train.use_gpu=true and
# model.precision=bf16, the re-match stage runs on a GPU actor (rematch.actor_num_gpus=1), and the OT kernel's
# microseconds per pair are timed on the GPU against the CPU; prints one table (benchmarks/gpu_check.py), < 5 min.
#
#   benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --cpu      # dry run of every part on the CPU (no GPU needed)
#
# Needs: Linux, python3 >= 3.10 with venv, an NVIDIA driver for torch's CUDA build (not for --cpu), and either
#   - a working .venv in the repository (the one `make setup` makes), or
#   - the packages of pyproject.toml reachable: the package index, or a wheel folder named by
#     OTC_WHEELS=/path/to/wheels (installed with --no-index: no network needed then);
#     a missing .venv is then made here with the pinned stack (~7 GB, ~4 min cold).
# No data set to fetch (the built-in synthetic shapes); everything else is offline: local Ray, a local MLflow
# sqlite store, data under a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}

if ! "$PY" -c "import torch, ray, open_clip, otc_ray" >/dev/null 2>&1; then
  echo "gpu_check: no usable $VENV; making one with the pinned stack" >&2
  python3 -m venv "$VENV"
  if [ -n "${OTC_WHEELS:-}" ]; then
    "$VENV/bin/pip" install --quiet --no-index --find-links "$OTC_WHEELS" -e '.[test]'
  elif "$VENV/bin/pip" download --quiet --no-deps --dest /tmp/otc-pip-probe pip >/dev/null 2>&1; then
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e '.[test]'
  else
    echo "gpu_check: the package index is unreachable and OTC_WHEELS is not set: carry a .venv or a wheel" \
         "folder (pip download -d wheels -e '.[test]' on a connected machine)" >&2
    exit 2
  fi
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" benchmarks/gpu_check.py "$@"
